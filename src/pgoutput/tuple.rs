//! TupleData: the column values of one row in an Insert, Update or Delete message.

use bytes::{BufMut, Bytes};

use super::error::DecodeError;
use super::wire::{Reader, put_length_prefixed};

const NULL: u8 = b'n';
const UNCHANGED_TOAST: u8 = b'u';
const TEXT: u8 = b't';
const BINARY: u8 = b'b';

/// The values of one row, in the column order of the relation's latest Relation message.
///
/// A tuple carries no column names or attribute numbers: the i-th value belongs to the i-th
/// column of the Relation message that preceded it. For an old key (`K`) tuple, the non-key
/// columns are present as [`ColumnValue::Null`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TupleData {
    /// One value per column the publication sends.
    pub columns: Vec<ColumnValue>,
}

/// One column's value in a [`TupleData`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnValue {
    /// SQL NULL (kind `n`).
    Null,
    /// The value was stored out of line (TOAST) and did not change, so the server did not send
    /// it (kind `u`). The row's current value must be kept: writing NULL here destroys data.
    UnchangedToast,
    /// The value in the type's text output format (kind `t`); the server's encoding, UTF-8 for
    /// the databases pgduplex supports. Not NUL-terminated.
    Text(Bytes),
    /// The value in the type's binary send format (kind `b`), sent when the subscriber asked for
    /// `binary` and the type has a send function.
    Binary(Bytes),
}

impl TupleData {
    /// Reads `int16 n` then `n` columns, each a kind byte and, for text and binary, an `int32`
    /// length and the bytes.
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let count = usize::from(r.u16("column count")?);
        // Each column takes at least its kind byte.
        r.check_count(count, 1, "columns")?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = r.offset();
            let value = match r.u8("column kind")? {
                NULL => ColumnValue::Null,
                UNCHANGED_TOAST => ColumnValue::UnchangedToast,
                TEXT => ColumnValue::Text(r.length_prefixed("column value")?),
                BINARY => ColumnValue::Binary(r.length_prefixed("column value")?),
                kind => {
                    return Err(DecodeError::UnknownTupleKind {
                        message: r.message(),
                        kind,
                        offset,
                    });
                }
            };
            columns.push(value);
        }
        Ok(TupleData { columns })
    }

    /// # Panics
    /// If there are more than 65535 columns or a value is longer than `i32::MAX` bytes, neither
    /// of which the format can carry.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let count = u16::try_from(self.columns.len()).expect("a tuple has at most 65535 columns");
        out.put_u16(count);
        for column in &self.columns {
            match column {
                ColumnValue::Null => out.put_u8(NULL),
                ColumnValue::UnchangedToast => out.put_u8(UNCHANGED_TOAST),
                ColumnValue::Text(value) => {
                    out.put_u8(TEXT);
                    put_length_prefixed(out, value);
                }
                ColumnValue::Binary(value) => {
                    out.put_u8(BINARY);
                    put_length_prefixed(out, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &'static [u8]) -> Result<TupleData, DecodeError> {
        let data = Bytes::from_static(bytes);
        let mut r = Reader::new(&data, 0, "Test");
        let tuple = TupleData::decode(&mut r)?;
        r.finish()?;
        Ok(tuple)
    }

    #[test]
    fn round_trips_every_column_kind() {
        let tuple = TupleData {
            columns: vec![
                ColumnValue::Null,
                ColumnValue::UnchangedToast,
                ColumnValue::Text(Bytes::from_static(b"42")),
                ColumnValue::Binary(Bytes::from_static(&[0, 0, 0, 42])),
                ColumnValue::Text(Bytes::new()),
            ],
        };
        let mut out = Vec::new();
        tuple.encode(&mut out);
        assert_eq!(
            out,
            b"\0\x05nut\0\0\0\x0242b\0\0\0\x04\0\0\0\x2at\0\0\0\0".to_vec(),
            "wire layout"
        );
        let data = Bytes::from(out);
        let mut r = Reader::new(&data, 0, "Test");
        assert_eq!(TupleData::decode(&mut r), Ok(tuple));
        r.finish().unwrap();
    }

    #[test]
    fn values_are_slices_of_the_input() {
        let data = Bytes::from_static(b"\0\x01t\0\0\0\x03abc");
        let tuple = TupleData::decode(&mut Reader::new(&data, 0, "Test")).unwrap();
        let [ColumnValue::Text(value)] = tuple.columns.as_slice() else {
            panic!("{tuple:?}")
        };
        assert_eq!(value.as_ptr(), data[7..].as_ptr());
    }

    #[test]
    fn rejects_bad_kinds_and_lengths() {
        assert_eq!(
            decode(b"\0\x02nx"),
            Err(DecodeError::UnknownTupleKind {
                message: "Test",
                kind: b'x',
                offset: 3
            })
        );
        assert!(matches!(
            decode(b"\0\x01t\xff\xff\xff\xfe"),
            Err(DecodeError::NegativeLength { value: -2, .. })
        ));
        assert!(matches!(
            decode(b"\0\x01t\0\0\0\x05abc"),
            Err(DecodeError::Truncated { needed: 5, .. })
        ));
        // A huge column count is refused before anything is allocated for it.
        assert!(matches!(
            decode(b"\xff\xffn"),
            Err(DecodeError::Truncated {
                field: "columns",
                needed: 65535,
                available: 1,
                ..
            })
        ));
    }
}

//! Insert, Update, Delete and Truncate: the row changes of a transaction.

use bytes::BufMut;

use super::error::DecodeError;
use super::tuple::TupleData;
use super::wire::{Reader, put_streamed_xid};

/// Marks the new row.
const NEW: u8 = b'N';
/// Marks the old replica identity key (REPLICA IDENTITY DEFAULT or INDEX).
const OLD_KEY: u8 = b'K';
/// Marks the whole old row (REPLICA IDENTITY FULL).
const OLD_ROW: u8 = b'O';

/// [`Truncate::options`] bit for `CASCADE`.
const TRUNCATE_CASCADE: u8 = 1;
/// [`Truncate::options`] bit for `RESTART IDENTITY`.
const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// A row inserted into the relation described by the latest Relation message for
/// `relation_oid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Inside a stream chunk, the xid of the (sub)transaction that made the change, which a
    /// Stream Abort naming it as `subxid` discards; `None` outside streaming.
    pub xid: Option<u32>,
    /// The table, by its source OID.
    pub relation_oid: u32,
    /// The inserted row.
    pub new: TupleData,
}

/// A row updated in the relation `relation_oid`.
///
/// At most one of `old_key` and `old_row` is present: `old_key` when the replica identity
/// columns changed (REPLICA IDENTITY DEFAULT or INDEX), `old_row` under REPLICA IDENTITY FULL.
/// With neither, the key is unchanged and can be read from `new`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Inside a stream chunk, the xid of the (sub)transaction that made the change, which a
    /// Stream Abort naming it as `subxid` discards; `None` outside streaming.
    pub xid: Option<u32>,
    /// The table, by its source OID.
    pub relation_oid: u32,
    /// The old replica identity columns (`K`); other columns are Null.
    pub old_key: Option<TupleData>,
    /// The whole old row (`O`); TOASTed columns may still be
    /// [`super::ColumnValue::UnchangedToast`].
    pub old_row: Option<TupleData>,
    /// The new row; TOASTed columns the update did not touch are
    /// [`super::ColumnValue::UnchangedToast`] and must keep their current value.
    pub new: TupleData,
}

/// A row deleted from the relation `relation_oid`.
///
/// Exactly one of `old_key` (`K`) and `old_row` (`O`, REPLICA IDENTITY FULL) is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Inside a stream chunk, the xid of the (sub)transaction that made the change, which a
    /// Stream Abort naming it as `subxid` discards; `None` outside streaming.
    pub xid: Option<u32>,
    /// The table, by its source OID.
    pub relation_oid: u32,
    /// The deleted row's replica identity columns (`K`); other columns are Null.
    pub old_key: Option<TupleData>,
    /// The whole deleted row (`O`).
    pub old_row: Option<TupleData>,
}

/// One `TRUNCATE` statement, naming every published table it emptied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Inside a stream chunk, the xid of the (sub)transaction that made the change, which a
    /// Stream Abort naming it as `subxid` discards; `None` outside streaming.
    pub xid: Option<u32>,
    /// Raw option bits (1 = CASCADE, 2 = RESTART IDENTITY); kept raw so an unknown bit is
    /// visible rather than dropped. The booleans below are derived from it.
    pub options: u8,
    /// `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
    /// The truncated tables, by source OID.
    pub relation_oids: Vec<u32>,
}

impl Insert {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        let xid = r.streamed_xid(in_streamed_transaction)?;
        let relation_oid = r.u32("relation_oid")?;
        expect_marker(r, &[NEW], "'N'")?;
        Ok(Insert {
            xid,
            relation_oid,
            new: TupleData::decode(r)?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_streamed_xid(out, self.xid);
        out.put_u32(self.relation_oid);
        out.put_u8(NEW);
        self.new.encode(out);
    }
}

impl Update {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        let xid = r.streamed_xid(in_streamed_transaction)?;
        let relation_oid = r.u32("relation_oid")?;
        let (mut old_key, mut old_row) = (None, None);
        match expect_marker(r, &[OLD_KEY, OLD_ROW, NEW], "'K', 'O' or 'N'")? {
            OLD_KEY => {
                old_key = Some(TupleData::decode(r)?);
                expect_marker(r, &[NEW], "'N'")?;
            }
            OLD_ROW => {
                old_row = Some(TupleData::decode(r)?);
                expect_marker(r, &[NEW], "'N'")?;
            }
            _ => {}
        }
        Ok(Update {
            xid,
            relation_oid,
            old_key,
            old_row,
            new: TupleData::decode(r)?,
        })
    }

    /// # Panics
    /// If both `old_key` and `old_row` are present, which the format cannot carry.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_streamed_xid(out, self.xid);
        out.put_u32(self.relation_oid);
        match (&self.old_key, &self.old_row) {
            (None, None) => {}
            (Some(key), None) => {
                out.put_u8(OLD_KEY);
                key.encode(out);
            }
            (None, Some(row)) => {
                out.put_u8(OLD_ROW);
                row.encode(out);
            }
            (Some(_), Some(_)) => panic!("an Update carries an old key or an old row, not both"),
        }
        out.put_u8(NEW);
        self.new.encode(out);
    }
}

impl Delete {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        let xid = r.streamed_xid(in_streamed_transaction)?;
        let relation_oid = r.u32("relation_oid")?;
        let marker = expect_marker(r, &[OLD_KEY, OLD_ROW], "'K' or 'O'")?;
        let old = TupleData::decode(r)?;
        let (old_key, old_row) = if marker == OLD_KEY {
            (Some(old), None)
        } else {
            (None, Some(old))
        };
        Ok(Delete {
            xid,
            relation_oid,
            old_key,
            old_row,
        })
    }

    /// # Panics
    /// Unless exactly one of `old_key` and `old_row` is present.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_streamed_xid(out, self.xid);
        out.put_u32(self.relation_oid);
        match (&self.old_key, &self.old_row) {
            (Some(key), None) => {
                out.put_u8(OLD_KEY);
                key.encode(out);
            }
            (None, Some(row)) => {
                out.put_u8(OLD_ROW);
                row.encode(out);
            }
            _ => panic!("a Delete carries exactly one of an old key and an old row"),
        }
    }
}

impl Truncate {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        let xid = r.streamed_xid(in_streamed_transaction)?;
        let count = r.length("relation count")?;
        let options = r.u8("options")?;
        r.check_count(count, 4, "relation_oids")?;
        let relation_oids = (0..count)
            .map(|_| r.u32("relation_oid"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Truncate {
            xid,
            options,
            cascade: options & TRUNCATE_CASCADE != 0,
            restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
            relation_oids,
        })
    }

    /// Writes [`Truncate::options`]; the booleans are derived from it and not written.
    ///
    /// # Panics
    /// If there are more than `i32::MAX` relations.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        debug_assert_eq!(
            self.cascade,
            self.options & TRUNCATE_CASCADE != 0,
            "{self:?}"
        );
        debug_assert_eq!(
            self.restart_identity,
            self.options & TRUNCATE_RESTART_IDENTITY != 0,
            "{self:?}"
        );
        put_streamed_xid(out, self.xid);
        let count =
            i32::try_from(self.relation_oids.len()).expect("at most i32::MAX truncated relations");
        out.put_i32(count);
        out.put_u8(self.options);
        for oid in &self.relation_oids {
            out.put_u32(*oid);
        }
    }
}

/// Reads the byte announcing the next tuple and checks it is one of `allowed`.
fn expect_marker(
    r: &mut Reader<'_>,
    allowed: &[u8],
    expected: &'static str,
) -> Result<u8, DecodeError> {
    let offset = r.offset();
    let found = r.u8("tuple marker")?;
    if allowed.contains(&found) {
        Ok(found)
    } else {
        Err(DecodeError::UnexpectedTupleMarker {
            message: r.message(),
            expected,
            found,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::testing::{V1, V2_STREAMED, assert_round_trip};
    use super::super::{ColumnValue, Message, decode};
    use super::*;

    fn row(values: &[&'static str]) -> TupleData {
        TupleData {
            columns: values
                .iter()
                .map(|v| ColumnValue::Text(Bytes::from_static(v.as_bytes())))
                .collect(),
        }
    }

    #[test]
    fn insert_round_trips() {
        let wire = assert_round_trip(
            &Message::Insert(Insert {
                xid: None,
                relation_oid: 7,
                new: row(&["1"]),
            }),
            &V1,
        );
        assert_eq!(wire, b"I\0\0\0\x07N\0\x01t\0\0\0\x011");
        assert_round_trip(
            &Message::Insert(Insert {
                xid: Some(9),
                relation_oid: 7,
                new: row(&[]),
            }),
            &V2_STREAMED,
        );
    }

    #[test]
    fn update_round_trips_with_each_old_tuple() {
        let plain = Update {
            xid: None,
            relation_oid: 7,
            old_key: None,
            old_row: None,
            new: row(&["1", "b"]),
        };
        assert_round_trip(&Message::Update(plain.clone()), &V1);
        let key = TupleData {
            columns: vec![
                ColumnValue::Text(Bytes::from_static(b"0")),
                ColumnValue::Null,
            ],
        };
        let wire = assert_round_trip(
            &Message::Update(Update {
                old_key: Some(key),
                ..plain.clone()
            }),
            &V1,
        );
        assert_eq!(wire[5], b'K');
        let wire = assert_round_trip(
            &Message::Update(Update {
                old_row: Some(row(&["0", "a"])),
                ..plain.clone()
            }),
            &V1,
        );
        assert_eq!(wire[5], b'O');
        assert_round_trip(
            &Message::Update(Update {
                xid: Some(3),
                ..plain
            }),
            &V2_STREAMED,
        );
    }

    #[test]
    fn delete_round_trips_with_each_old_tuple() {
        let by_key = Delete {
            xid: None,
            relation_oid: 7,
            old_key: Some(row(&["1"])),
            old_row: None,
        };
        let wire = assert_round_trip(&Message::Delete(by_key.clone()), &V1);
        assert_eq!(wire, b"D\0\0\0\x07K\0\x01t\0\0\0\x011");
        let by_row = Delete {
            old_key: None,
            old_row: Some(row(&["1", "x"])),
            ..by_key
        };
        assert_round_trip(&Message::Delete(by_row.clone()), &V1);
        assert_round_trip(
            &Message::Delete(Delete {
                xid: Some(1),
                ..by_row
            }),
            &V2_STREAMED,
        );
    }

    #[test]
    fn truncate_round_trips() {
        let message = Truncate {
            xid: None,
            options: 3,
            cascade: true,
            restart_identity: true,
            relation_oids: vec![1, 2],
        };
        let wire = assert_round_trip(&Message::Truncate(message.clone()), &V1);
        assert_eq!(wire, b"T\0\0\0\x02\x03\0\0\0\x01\0\0\0\x02");
        let message = Truncate {
            xid: Some(4),
            options: 0,
            cascade: false,
            restart_identity: false,
            ..message
        };
        assert_round_trip(&Message::Truncate(message), &V2_STREAMED);
    }

    #[test]
    fn rejects_misplaced_tuple_markers() {
        let cases: [(&'static [u8], &str, u8, usize); 4] = [
            (b"I\0\0\0\x07K\0\0", "'N'", b'K', 5),
            (b"U\0\0\0\x07X\0\0", "'K', 'O' or 'N'", b'X', 5),
            (b"U\0\0\0\x07K\0\0K\0\0", "'N'", b'K', 8),
            (b"D\0\0\0\x07N\0\0", "'K' or 'O'", b'N', 5),
        ];
        for (bytes, expected, found, offset) in cases {
            let err = decode(&Bytes::from_static(bytes), &V1).unwrap_err();
            let DecodeError::UnexpectedTupleMarker {
                expected: e,
                found: f,
                offset: o,
                ..
            } = err
            else {
                panic!("{bytes:?}: {err}")
            };
            assert_eq!((e, f, o), (expected, found, offset), "{bytes:?}");
        }
    }

    #[test]
    fn rejects_negative_and_oversized_truncate_counts() {
        let err = decode(&Bytes::from_static(b"T\xff\xff\xff\xff\0"), &V1).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::NegativeLength {
                    value: -1,
                    offset: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = decode(&Bytes::from_static(b"T\x7f\xff\xff\xff\0\0\0\0\x01"), &V1).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Truncated {
                    field: "relation_oids",
                    available: 4,
                    ..
                }
            ),
            "{err}"
        );
    }
}

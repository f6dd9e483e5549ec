//! Bounds-checked reading and plain writing of pgoutput's primitive fields.
//!
//! pgoutput uses the backend's `pq_send*` encodings: big-endian integers, NUL-terminated
//! strings, and byte strings prefixed by a signed 32-bit length. [`Reader`] is the only code
//! that touches the input bytes: every read checks the remaining length first and reports the
//! field and offset when it does not fit, so the message decoders never index, never unwrap,
//! and never allocate more than the input could hold.

use bytes::{BufMut, Bytes};

use super::error::DecodeError;
use crate::lsn::Lsn;

/// A cursor over one pgoutput message that turns short or malformed input into [`DecodeError`]s.
///
/// Invariant: `offset <= data.len()`.
pub(super) struct Reader<'a> {
    data: &'a Bytes,
    offset: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    /// Starts reading `data` at `offset` (just past the tag) on behalf of `message`, the name
    /// used in errors.
    pub(super) fn new(data: &'a Bytes, offset: usize, message: &'static str) -> Self {
        let offset = offset.min(data.len());
        Reader {
            data,
            offset,
            message,
        }
    }

    /// The name of the message being read, for errors raised by callers.
    pub(super) fn message(&self) -> &'static str {
        self.message
    }

    /// Where the next read starts, from the message's tag byte.
    pub(super) fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes not yet read.
    pub(super) fn remaining(&self) -> usize {
        self.rest().len()
    }

    fn rest(&self) -> &'a [u8] {
        self.data.get(self.offset..).unwrap_or_default()
    }

    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            offset: self.offset,
            needed,
            available: self.remaining(),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, _) = self
            .rest()
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated(field, N))?;
        // Cannot overflow: N bytes were just found in `data` past `offset`.
        self.offset += N;
        Ok(*head)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(u8::from_be_bytes)
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    pub(super) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A byte that must be 0 (false) or 1 (true).
    pub(super) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let offset = self.offset;
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidBool {
                message: self.message,
                field,
                offset,
                value,
            }),
        }
    }

    /// The transaction id that precedes the body of change, Relation, Type and Message
    /// messages inside a streamed transaction, and nothing outside one.
    pub(super) fn streamed_xid(
        &mut self,
        in_streamed_transaction: bool,
    ) -> Result<Option<u32>, DecodeError> {
        if in_streamed_transaction {
            self.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    /// A NUL-terminated UTF-8 string (`pq_sendstring`); the NUL is consumed, not returned.
    pub(super) fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.offset;
        let mut parts = self.rest().splitn(2, |&b| b == 0);
        let raw = parts.next().unwrap_or_default();
        if parts.next().is_none() {
            return Err(DecodeError::NotNulTerminated {
                message: self.message,
                field,
                offset: start,
            });
        }
        let text = std::str::from_utf8(raw).map_err(|e| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset: start,
            bad_byte_offset: start.saturating_add(e.valid_up_to()),
        })?;
        // Cannot overflow: the string and its NUL were found in `data` past `offset`.
        self.offset += raw.len() + 1;
        Ok(text.to_owned())
    }

    /// `len` bytes as a zero-copy slice of the message.
    pub(super) fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(field, len));
        }
        let start = self.offset;
        self.offset += len;
        Ok(self.data.slice(start..self.offset))
    }

    /// A non-negative `int32` length or count, as `usize`.
    pub(super) fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.offset;
        let value = self.i32(field)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
            offset,
            value,
        })
    }

    /// Bytes prefixed by an `int32` length (`pq_sendcountedtext`, column values, message
    /// content), as a zero-copy slice.
    pub(super) fn length_prefixed(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.length(field)?;
        self.bytes(len, field)
    }

    /// Checks that `count` items of at least `min_item_size` bytes each can still follow, so a
    /// `Vec` of `count` elements can be allocated without trusting the count.
    pub(super) fn check_count(
        &self,
        count: usize,
        min_item_size: usize,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        match count.checked_mul(min_item_size) {
            Some(needed) if needed <= self.remaining() => Ok(()),
            needed => Err(self.truncated(field, needed.unwrap_or(usize::MAX))),
        }
    }

    /// Ends the message: any byte left over means the format was misread.
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.offset,
                count,
            }),
        }
    }
}

/// Writes a NUL-terminated string.
///
/// # Panics
/// If `s` contains a NUL byte, which the format cannot carry.
pub(super) fn put_cstring(out: &mut Vec<u8>, s: &str) {
    assert!(
        !s.as_bytes().contains(&0),
        "pgoutput strings cannot contain NUL: {s:?}"
    );
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Writes bytes prefixed by their `int32` length.
///
/// # Panics
/// If `bytes` is longer than `i32::MAX`, which the format cannot carry.
pub(super) fn put_length_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = i32::try_from(bytes.len()).expect("pgoutput byte strings are at most i32::MAX long");
    out.put_i32(len);
    out.put_slice(bytes);
}

/// Writes the streamed-transaction xid when there is one.
pub(super) fn put_streamed_xid(out: &mut Vec<u8>, xid: Option<u32>) {
    if let Some(xid) = xid {
        out.put_u32(xid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let data = Bytes::from_static(&[0, 0, 0, 1, 0xff]);
        let mut r = Reader::new(&data, 0, "Test");
        assert_eq!(r.u32("a"), Ok(1));
        assert_eq!(
            r.u32("b"),
            Err(DecodeError::Truncated {
                message: "Test",
                field: "b",
                offset: 4,
                needed: 4,
                available: 1
            })
        );
        assert_eq!(r.u8("c"), Ok(0xff));
        assert_eq!(r.u8("d").map_err(|e| e.offset()), Err(Some(5)));
        r.finish().unwrap();
    }

    #[test]
    fn cstring_needs_nul_and_utf8() {
        let data = Bytes::from_static(b"ab\0c");
        let mut r = Reader::new(&data, 0, "Test");
        assert_eq!(r.cstring("s").as_deref(), Ok("ab"));
        assert_eq!(
            r.cstring("t"),
            Err(DecodeError::NotNulTerminated {
                message: "Test",
                field: "t",
                offset: 3
            })
        );
        let data = Bytes::from_static(b"a\xff\0");
        let err = Reader::new(&data, 0, "Test").cstring("s").unwrap_err();
        assert_eq!(
            err,
            DecodeError::InvalidUtf8 {
                message: "Test",
                field: "s",
                offset: 0,
                bad_byte_offset: 1
            }
        );
    }

    #[test]
    fn lengths_are_checked_against_the_input() {
        let data = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            Reader::new(&data, 0, "Test").length_prefixed("v"),
            Err(DecodeError::NegativeLength { value: -1, .. })
        ));
        let data = Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff, 1]);
        assert!(matches!(
            Reader::new(&data, 0, "Test").length_prefixed("v"),
            Err(DecodeError::Truncated {
                needed: 0x7fff_ffff,
                available: 1,
                offset: 4,
                ..
            })
        ));
        let data = Bytes::new();
        assert!(
            Reader::new(&data, 0, "Test")
                .check_count(usize::MAX, 2, "n")
                .is_err()
        );
        assert!(Reader::new(&data, 0, "Test").check_count(0, 2, "n").is_ok());
    }
}

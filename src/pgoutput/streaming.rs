//! Stream Start, Stream Stop, Stream Commit and Stream Abort (protocol 2 and later): a large
//! transaction sent in chunks while it is still in progress.
//!
//! Each chunk is framed by Stream Start and Stream Stop; the messages inside carry an xid (see
//! [`super::DecodeContext::in_streamed_transaction`]): the top-level transaction's, or that of
//! the subtransaction that made the change. Chunks of several
//! transactions may interleave. The transaction ends, outside any chunk, with Stream Commit,
//! Stream Prepare, or a Stream Abort with `subxid == xid`; a Stream Abort with another `subxid`
//! discards only that subtransaction's changes.

use bytes::BufMut;

use super::error::DecodeError;
use super::wire::Reader;
use crate::lsn::Lsn;

/// Opens a chunk of a streamed transaction; the messages up to [`super::Message::StreamStop`]
/// belong to transaction `xid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// The streamed (top-level) transaction.
    pub xid: u32,
    /// Whether this is the transaction's first chunk.
    pub first_segment: bool,
}

/// Commits a streamed transaction, outside any chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    /// The committed transaction.
    pub xid: u32,
    /// Currently always 0; kept raw so a future flag is visible rather than dropped.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: the position to confirm once applied.
    pub end_lsn: Lsn,
    /// Commit timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
}

/// Aborts a streamed transaction (`subxid == xid`) or one of its subtransactions.
///
/// Protocol 4 adds the abort's LSN and time, but only when the subscriber asked for
/// `streaming = parallel`; the decoder tells the two layouts apart by the message length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level streamed transaction.
    pub xid: u32,
    /// The aborted (sub)transaction; equal to `xid` when the whole transaction aborted.
    pub subxid: u32,
    /// The LSN of the abort record (protocol 4, parallel streaming only).
    pub abort_lsn: Option<Lsn>,
    /// Abort timestamp, microseconds since 2000-01-01 00:00 UTC (protocol 4, parallel
    /// streaming only).
    pub abort_time: Option<i64>,
}

impl StreamStart {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.bool("first_segment")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.xid);
        out.put_u8(u8::from(self.first_segment));
    }
}

impl StreamCommit {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            commit_time: r.i64("commit_time")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.xid);
        out.put_u8(self.flags);
        out.put_u64(self.commit_lsn.0);
        out.put_u64(self.end_lsn.0);
        out.put_i64(self.commit_time);
    }
}

impl StreamAbort {
    /// The abort LSN and time follow only under protocol 4 with parallel streaming, which the
    /// decode context does not know; since the message ends right after them, their presence is
    /// read from the length: nothing left means absent, anything else must be both fields.
    pub(super) fn decode(r: &mut Reader<'_>, protocol_version: u32) -> Result<Self, DecodeError> {
        let xid = r.u32("xid")?;
        let subxid = r.u32("subxid")?;
        let (abort_lsn, abort_time) = if protocol_version >= 4 && r.remaining() > 0 {
            (Some(r.lsn("abort_lsn")?), Some(r.i64("abort_time")?))
        } else {
            (None, None)
        };
        Ok(StreamAbort {
            xid,
            subxid,
            abort_lsn,
            abort_time,
        })
    }

    /// # Panics
    /// If only one of `abort_lsn` and `abort_time` is present.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.xid);
        out.put_u32(self.subxid);
        match (self.abort_lsn, self.abort_time) {
            (None, None) => {}
            (Some(lsn), Some(time)) => {
                out.put_u64(lsn.0);
                out.put_i64(time);
            }
            _ => panic!("a Stream Abort carries both abort_lsn and abort_time, or neither"),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::testing::{V2, V4, assert_round_trip};
    use super::super::{DecodeContext, Message, decode};
    use super::*;

    #[test]
    fn stream_start_round_trips() {
        let wire = assert_round_trip(
            &Message::StreamStart(StreamStart {
                xid: 5,
                first_segment: true,
            }),
            &V2,
        );
        assert_eq!(wire, b"S\0\0\0\x05\x01");
        assert_round_trip(
            &Message::StreamStart(StreamStart {
                xid: 5,
                first_segment: false,
            }),
            &V2,
        );
        let err = decode(&Bytes::from_static(b"S\0\0\0\x05\x02"), &V2).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::InvalidBool {
                field: "first_segment",
                value: 2,
                offset: 5,
                ..
            }
        ));
    }

    #[test]
    fn stream_stop_round_trips() {
        let in_stream = DecodeContext {
            in_streamed_transaction: true,
            ..V2
        };
        assert_eq!(assert_round_trip(&Message::StreamStop, &in_stream), b"E");
    }

    #[test]
    fn stream_commit_round_trips() {
        let message = StreamCommit {
            xid: 5,
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: 30,
        };
        assert_eq!(
            assert_round_trip(&Message::StreamCommit(message), &V2).len(),
            1 + 4 + 1 + 8 + 8 + 8
        );
    }

    #[test]
    fn stream_abort_round_trips_with_and_without_parallel_fields() {
        let plain = StreamAbort {
            xid: 5,
            subxid: 6,
            abort_lsn: None,
            abort_time: None,
        };
        assert_eq!(
            assert_round_trip(&Message::StreamAbort(plain.clone()), &V2),
            b"A\0\0\0\x05\0\0\0\x06"
        );
        assert_round_trip(&Message::StreamAbort(plain.clone()), &V4);
        let parallel = StreamAbort {
            abort_lsn: Some(Lsn(7)),
            abort_time: Some(8),
            ..plain
        };
        assert_eq!(
            assert_round_trip(&Message::StreamAbort(parallel.clone()), &V4).len(),
            1 + 4 + 4 + 8 + 8
        );
        // Before protocol 4 the extra fields are not part of the format.
        let wire = Bytes::from(super::super::encode(&Message::StreamAbort(parallel), &V4));
        assert!(matches!(
            decode(&wire, &V2),
            Err(DecodeError::TrailingBytes {
                offset: 9,
                count: 16,
                ..
            })
        ));
        // Under protocol 4, a partial pair is truncated, not silently ignored.
        assert!(matches!(
            decode(&wire.slice(..13), &V4),
            Err(DecodeError::Truncated {
                field: "abort_lsn",
                offset: 9,
                ..
            })
        ));
    }
}

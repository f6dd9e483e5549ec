//! Begin, Commit and Origin: the frame of every non-streamed transaction.

use bytes::BufMut;

use super::error::DecodeError;
use super::wire::{Reader, put_cstring};
use crate::lsn::Lsn;

/// Opens a transaction; every change until the matching [`Commit`] belongs to it.
///
/// The server decodes a transaction only once it has committed, so `final_lsn` is already
/// known: it equals the [`Commit::commit_lsn`] that closes the transaction, which the pipeline
/// checks to catch a desynchronized stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
    /// The transaction's id on the source server.
    pub xid: u32,
}

/// Closes the transaction opened by the last [`Begin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0; kept raw so a future flag is visible rather than dropped.
    pub flags: u8,
    /// The LSN of the commit record; equals the opening [`Begin::final_lsn`].
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: the position to confirm once this transaction is
    /// durably applied.
    pub end_lsn: Lsn,
    /// Commit timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
}

/// Says the current transaction was replayed on the source from another node (it follows
/// [`Begin`]); pgduplex uses it to recognise its own echoed changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin node, as recorded by its replication origin.
    pub commit_lsn: Lsn,
    /// The replication origin's name.
    pub name: String,
}

impl Begin {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Begin {
            final_lsn: r.lsn("final_lsn")?,
            commit_time: r.i64("commit_time")?,
            xid: r.u32("xid")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.final_lsn.0);
        out.put_i64(self.commit_time);
        out.put_u32(self.xid);
    }
}

impl Commit {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            commit_time: r.i64("commit_time")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.flags);
        out.put_u64(self.commit_lsn.0);
        out.put_u64(self.end_lsn.0);
        out.put_i64(self.commit_time);
    }
}

impl Origin {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Origin {
            commit_lsn: r.lsn("commit_lsn")?,
            name: r.cstring("name")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.commit_lsn.0);
        put_cstring(out, &self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{V1, assert_round_trip};
    use super::super::{Message, decode};
    use super::*;

    #[test]
    fn begin_round_trips() {
        let wire = assert_round_trip(
            &Message::Begin(Begin {
                final_lsn: Lsn(0x1_0000_0002),
                commit_time: -3,
                xid: 4,
            }),
            &V1,
        );
        assert_eq!(
            wire,
            b"B\0\0\0\x01\0\0\0\x02\xff\xff\xff\xff\xff\xff\xff\xfd\0\0\0\x04"
        );
    }

    #[test]
    fn commit_round_trips() {
        let wire = assert_round_trip(
            &Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(2),
                commit_time: 3,
            }),
            &V1,
        );
        assert_eq!(wire.len(), 1 + 1 + 8 + 8 + 8);
    }

    #[test]
    fn origin_round_trips() {
        let wire = assert_round_trip(
            &Message::Origin(Origin {
                commit_lsn: Lsn(0xABCDEF),
                name: "peer".into(),
            }),
            &V1,
        );
        assert_eq!(wire, b"O\0\0\0\0\0\xab\xcd\xefpeer\0");
    }

    #[test]
    fn origin_name_must_be_terminated() {
        let data = bytes::Bytes::from_static(b"O\0\0\0\0\0\0\0\x01peer");
        assert_eq!(
            decode(&data, &V1),
            Err(DecodeError::NotNulTerminated {
                message: "Origin",
                field: "name",
                offset: 9
            })
        );
    }
}

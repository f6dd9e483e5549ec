//! Begin Prepare, Prepare, Commit Prepared, Rollback Prepared and Stream Prepare (protocol 3
//! and later, with `two_phase` on): transactions decoded at `PREPARE TRANSACTION` time and
//! finished later by `COMMIT PREPARED` or `ROLLBACK PREPARED`, matched by their `gid`.

use bytes::BufMut;

use super::error::DecodeError;
use super::wire::{Reader, put_cstring};
use crate::lsn::Lsn;

/// Opens a prepared transaction's changes; closed by [`Prepare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeginPrepare {
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub prepare_time: i64,
    /// The prepared transaction's id.
    pub xid: u32,
    /// The global transaction identifier given to `PREPARE TRANSACTION`.
    pub gid: String,
}

/// Closes the changes opened by [`BeginPrepare`]: the transaction is prepared, not committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    /// Currently always 0; kept raw so a future flag is visible rather than dropped.
    pub flags: u8,
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub prepare_time: i64,
    /// The prepared transaction's id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: String,
}

/// `COMMIT PREPARED` of an earlier prepared transaction; sent on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Currently always 0; kept raw so a future flag is visible rather than dropped.
    pub flags: u8,
    /// The LSN of the commit prepared record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit prepared record.
    pub end_lsn: Lsn,
    /// Commit timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
    /// The transaction's id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: String,
}

/// `ROLLBACK PREPARED` of an earlier prepared transaction; sent on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Currently always 0; kept raw so a future flag is visible rather than dropped.
    pub flags: u8,
    /// The LSN just past the prepare record being rolled back.
    pub prepare_end_lsn: Lsn,
    /// The LSN just past the rollback prepared record.
    pub rollback_end_lsn: Lsn,
    /// Prepare timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub prepare_time: i64,
    /// Rollback timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub rollback_time: i64,
    /// The transaction's id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: String,
}

/// Prepares a streamed transaction, outside any chunk (same fields as [`Prepare`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPrepare {
    /// Currently always 0; kept raw so a future flag is visible rather than dropped.
    pub flags: u8,
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare timestamp, microseconds since 2000-01-01 00:00 UTC.
    pub prepare_time: i64,
    /// The prepared transaction's id.
    pub xid: u32,
    /// The global transaction identifier.
    pub gid: String,
}

impl BeginPrepare {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(BeginPrepare {
            prepare_lsn: r.lsn("prepare_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            prepare_time: r.i64("prepare_time")?,
            xid: r.u32("xid")?,
            gid: r.cstring("gid")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.prepare_lsn.0);
        out.put_u64(self.end_lsn.0);
        out.put_i64(self.prepare_time);
        out.put_u32(self.xid);
        put_cstring(out, &self.gid);
    }
}

impl Prepare {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Prepare {
            flags: r.u8("flags")?,
            prepare_lsn: r.lsn("prepare_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            prepare_time: r.i64("prepare_time")?,
            xid: r.u32("xid")?,
            gid: r.cstring("gid")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.flags);
        out.put_u64(self.prepare_lsn.0);
        out.put_u64(self.end_lsn.0);
        out.put_i64(self.prepare_time);
        out.put_u32(self.xid);
        put_cstring(out, &self.gid);
    }
}

impl StreamPrepare {
    /// Same layout as [`Prepare`] (the server writes both with one function).
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        } = Prepare::decode(r)?;
        Ok(StreamPrepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let StreamPrepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            ref gid,
        } = *self;
        Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid: gid.clone(),
        }
        .encode(out);
    }
}

impl CommitPrepared {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(CommitPrepared {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            commit_time: r.i64("commit_time")?,
            xid: r.u32("xid")?,
            gid: r.cstring("gid")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.flags);
        out.put_u64(self.commit_lsn.0);
        out.put_u64(self.end_lsn.0);
        out.put_i64(self.commit_time);
        out.put_u32(self.xid);
        put_cstring(out, &self.gid);
    }
}

impl RollbackPrepared {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(RollbackPrepared {
            flags: r.u8("flags")?,
            prepare_end_lsn: r.lsn("prepare_end_lsn")?,
            rollback_end_lsn: r.lsn("rollback_end_lsn")?,
            prepare_time: r.i64("prepare_time")?,
            rollback_time: r.i64("rollback_time")?,
            xid: r.u32("xid")?,
            gid: r.cstring("gid")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.flags);
        out.put_u64(self.prepare_end_lsn.0);
        out.put_u64(self.rollback_end_lsn.0);
        out.put_i64(self.prepare_time);
        out.put_i64(self.rollback_time);
        out.put_u32(self.xid);
        put_cstring(out, &self.gid);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{V3, assert_round_trip};
    use super::super::{Message, decode};
    use super::*;

    #[test]
    fn begin_prepare_round_trips() {
        let message = BeginPrepare {
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time: 3,
            xid: 4,
            gid: "g1".into(),
        };
        let wire = assert_round_trip(&Message::BeginPrepare(message), &V3);
        assert_eq!(wire.len(), 1 + 8 + 8 + 8 + 4 + 3);
        assert_eq!(wire[0], b'b');
    }

    #[test]
    fn prepare_round_trips() {
        let message = Prepare {
            flags: 0,
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time: 3,
            xid: 4,
            gid: "g1".into(),
        };
        let wire = assert_round_trip(&Message::Prepare(message), &V3);
        assert_eq!(
            wire,
            b"P\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02\0\0\0\0\0\0\0\x03\0\0\0\x04g1\0"
        );
    }

    #[test]
    fn commit_prepared_round_trips() {
        let message = CommitPrepared {
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time: 3,
            xid: 4,
            gid: "g".into(),
        };
        assert_eq!(
            assert_round_trip(&Message::CommitPrepared(message), &V3)[0],
            b'K'
        );
    }

    #[test]
    fn rollback_prepared_round_trips() {
        let message = RollbackPrepared {
            flags: 0,
            prepare_end_lsn: Lsn(1),
            rollback_end_lsn: Lsn(2),
            prepare_time: 3,
            rollback_time: 4,
            xid: 5,
            gid: "g".into(),
        };
        let wire = assert_round_trip(&Message::RollbackPrepared(message), &V3);
        assert_eq!(wire.len(), 1 + 1 + 8 + 8 + 8 + 8 + 4 + 2);
        assert_eq!(wire[0], b'r');
    }

    #[test]
    fn stream_prepare_round_trips() {
        let message = StreamPrepare {
            flags: 0,
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time: 3,
            xid: 4,
            gid: "g".into(),
        };
        assert_eq!(
            assert_round_trip(&Message::StreamPrepare(message), &V3)[0],
            b'p'
        );
    }

    #[test]
    fn gid_must_be_utf8() {
        let data = bytes::Bytes::from_static(
            b"K\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02\0\0\0\0\0\0\0\x03\0\0\0\x04\xc3\0",
        );
        assert!(matches!(
            decode(&data, &V3),
            Err(DecodeError::InvalidUtf8 {
                field: "gid",
                offset: 30,
                bad_byte_offset: 30,
                ..
            })
        ));
    }
}

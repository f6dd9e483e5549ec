//! Standby status update (`r`): what we tell the server about our progress.
//!
//! Layout inside CopyData: `'r'`, Int64 written LSN, Int64 flushed LSN, Int64 applied LSN,
//! Int64 client time (µs since 2000-01-01), Byte1 reply-requested. For a logical slot the
//! server takes the flushed LSN as the slot's new `confirmed_flush_lsn` and may then recycle
//! WAL and forget transactions before it: see the module docs of [`super`] for what is safe.

use bytes::BufMut;

use super::Lsn;

/// CopyData sub-tag of a standby status update.
pub const TAG: u8 = b'r';

/// Body length: tag + four Int64 + one byte.
pub const LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// One standby status update, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    /// Last WAL position received and written (for us: decoded and queued).
    pub write: Lsn,
    /// Last position durably committed on the target: the slot's next `confirmed_flush_lsn`.
    pub flush: Lsn,
    /// Last position applied (for us: committed, like `flush`).
    pub apply: Lsn,
    /// Client clock, µs since 2000-01-01 UTC.
    pub client_time: i64,
    /// Ask the server to answer with a keepalive at once.
    pub reply_requested: bool,
}

impl StandbyStatus {
    /// Appends the CopyData body (without the CopyData frame header) to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(TAG);
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time);
        out.put_u8(u8::from(self.reply_requested));
    }

    /// Parses a body (the server's side; used by tests and fakes).
    #[cfg(test)]
    pub fn parse(body: &[u8]) -> Option<StandbyStatus> {
        use super::xlog_data::read_u64;
        if body.len() != LEN || body[0] != TAG || body[33] > 1 {
            return None;
        }
        Some(StandbyStatus {
            write: Lsn(read_u64(&body[1..9])),
            flush: Lsn(read_u64(&body[9..17])),
            apply: Lsn(read_u64(&body[17..25])),
            client_time: read_u64(&body[25..33]) as i64,
            reply_requested: body[33] == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        let mut out = Vec::new();
        StandbyStatus {
            write: Lsn(0x0102030405060708),
            flush: Lsn(2),
            apply: Lsn(3),
            client_time: 4,
            reply_requested: true,
        }
        .encode(&mut out);
        assert_eq!(out.len(), LEN);
        assert_eq!(out[0], b'r');
        assert_eq!(&out[1..9], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&out[9..17], &2u64.to_be_bytes());
        assert_eq!(&out[25..33], &4i64.to_be_bytes());
        assert_eq!(out[33], 1);
    }

    proptest! {
        #[test]
        fn round_trips(w in any::<u64>(), f in any::<u64>(), a in any::<u64>(),
                       t in any::<i64>(), r in any::<bool>()) {
            let s = StandbyStatus { write: Lsn(w), flush: Lsn(f), apply: Lsn(a),
                                    client_time: t, reply_requested: r };
            let mut out = Vec::new();
            s.encode(&mut out);
            prop_assert_eq!(StandbyStatus::parse(&out), Some(s));
        }
    }
}

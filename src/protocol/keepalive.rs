//! Primary keepalive (`k`): the server's current end of WAL, and whether it wants a reply now.
//!
//! Layout inside CopyData: `'k'`, Int64 WAL end, Int64 send time (µs since 2000-01-01),
//! Byte1 reply-requested (1 = answer at once, or the walsender times us out).

use bytes::Bytes;

use super::xlog_data::read_u64;
use super::{Lsn, ProtocolError, ReplicationMessage};

/// CopyData sub-tag of a primary keepalive.
pub const TAG: u8 = b'k';

/// Exact body length: tag + two Int64 + one byte. Anything else is rejected: the layout has not
/// changed since PostgreSQL 9.4, and a different length means we are misreading the stream.
pub const LEN: usize = 1 + 8 + 8 + 1;

/// Parses a CopyData body starting with `'k'`.
pub fn parse(body: &Bytes) -> Result<ReplicationMessage, ProtocolError> {
    if body.len() != LEN || body[0] != TAG {
        return Err(ProtocolError::Protocol(format!(
            "malformed primary keepalive: {} bytes, expected {LEN} starting with 'k'",
            body.len()
        )));
    }
    let reply_requested = match body[17] {
        0 => false,
        1 => true,
        other => {
            return Err(ProtocolError::Protocol(format!(
                "malformed primary keepalive: reply flag {other}, expected 0 or 1"
            )));
        }
    };
    Ok(ReplicationMessage::PrimaryKeepalive {
        wal_end: Lsn(read_u64(&body[1..9])),
        send_time: read_u64(&body[9..17]) as i64,
        reply_requested,
    })
}

/// Encodes a keepalive CopyData body (the server's side; used by tests and fakes).
#[cfg(test)]
pub fn encode(wal_end: Lsn, send_time: i64, reply_requested: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(LEN);
    v.push(TAG);
    v.extend_from_slice(&wal_end.0.to_be_bytes());
    v.extend_from_slice(&send_time.to_be_bytes());
    v.push(u8::from(reply_requested));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_strictness() {
        let msg = parse(&Bytes::from(encode(Lsn(0x16B3748), -5, true))).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x16B3748),
                send_time: -5,
                reply_requested: true
            }
        );
        let mut long = encode(Lsn(1), 1, false);
        long.push(0);
        assert!(parse(&Bytes::from(long)).is_err());
        let mut flag = encode(Lsn(1), 1, false);
        flag[17] = 7;
        assert!(parse(&Bytes::from(flag)).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse(&Bytes::from(bytes));
        }

        #[test]
        fn round_trips(e in any::<u64>(), t in any::<i64>(), r in any::<bool>()) {
            let msg = parse(&Bytes::from(encode(Lsn(e), t, r))).unwrap();
            prop_assert_eq!(msg, ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(e), send_time: t, reply_requested: r,
            });
        }
    }
}

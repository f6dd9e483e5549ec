//! XLogData (`w`): a chunk of decoded WAL, here one pgoutput message.
//!
//! Layout inside CopyData: `'w'`, Int64 WAL start, Int64 WAL end (the server's current end of
//! WAL, not the end of this record), Int64 send time (µs since 2000-01-01), then the payload.

use bytes::Bytes;

use super::{Lsn, ProtocolError, ReplicationMessage};

/// CopyData sub-tag of XLogData.
pub const TAG: u8 = b'w';

/// Header length: tag + three Int64.
pub const HEADER_LEN: usize = 1 + 8 + 8 + 8;

/// Parses a CopyData body starting with `'w'`. The payload shares `body`'s allocation.
pub fn parse(body: Bytes) -> Result<ReplicationMessage, ProtocolError> {
    if body.len() < HEADER_LEN || body[0] != TAG {
        return Err(ProtocolError::Protocol(format!(
            "malformed XLogData: {} bytes, need at least {HEADER_LEN} starting with 'w'",
            body.len()
        )));
    }
    let wal_start = Lsn(read_u64(&body[1..9]));
    let wal_end = Lsn(read_u64(&body[9..17]));
    let send_time = read_u64(&body[17..25]) as i64;
    Ok(ReplicationMessage::XLogData {
        wal_start,
        wal_end,
        send_time,
        data: body.slice(HEADER_LEN..),
    })
}

/// Big-endian u64 from exactly 8 bytes.
pub(crate) fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

/// Encodes an XLogData CopyData body (the server's side; used by tests and fakes).
#[cfg(test)]
pub fn encode(wal_start: Lsn, wal_end: Lsn, send_time: i64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + data.len());
    v.push(TAG);
    v.extend_from_slice(&wal_start.0.to_be_bytes());
    v.extend_from_slice(&wal_end.0.to_be_bytes());
    v.extend_from_slice(&send_time.to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let body = encode(Lsn(0x1_0000_0010), Lsn(0x1_0000_0100), 42, b"B rest");
        let msg = parse(Bytes::from(body)).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x1_0000_0010),
                wal_end: Lsn(0x1_0000_0100),
                send_time: 42,
                data: Bytes::from_static(b"B rest"),
            }
        );
    }

    #[test]
    fn empty_payload_is_allowed_short_header_is_not() {
        assert!(parse(Bytes::from(encode(Lsn(1), Lsn(2), 3, b""))).is_ok());
        let mut short = encode(Lsn(1), Lsn(2), 3, b"");
        short.pop();
        assert!(matches!(
            parse(Bytes::from(short)),
            Err(ProtocolError::Protocol(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse(Bytes::from(bytes));
        }

        #[test]
        fn round_trips(s in any::<u64>(), e in any::<u64>(), t in any::<i64>(),
                       data in proptest::collection::vec(any::<u8>(), 0..40)) {
            let msg = parse(Bytes::from(encode(Lsn(s), Lsn(e), t, &data))).unwrap();
            prop_assert_eq!(msg, ReplicationMessage::XLogData {
                wal_start: Lsn(s), wal_end: Lsn(e), send_time: t, data: Bytes::from(data),
            });
        }
    }
}

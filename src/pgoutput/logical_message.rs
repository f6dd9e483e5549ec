//! Message: an application's `pg_logical_emit_message()` payload, sent when the subscriber
//! asked for `messages`.

use bytes::{BufMut, Bytes};

use super::error::DecodeError;
use super::wire::{Reader, put_cstring, put_length_prefixed, put_streamed_xid};
use crate::lsn::Lsn;

/// The only defined bit of the flags byte.
const FLAG_TRANSACTIONAL: u8 = 1;

/// A payload written to WAL with `pg_logical_emit_message(transactional, prefix, content)`.
///
/// A transactional message arrives inside its transaction's Begin/Commit (or stream) and only if
/// that transaction commits; a non-transactional one arrives on its own, outside any
/// transaction, as soon as it is decoded, even if its transaction later aborts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Inside a stream chunk, the xid of the (sub)transaction it belongs to (not always the
    /// top-level xid of the Stream Start); `None` outside streaming.
    pub xid: Option<u32>,
    /// Whether the message is part of its transaction.
    pub transactional: bool,
    /// The LSN of the message's WAL record.
    pub lsn: Lsn,
    /// The prefix the emitter chose to identify its messages.
    pub prefix: String,
    /// The payload, as bytes; a zero-copy slice of the decoded message.
    pub content: Bytes,
}

impl LogicalMessage {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        let xid = r.streamed_xid(in_streamed_transaction)?;
        let flags_offset = r.offset();
        let flags = r.u8("flags")?;
        if flags & !FLAG_TRANSACTIONAL != 0 {
            // This type has no raw flags field, so an unknown bit would be lost: refuse it.
            return Err(DecodeError::UnknownFlags {
                message: r.message(),
                field: "flags",
                offset: flags_offset,
                value: flags,
            });
        }
        Ok(LogicalMessage {
            xid,
            transactional: flags & FLAG_TRANSACTIONAL != 0,
            lsn: r.lsn("lsn")?,
            prefix: r.cstring("prefix")?,
            content: r.length_prefixed("content")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_streamed_xid(out, self.xid);
        out.put_u8(if self.transactional {
            FLAG_TRANSACTIONAL
        } else {
            0
        });
        out.put_u64(self.lsn.0);
        put_cstring(out, &self.prefix);
        put_length_prefixed(out, &self.content);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{V1, V2_STREAMED, assert_round_trip};
    use super::super::{Message, decode};
    use super::*;

    #[test]
    fn logical_message_round_trips() {
        let message = LogicalMessage {
            xid: None,
            transactional: true,
            lsn: Lsn(0x10),
            prefix: "pgduplex".into(),
            content: Bytes::from_static(b"\0\xff"),
        };
        let wire = assert_round_trip(&Message::LogicalMessage(message.clone()), &V1);
        assert_eq!(wire, b"M\x01\0\0\0\0\0\0\0\x10pgduplex\0\0\0\0\x02\0\xff");
        let message = LogicalMessage {
            xid: Some(8),
            transactional: false,
            ..message
        };
        assert_round_trip(&Message::LogicalMessage(message), &V2_STREAMED);
    }

    #[test]
    fn rejects_unknown_flags() {
        let data = Bytes::from_static(b"M\x02\0\0\0\0\0\0\0\x10p\0\0\0\0\0");
        assert_eq!(
            decode(&data, &V1),
            Err(DecodeError::UnknownFlags {
                message: "Message",
                field: "flags",
                offset: 1,
                value: 2
            })
        );
    }
}

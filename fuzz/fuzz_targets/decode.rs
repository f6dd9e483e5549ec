//! Feeds arbitrary bytes to `pgoutput::decode` under every protocol version and streaming
//! state, and what decodes to a `RelationCache`, the way the pipeline consumes a stream.
//!
//! The decoder must never panic. Whatever it accepts must survive a round trip: encoding the
//! decoded message and decoding it again gives the same message (the bytes may differ, e.g. a
//! "pg_catalog" namespace is sent as "").
//!
//! Input layout: byte 0 chooses the context (bits 0-2: protocol version, with 0 and 5-7 to
//! exercise refused versions; bit 3: start inside a streamed transaction). The rest is a
//! sequence of messages, each prefixed by a big-endian u16 length (a short last one is cut).
//! Stream Start and Stream Stop switch the streaming state for the messages that follow, as a
//! real consumer does.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgduplex::pgoutput::{DecodeContext, Message, RelationCache, decode, encode};

fuzz_target!(|input: &[u8]| {
    let Some((&selector, mut rest)) = input.split_first() else {
        return;
    };
    let mut ctx = DecodeContext {
        protocol_version: u32::from(selector & 0b111),
        in_streamed_transaction: selector & 0b1000 != 0,
    };
    let mut cache = RelationCache::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        let Ok(decoded) = decode(&Bytes::copy_from_slice(message), &ctx) else {
            continue;
        };

        let again = decode(&Bytes::from(encode(&decoded, &ctx)), &ctx);
        assert_eq!(
            again.as_ref(),
            Ok(&decoded),
            "re-encoding changed the message"
        );

        match decoded {
            Message::StreamStart(_) => ctx.in_streamed_transaction = true,
            Message::StreamStop => ctx.in_streamed_transaction = false,
            Message::Relation(relation) => {
                let oid = relation.oid;
                cache.update(relation.clone());
                assert_eq!(cache.get(oid), Some(&relation), "the latest Relation wins");
            }
            Message::Insert(insert) => {
                let _ = cache.resolve(insert.relation_oid, &insert.new);
            }
            Message::Update(update) => {
                let _ = cache.resolve(update.relation_oid, &update.new);
            }
            Message::Delete(delete) => {
                if let Some(old) = delete.old_key.as_ref().or(delete.old_row.as_ref()) {
                    let _ = cache.resolve(delete.relation_oid, old);
                }
            }
            _ => {}
        }
    }
});

//! Decoding of pgoutput, the logical replication output plugin's binary messages.
//!
//! This module is pure: [`decode`] turns the payload of one `XLogData` frame into one typed
//! [`Message`], and knows nothing of sockets, tasks or time. It never panics on input: every
//! read is bounds-checked, lengths and counts are validated against the bytes that remain
//! before anything is allocated for them, and bytes left over after a complete message are an
//! error ([`DecodeError::TrailingBytes`]), because they mean the decoder and the server disagree
//! on the format. Column values and logical message payloads are zero-copy slices of the input
//! [`Bytes`]; names become owned `String`s.
//!
//! # The stream
//!
//! Each message is one tag byte followed by big-endian fields; strings are NUL-terminated and
//! byte strings carry a signed 32-bit length. A session of a slot carries, in commit order:
//!
//! ```text
//! Begin [Origin] { Relation | Type | Insert | Update | Delete | Truncate | Message }* Commit
//! Message                       (non-transactional, outside any transaction)
//! ```
//!
//! * The server decodes a transaction when it commits, so [`Begin::final_lsn`] is already the
//!   commit's LSN and must equal the closing [`Commit::commit_lsn`]; a change outside
//!   Begin/Commit is a protocol error. Checking this sequencing is the pipeline's job: `decode`
//!   looks at one message at a time.
//! * A [`Relation`] message precedes the first change of a table in a session and follows every
//!   change to its schema. Tuples are positional against the latest one, so keep a
//!   [`RelationCache`] and let every Relation message replace its entry. It may also repeat
//!   unchanged (the server resends it after any invalidation of its cache, e.g. a TRUNCATE), so
//!   compare columns before treating it as a schema change. A [`TypeMessage`] names each
//!   non-builtin column type before the Relation that uses it.
//! * A tuple column is NULL, text, binary, or [`ColumnValue::UnchangedToast`]: an out-of-line
//!   value the change did not touch and the server did not send. It is "keep the current
//!   value", never NULL.
//! * Updates carry the old key (`K`, when the replica identity columns changed) or, under
//!   REPLICA IDENTITY FULL, the old row (`O`); deletes always carry one of them.
//! * Timestamps are microseconds since 2000-01-01 00:00 UTC; LSNs are [`Lsn`]s.
//! * Namespace names of `pg_catalog` are sent as ""; decoding restores `"pg_catalog"`.
//! * Names are sent in the database's encoding; decoding requires UTF-8 and otherwise fails
//!   with [`DecodeError::InvalidUtf8`]. Text column values are passed through unchecked.
//!
//! # Protocol versions
//!
//! | version | server | adds |
//! |---|---|---|
//! | 1 | 10+ | the messages above (Message, with the `messages` option, since 14) |
//! | 2 | 14+ | streaming: Stream Start/Stop/Commit/Abort; an xid on messages inside chunks |
//! | 3 | 15+ | two-phase: Begin Prepare, Prepare, Commit/Rollback Prepared, Stream Prepare |
//! | 4 | 16+ | Stream Abort's abort LSN and time, only with `streaming = parallel` |
//!
//! The xid of streamed changes is not announced by the message itself: it is present exactly
//! between Stream Start and Stream Stop, which the caller tracks and passes as
//! [`DecodeContext::in_streamed_transaction`]. It is the xid of the subtransaction that made
//! the change, not necessarily the Stream Start's top-level xid: that is what lets a Stream
//! Abort with a `subxid` discard one rolled-back savepoint's changes. A tag from a later
//! version than [`DecodeContext::protocol_version`] is rejected. Whether Stream Abort carries
//! the protocol-4 fields depends on a subscription option, not the version, so it is read from
//! the message's length.
//!
//! pgduplex does not yet request streaming (aborted subtransactions and the pairing of data
//! and version rows then span chunks), but decodes everything so that a server sending it is
//! reported precisely rather than misread.

mod change;
mod error;
mod logical_message;
mod relation;
mod relation_cache;
mod streaming;
mod transaction;
mod tuple;
mod two_phase;
mod wire;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod proptests;

use bytes::{BufMut, Bytes};

pub use self::change::{Delete, Insert, Truncate, Update};
pub use self::error::DecodeError;
pub use self::logical_message::LogicalMessage;
pub use self::relation::{Relation, RelationColumn, ReplicaIdentity, TypeMessage};
pub use self::relation_cache::{RelationCache, SchemaError};
pub use self::streaming::{StreamAbort, StreamCommit, StreamStart};
pub use self::transaction::{Begin, Commit, Origin};
pub use self::tuple::{ColumnValue, TupleData};
pub use self::two_phase::{BeginPrepare, CommitPrepared, Prepare, RollbackPrepared, StreamPrepare};
use self::wire::Reader;
pub use crate::lsn::Lsn;

/// What the decoder must know about the stream that the message bytes do not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeContext {
    /// The `proto_version` negotiated in START_REPLICATION, 1 to 4: it decides which messages
    /// may appear.
    pub protocol_version: u32,
    /// Whether a Stream Start has been received without its Stream Stop: messages that carry a
    /// streamed transaction's xid carry it only then. Always false under protocol 1.
    pub in_streamed_transaction: bool,
}

impl DecodeContext {
    /// The newest protocol version this decoder understands.
    pub const MAX_PROTOCOL_VERSION: u32 = 4;

    /// A context for `protocol_version`, outside any streamed transaction.
    pub fn new(protocol_version: u32) -> Self {
        DecodeContext {
            protocol_version,
            in_streamed_transaction: false,
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let protocol_version = self.protocol_version;
        if !(1..=Self::MAX_PROTOCOL_VERSION).contains(&protocol_version) {
            return Err(DecodeError::UnsupportedProtocolVersion { protocol_version });
        }
        if self.in_streamed_transaction && protocol_version < 2 {
            return Err(DecodeError::StreamingNotInProtocolVersion { protocol_version });
        }
        Ok(())
    }
}

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the transaction was replayed from another node.
    Origin(Origin),
    /// `R`: a table's columns.
    Relation(Relation),
    /// `Y`: a non-builtin type's name.
    Type(TypeMessage),
    /// `I`: a row inserted.
    Insert(Insert),
    /// `U`: a row updated.
    Update(Update),
    /// `D`: a row deleted.
    Delete(Delete),
    /// `T`: tables truncated.
    Truncate(Truncate),
    /// `M`: a `pg_logical_emit_message` payload.
    LogicalMessage(LogicalMessage),
    /// `S`: a chunk of a streamed transaction starts (protocol 2+).
    StreamStart(StreamStart),
    /// `E`: the current stream chunk ends (protocol 2+).
    StreamStop,
    /// `c`: a streamed transaction commits (protocol 2+).
    StreamCommit(StreamCommit),
    /// `A`: a streamed transaction or subtransaction aborts (protocol 2+).
    StreamAbort(StreamAbort),
    /// `b`: a prepared transaction's changes start (protocol 3+).
    BeginPrepare(BeginPrepare),
    /// `P`: the transaction is prepared (protocol 3+).
    Prepare(Prepare),
    /// `K`: a prepared transaction commits (protocol 3+).
    CommitPrepared(CommitPrepared),
    /// `r`: a prepared transaction is rolled back (protocol 3+).
    RollbackPrepared(RollbackPrepared),
    /// `p`: a streamed transaction is prepared (protocol 3+).
    StreamPrepare(StreamPrepare),
}

/// Tag bytes, as in PostgreSQL's `LogicalRepMsgType`.
mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    pub const STREAM_START: u8 = b'S';
    pub const STREAM_STOP: u8 = b'E';
    pub const STREAM_COMMIT: u8 = b'c';
    pub const STREAM_ABORT: u8 = b'A';
    pub const BEGIN_PREPARE: u8 = b'b';
    pub const PREPARE: u8 = b'P';
    pub const COMMIT_PREPARED: u8 = b'K';
    pub const ROLLBACK_PREPARED: u8 = b'r';
    pub const STREAM_PREPARE: u8 = b'p';
}

/// The message name (as in PostgreSQL's documentation) and the first protocol version that has
/// it, for a known tag.
fn describe(tag: u8) -> Option<(&'static str, u32)> {
    Some(match tag {
        tag::BEGIN => ("Begin", 1),
        tag::COMMIT => ("Commit", 1),
        tag::ORIGIN => ("Origin", 1),
        tag::RELATION => ("Relation", 1),
        tag::TYPE => ("Type", 1),
        tag::INSERT => ("Insert", 1),
        tag::UPDATE => ("Update", 1),
        tag::DELETE => ("Delete", 1),
        tag::TRUNCATE => ("Truncate", 1),
        tag::MESSAGE => ("Message", 1),
        tag::STREAM_START => ("Stream Start", 2),
        tag::STREAM_STOP => ("Stream Stop", 2),
        tag::STREAM_COMMIT => ("Stream Commit", 2),
        tag::STREAM_ABORT => ("Stream Abort", 2),
        tag::BEGIN_PREPARE => ("Begin Prepare", 3),
        tag::PREPARE => ("Prepare", 3),
        tag::COMMIT_PREPARED => ("Commit Prepared", 3),
        tag::ROLLBACK_PREPARED => ("Rollback Prepared", 3),
        tag::STREAM_PREPARE => ("Stream Prepare", 3),
        _ => return None,
    })
}

impl Message {
    /// The tag byte that starts this message on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => tag::BEGIN,
            Message::Commit(_) => tag::COMMIT,
            Message::Origin(_) => tag::ORIGIN,
            Message::Relation(_) => tag::RELATION,
            Message::Type(_) => tag::TYPE,
            Message::Insert(_) => tag::INSERT,
            Message::Update(_) => tag::UPDATE,
            Message::Delete(_) => tag::DELETE,
            Message::Truncate(_) => tag::TRUNCATE,
            Message::LogicalMessage(_) => tag::MESSAGE,
            Message::StreamStart(_) => tag::STREAM_START,
            Message::StreamStop => tag::STREAM_STOP,
            Message::StreamCommit(_) => tag::STREAM_COMMIT,
            Message::StreamAbort(_) => tag::STREAM_ABORT,
            Message::BeginPrepare(_) => tag::BEGIN_PREPARE,
            Message::Prepare(_) => tag::PREPARE,
            Message::CommitPrepared(_) => tag::COMMIT_PREPARED,
            Message::RollbackPrepared(_) => tag::ROLLBACK_PREPARED,
            Message::StreamPrepare(_) => tag::STREAM_PREPARE,
        }
    }

    /// The message's name as PostgreSQL's documentation spells it, for logs and errors.
    pub fn name(&self) -> &'static str {
        describe(self.tag()).map_or("Unknown", |(name, _)| name)
    }

    /// For the messages that carry a streamed transaction's xid inside stream chunks: that
    /// field. `None` for the others.
    fn streamed_xid_field(&self) -> Option<Option<u32>> {
        match self {
            Message::Relation(m) => Some(m.xid),
            Message::Type(m) => Some(m.xid),
            Message::Insert(m) => Some(m.xid),
            Message::Update(m) => Some(m.xid),
            Message::Delete(m) => Some(m.xid),
            Message::Truncate(m) => Some(m.xid),
            Message::LogicalMessage(m) => Some(m.xid),
            _ => None,
        }
    }
}

/// Decodes one pgoutput message: the whole payload of one `XLogData` frame.
///
/// Fails, never panics, on malformed input, on a tag the context's protocol version does not
/// have, and on bytes left over after the message. Column values and logical message content
/// in the result are slices of `data`.
pub fn decode(data: &Bytes, ctx: &DecodeContext) -> Result<Message, DecodeError> {
    ctx.validate()?;
    let Some(&tag) = data.first() else {
        return Err(DecodeError::Truncated {
            message: "pgoutput",
            field: "tag",
            offset: 0,
            needed: 1,
            available: 0,
        });
    };
    let (name, min_version) = describe(tag).ok_or(DecodeError::UnknownTag { tag })?;
    if ctx.protocol_version < min_version {
        return Err(DecodeError::TagNotInProtocolVersion {
            message: name,
            tag,
            min_version,
            protocol_version: ctx.protocol_version,
        });
    }
    let mut r = Reader::new(data, 1, name);
    let streamed = ctx.in_streamed_transaction;
    let message = match tag {
        tag::BEGIN => Message::Begin(Begin::decode(&mut r)?),
        tag::COMMIT => Message::Commit(Commit::decode(&mut r)?),
        tag::ORIGIN => Message::Origin(Origin::decode(&mut r)?),
        tag::RELATION => Message::Relation(Relation::decode(&mut r, streamed)?),
        tag::TYPE => Message::Type(TypeMessage::decode(&mut r, streamed)?),
        tag::INSERT => Message::Insert(Insert::decode(&mut r, streamed)?),
        tag::UPDATE => Message::Update(Update::decode(&mut r, streamed)?),
        tag::DELETE => Message::Delete(Delete::decode(&mut r, streamed)?),
        tag::TRUNCATE => Message::Truncate(Truncate::decode(&mut r, streamed)?),
        tag::MESSAGE => Message::LogicalMessage(LogicalMessage::decode(&mut r, streamed)?),
        tag::STREAM_START => Message::StreamStart(StreamStart::decode(&mut r)?),
        tag::STREAM_STOP => Message::StreamStop,
        tag::STREAM_COMMIT => Message::StreamCommit(StreamCommit::decode(&mut r)?),
        tag::STREAM_ABORT => {
            Message::StreamAbort(StreamAbort::decode(&mut r, ctx.protocol_version)?)
        }
        tag::BEGIN_PREPARE => Message::BeginPrepare(BeginPrepare::decode(&mut r)?),
        tag::PREPARE => Message::Prepare(Prepare::decode(&mut r)?),
        tag::COMMIT_PREPARED => Message::CommitPrepared(CommitPrepared::decode(&mut r)?),
        tag::ROLLBACK_PREPARED => Message::RollbackPrepared(RollbackPrepared::decode(&mut r)?),
        tag::STREAM_PREPARE => Message::StreamPrepare(StreamPrepare::decode(&mut r)?),
        // `describe` knows exactly the tags matched above.
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(message)
}

/// Encodes `message` as the server would send it under `ctx`, so that
/// `decode(&encode(m, ctx).into(), ctx) == Ok(m)`.
///
/// pgduplex never sends pgoutput; this exists for round-trip tests, the fuzz target, and tests
/// elsewhere that need realistic input for the pipeline.
///
/// # Panics
/// If the message cannot be expressed under `ctx`, a bug in the caller that built it: a tag the
/// protocol version lacks; a streamed xid present outside a streamed transaction, or missing
/// inside one; Stream Abort's protocol-4 fields before version 4 or only one of them; an Update
/// with both old tuples or a Delete with not exactly one; a string containing NUL; a count or
/// length the format cannot carry.
pub fn encode(message: &Message, ctx: &DecodeContext) -> Vec<u8> {
    if let Err(err) = ctx.validate() {
        panic!("cannot encode under {ctx:?}: {err}");
    }
    let (name, min_version) = describe(message.tag()).unwrap_or(("Unknown", 1));
    assert!(
        ctx.protocol_version >= min_version,
        "{name} needs protocol version {min_version}, context has {}",
        ctx.protocol_version
    );
    if let Some(xid) = message.streamed_xid_field() {
        assert_eq!(
            xid.is_some(),
            ctx.in_streamed_transaction,
            "{name} must carry an xid exactly inside a streamed transaction"
        );
    }
    let mut out = Vec::new();
    out.put_u8(message.tag());
    match message {
        Message::Begin(m) => m.encode(&mut out),
        Message::Commit(m) => m.encode(&mut out),
        Message::Origin(m) => m.encode(&mut out),
        Message::Relation(m) => m.encode(&mut out),
        Message::Type(m) => m.encode(&mut out),
        Message::Insert(m) => m.encode(&mut out),
        Message::Update(m) => m.encode(&mut out),
        Message::Delete(m) => m.encode(&mut out),
        Message::Truncate(m) => m.encode(&mut out),
        Message::LogicalMessage(m) => m.encode(&mut out),
        Message::StreamStart(m) => m.encode(&mut out),
        Message::StreamStop => {}
        Message::StreamCommit(m) => m.encode(&mut out),
        Message::StreamAbort(m) => {
            assert!(
                ctx.protocol_version >= 4 || m.abort_lsn.is_none(),
                "Stream Abort's abort_lsn and abort_time need protocol version 4"
            );
            m.encode(&mut out)
        }
        Message::BeginPrepare(m) => m.encode(&mut out),
        Message::Prepare(m) => m.encode(&mut out),
        Message::CommitPrepared(m) => m.encode(&mut out),
        Message::RollbackPrepared(m) => m.encode(&mut out),
        Message::StreamPrepare(m) => m.encode(&mut out),
    }
    out
}

/// Helpers shared by the unit tests of the message files.
#[cfg(test)]
mod testing {
    use super::*;

    pub const V1: DecodeContext = DecodeContext {
        protocol_version: 1,
        in_streamed_transaction: false,
    };
    pub const V2: DecodeContext = DecodeContext {
        protocol_version: 2,
        in_streamed_transaction: false,
    };
    pub const V2_STREAMED: DecodeContext = DecodeContext {
        protocol_version: 2,
        in_streamed_transaction: true,
    };
    pub const V3: DecodeContext = DecodeContext {
        protocol_version: 3,
        in_streamed_transaction: false,
    };
    pub const V4: DecodeContext = DecodeContext {
        protocol_version: 4,
        in_streamed_transaction: false,
    };

    /// Encodes `message`, checks it decodes back to itself, that every strict prefix of the
    /// encoding fails to decode (and one extra byte is rejected as trailing), and returns the
    /// encoding.
    pub fn assert_round_trip(message: &Message, ctx: &DecodeContext) -> Vec<u8> {
        let wire = encode(message, ctx);
        let data = Bytes::from(wire.clone());
        assert_eq!(
            decode(&data, ctx).as_ref(),
            Ok(message),
            "round trip of {wire:02x?}"
        );
        for len in 0..wire.len() {
            if let Ok(shorter) = decode(&data.slice(..len), ctx) {
                // The one message whose prefix is also a message: Stream Abort without the
                // protocol-4 fields.
                assert!(
                    matches!(
                        shorter,
                        Message::StreamAbort(StreamAbort {
                            abort_lsn: None,
                            ..
                        })
                    ) && len == 9,
                    "prefix of {len} bytes of {message:?} decoded as {shorter:?}"
                );
            }
        }
        let mut longer = wire.clone();
        longer.push(0);
        // (Under protocol 4 a Stream Abort's extra byte reads as a truncated abort_lsn instead.)
        assert!(
            decode(&Bytes::from(longer), ctx).is_err(),
            "trailing byte after {message:?}"
        );
        wire
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn rejects_empty_input() {
        assert!(matches!(
            decode(&Bytes::new(), &V1),
            Err(DecodeError::Truncated {
                field: "tag",
                offset: 0,
                ..
            })
        ));
    }

    #[test]
    fn rejects_unknown_tags() {
        for tag in [0u8, b'X', b'Z', b'a', 0xff] {
            assert_eq!(
                decode(&Bytes::from(vec![tag, 0, 0]), &V4),
                Err(DecodeError::UnknownTag { tag })
            );
        }
    }

    #[test]
    fn rejects_tags_from_later_protocol_versions() {
        let err = decode(&Bytes::from_static(b"E"), &V1).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TagNotInProtocolVersion {
                message: "Stream Stop",
                tag: b'E',
                min_version: 2,
                protocol_version: 1
            }
        );
        assert!(matches!(
            decode(&Bytes::from_static(b"K"), &V2),
            Err(DecodeError::TagNotInProtocolVersion {
                message: "Commit Prepared",
                min_version: 3,
                ..
            })
        ));
        assert_eq!(
            decode(&Bytes::from_static(b"E"), &V2),
            Ok(Message::StreamStop)
        );
    }

    #[test]
    fn rejects_impossible_contexts() {
        let stop = Bytes::from_static(b"E");
        for protocol_version in [0, 5, u32::MAX] {
            let ctx = DecodeContext::new(protocol_version);
            assert_eq!(
                decode(&stop, &ctx),
                Err(DecodeError::UnsupportedProtocolVersion { protocol_version })
            );
        }
        let ctx = DecodeContext {
            protocol_version: 1,
            in_streamed_transaction: true,
        };
        assert_eq!(
            decode(&stop, &ctx),
            Err(DecodeError::StreamingNotInProtocolVersion {
                protocol_version: 1
            })
        );
    }

    #[test]
    fn streamed_xid_presence_follows_the_context() {
        // The same bytes mean different things inside and outside a stream chunk.
        let data = Bytes::from_static(b"I\0\0\0\x09\0\0\0\x07N\0\0");
        let inside = decode(&data, &V2_STREAMED).unwrap();
        assert_eq!(
            inside,
            Message::Insert(Insert {
                xid: Some(9),
                relation_oid: 7,
                new: TupleData::default()
            })
        );
        assert!(matches!(
            decode(&data, &V2),
            Err(DecodeError::UnexpectedTupleMarker {
                found: 0,
                offset: 5,
                ..
            })
        ));
    }

    #[test]
    fn names_follow_the_documentation() {
        assert_eq!(Message::StreamStop.name(), "Stream Stop");
        assert_eq!(Message::StreamStop.tag(), b'E');
    }
}

//! Why a pgoutput message could not be decoded, and where in the message it went wrong.

/// A pgoutput message that does not decode.
///
/// Every variant names the message being decoded and the byte offset of the problem, counted
/// from the message's tag byte (offset 0), so a report can be matched against a hex dump of
/// the `XLogData` payload. Decoding is a pure function of the bytes: the same input fails the
/// same way every time, so none of these is worth retrying (see [`DecodeError::is_retryable`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field did.
    #[error(
        "truncated {message} message: field `{field}` needs {needed} bytes at offset {offset}, \
         only {available} left"
    )]
    Truncated {
        /// The message being decoded, e.g. "Insert".
        message: &'static str,
        /// The field that did not fit.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message at `offset`.
        available: usize,
    },

    /// The first byte is not a pgoutput message tag.
    #[error("unknown pgoutput message tag {tag:#04x} ({}) at offset 0", printable(*tag))]
    UnknownTag {
        /// The byte found where the tag should be.
        tag: u8,
    },

    /// The tag exists, but only in a later protocol version than the one negotiated.
    #[error(
        "{message} message (tag {}) needs pgoutput protocol version {min_version} or later, \
         but the stream uses version {protocol_version}",
        printable(*tag)
    )]
    TagNotInProtocolVersion {
        /// The message the tag stands for.
        message: &'static str,
        /// Its tag byte.
        tag: u8,
        /// The first protocol version that has it.
        min_version: u32,
        /// The version in the decode context.
        protocol_version: u32,
    },

    /// The decode context names a protocol version this decoder does not know.
    #[error("pgoutput protocol version {protocol_version} is not supported (1 to 4 are)")]
    UnsupportedProtocolVersion {
        /// The version in the decode context.
        protocol_version: u32,
    },

    /// The decode context says a streamed transaction is open, which protocol 1 cannot have.
    #[error(
        "decode context says a streamed transaction is open, but pgoutput protocol version \
         {protocol_version} has no streaming (it needs version 2 or later)"
    )]
    StreamingNotInProtocolVersion {
        /// The version in the decode context.
        protocol_version: u32,
    },

    /// A tuple column's kind byte is not one of `n`, `u`, `t`, `b`.
    #[error(
        "{message} message: unknown tuple column kind {kind:#04x} ({}) at offset {offset}, \
         expected 'n', 'u', 't' or 'b'",
        printable(*kind)
    )]
    UnknownTupleKind {
        /// The message being decoded.
        message: &'static str,
        /// The byte found.
        kind: u8,
        /// Where it was found.
        offset: usize,
    },

    /// The byte announcing which tuple follows (`N`, `K`, `O`) is not one allowed here.
    #[error(
        "{message} message: unexpected tuple marker {found:#04x} ({}) at offset {offset}, \
         expected {expected}",
        printable(*found)
    )]
    UnexpectedTupleMarker {
        /// The message being decoded.
        message: &'static str,
        /// The markers allowed at this point, e.g. "'K' or 'O'".
        expected: &'static str,
        /// The byte found.
        found: u8,
        /// Where it was found.
        offset: usize,
    },

    /// A Relation message's replica identity byte is not one of `d`, `n`, `f`, `i`.
    #[error(
        "Relation message: unknown replica identity {found:#04x} ({}) at offset {offset}, \
         expected 'd', 'n', 'f' or 'i'",
        printable(*found)
    )]
    UnknownReplicaIdentity {
        /// The byte found.
        found: u8,
        /// Where it was found.
        offset: usize,
    },

    /// A string field has no terminating NUL before the message ends.
    #[error("{message} message: string field `{field}` at offset {offset} is not NUL-terminated")]
    NotNulTerminated {
        /// The message being decoded.
        message: &'static str,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },

    /// A string field is not UTF-8 (pgduplex requires UTF8 databases).
    #[error(
        "{message} message: string field `{field}` at offset {offset} is not valid UTF-8 \
         (first bad byte at offset {bad_byte_offset}); pgduplex requires databases with \
         UTF8 server encoding"
    )]
    InvalidUtf8 {
        /// The message being decoded.
        message: &'static str,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
        /// Where the first invalid byte is.
        bad_byte_offset: usize,
    },

    /// A length or count field is negative.
    #[error("{message} message: field `{field}` at offset {offset} is negative ({value})")]
    NegativeLength {
        /// The message being decoded.
        message: &'static str,
        /// The length or count field.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// The value read.
        value: i32,
    },

    /// A flags byte has bits this decoder does not know, and the message type keeps no raw
    /// flags to carry them, so accepting it would silently drop information.
    #[error(
        "{message} message: field `{field}` at offset {offset} has unknown bits set ({value:#04x})"
    )]
    UnknownFlags {
        /// The message being decoded.
        message: &'static str,
        /// The flags field.
        field: &'static str,
        /// Where the field is.
        offset: usize,
        /// The byte read.
        value: u8,
    },

    /// A boolean byte is neither 0 nor 1.
    #[error("{message} message: field `{field}` at offset {offset} is {value}, expected 0 or 1")]
    InvalidBool {
        /// The message being decoded.
        message: &'static str,
        /// The boolean field.
        field: &'static str,
        /// Where the field is.
        offset: usize,
        /// The byte read.
        value: u8,
    },

    /// Bytes remain after a complete message: the decoder and the server disagree on the format.
    #[error("{message} message: {count} unexpected trailing bytes at offset {offset}")]
    TrailingBytes {
        /// The message decoded.
        message: &'static str,
        /// Where the complete message ended.
        offset: usize,
        /// How many bytes follow it.
        count: usize,
    },
}

impl DecodeError {
    /// Whether decoding the same bytes again could succeed: never, because decoding is a pure
    /// function of its input. The pipeline uses this to stop (and report the offending message)
    /// instead of reconnecting and receiving the same message again.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// The byte offset of the problem, counted from the message's tag byte, when the problem is
    /// at a position in the message (context errors have none).
    pub fn offset(&self) -> Option<usize> {
        match self {
            DecodeError::Truncated { offset, .. }
            | DecodeError::UnknownTupleKind { offset, .. }
            | DecodeError::UnexpectedTupleMarker { offset, .. }
            | DecodeError::UnknownReplicaIdentity { offset, .. }
            | DecodeError::NotNulTerminated { offset, .. }
            | DecodeError::InvalidUtf8 { offset, .. }
            | DecodeError::NegativeLength { offset, .. }
            | DecodeError::UnknownFlags { offset, .. }
            | DecodeError::InvalidBool { offset, .. }
            | DecodeError::TrailingBytes { offset, .. } => Some(*offset),
            DecodeError::UnknownTag { .. } | DecodeError::TagNotInProtocolVersion { .. } => Some(0),
            DecodeError::UnsupportedProtocolVersion { .. }
            | DecodeError::StreamingNotInProtocolVersion { .. } => None,
        }
    }
}

/// Shows a byte as `'c'` when it is printable ASCII, for error messages about tags and markers.
fn printable(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        "not printable".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_byte_and_offset() {
        let err = DecodeError::UnknownTupleKind {
            message: "Insert",
            kind: b'x',
            offset: 9,
        };
        assert_eq!(
            err.to_string(),
            "Insert message: unknown tuple column kind 0x78 ('x') at offset 9, expected 'n', \
             'u', 't' or 'b'"
        );
        assert_eq!(err.offset(), Some(9));
        assert!(!err.is_retryable());
        let err = DecodeError::UnknownTag { tag: 0 };
        assert_eq!(
            err.to_string(),
            "unknown pgoutput message tag 0x00 (not printable) at offset 0"
        );
    }
}

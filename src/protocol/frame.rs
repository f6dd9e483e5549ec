//! Splitting backend messages off the read buffer, and decoding the bodies we need by hand.
//!
//! Pure functions over `BytesMut`/`&[u8]`: no I/O, so the framing can be tested (and fuzzed)
//! without a server. A frame is `tag: u8, len: i32 (counts itself, not the tag), body`.
//! [`split_message`] only takes a frame off the buffer once it is complete, so a reader that is
//! cancelled between two socket reads loses nothing: the partial frame stays buffered.

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, ErrorResponseBody, Message};
use tokio_postgres::fallible_iterator::FallibleIterator;

use super::ProtocolError;

/// Largest frame length (the length field, which counts itself) we accept.
///
/// PostgreSQL builds a logical decoding message in one palloc'd buffer, which cannot exceed
/// 1 GiB - 1 (`MaxAllocSize`); the XLogData header and the length field add a few bytes more.
/// Anything larger is a corrupted stream, and trusting it would let one bad length field make
/// us allocate without bound.
pub const MAX_FRAME_LEN: usize = (1 << 30) + 4096;

/// Tag of CopyBothResponse, which `postgres_protocol`'s parser does not know.
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// One backend message, as `postgres_protocol` parses it, plus the ones it does not know.
pub enum Backend {
    /// Anything `postgres_protocol::message::backend::Message::parse` understands.
    Message(Message),
    /// CopyBothResponse: the server switched to streaming replication (`START_REPLICATION`).
    CopyBothResponse,
}

/// How many more bytes the buffer needs before [`split_message`] can return a frame; `None`
/// when it may already hold one (or a frame header that is about to be rejected).
pub fn bytes_missing(buf: &[u8]) -> Option<usize> {
    if buf.len() < 5 {
        return Some(5 - buf.len());
    }
    let len = frame_len(buf)?;
    (buf.len() < len + 1).then(|| len + 1 - buf.len())
}

/// The frame length from a header, `None` if it is out of bounds (reported by [`split_message`]).
fn frame_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    (4..=MAX_FRAME_LEN).contains(&len).then_some(len)
}

/// Takes one complete backend message off the front of `buf`.
///
/// `Ok(None)`: the buffer holds no complete frame yet, and nothing was consumed.
/// `Err`: the frame is malformed (length < 4 or > [`MAX_FRAME_LEN`], unknown tag, bad body);
/// the connection cannot be used any further.
pub fn split_message(buf: &mut BytesMut) -> Result<Option<Backend>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_FRAME_LEN).contains(&len) {
        return Err(ProtocolError::Protocol(format!(
            "backend message {} has length {len}, outside 4..={MAX_FRAME_LEN}",
            tag_name(tag)
        )));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    if tag == COPY_BOTH_RESPONSE_TAG {
        let mut frame = buf.split_to(len + 1);
        frame.advance(5);
        check_copy_response_body(&frame)?;
        return Ok(Some(Backend::CopyBothResponse));
    }
    match Message::parse(buf) {
        Ok(Some(message)) => Ok(Some(Backend::Message(message))),
        Ok(None) => Err(ProtocolError::Protocol(format!(
            "backend message {} of length {len} was complete but not parsed",
            tag_name(tag)
        ))),
        Err(e) => Err(ProtocolError::Protocol(format!(
            "malformed backend message {}: {e}",
            tag_name(tag)
        ))),
    }
}

/// Checks a CopyBothResponse / CopyOutResponse body: overall format (Int8), column count
/// (Int16) and one Int16 format per column, nothing more.
fn check_copy_response_body(body: &[u8]) -> Result<(), ProtocolError> {
    let bad = |why: &str| ProtocolError::Protocol(format!("malformed CopyBothResponse: {why}"));
    if body.len() < 3 {
        return Err(bad("shorter than 3 bytes"));
    }
    let columns = i16::from_be_bytes([body[1], body[2]]);
    let columns = usize::try_from(columns).map_err(|_| bad("negative column count"))?;
    if body.len() != 3 + 2 * columns {
        return Err(bad("length does not match the column count"));
    }
    Ok(())
}

/// A tag for error messages: the character when printable, else its number.
pub fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// The fields of an ErrorResponse or NoticeResponse that we keep.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerNotice {
    /// Non-localized severity (`V`), else the localized one (`S`).
    pub severity: String,
    /// SQLSTATE (`C`).
    pub code: String,
    /// Primary message (`M`).
    pub message: String,
    /// Detail (`D`).
    pub detail: Option<String>,
    /// Hint (`H`).
    pub hint: Option<String>,
}

/// Reads the fields of an ErrorResponse/NoticeResponse body.
pub fn parse_fields(mut fields: ErrorFields<'_>) -> Result<ServerNotice, ProtocolError> {
    let mut notice = ServerNotice::default();
    let mut localized_severity = String::new();
    loop {
        let field = match fields.next() {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return Err(ProtocolError::Protocol(format!(
                    "malformed error/notice response: {e}"
                )));
            }
        };
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => notice.severity = value,
            b'S' => localized_severity = value,
            b'C' => notice.code = value,
            b'M' => notice.message = value,
            b'D' => notice.detail = Some(value),
            b'H' => notice.hint = Some(value),
            _ => {}
        }
    }
    if notice.severity.is_empty() {
        notice.severity = localized_severity;
    }
    Ok(notice)
}

/// Turns an ErrorResponse into [`ProtocolError::Server`].
pub fn server_error(body: &ErrorResponseBody) -> ProtocolError {
    match parse_fields(body.fields()) {
        Ok(n) => ProtocolError::Server {
            code: if n.code.is_empty() {
                "XX000".into()
            } else {
                n.code
            },
            message: n.message,
            detail: n.detail,
            hint: n.hint,
        },
        Err(e) => e,
    }
}

/// The columns of a DataRow as text (`None` for NULL). The connection asks for
/// `client_encoding=UTF8`, so non-UTF-8 text is a protocol violation.
pub fn data_row_text(body: &DataRowBody) -> Result<Vec<Option<String>>, ProtocolError> {
    let buffer = body.buffer();
    let mut ranges = body.ranges();
    let mut row = Vec::new();
    loop {
        match ranges.next() {
            Ok(Some(Some(range))) => {
                let bytes = buffer.get(range).ok_or_else(|| {
                    ProtocolError::Protocol("DataRow column outside the message".into())
                })?;
                let text = std::str::from_utf8(bytes).map_err(|e| {
                    ProtocolError::Protocol(format!("DataRow column is not UTF-8: {e}"))
                })?;
                row.push(Some(text.to_owned()));
            }
            Ok(Some(None)) => row.push(None),
            Ok(None) => return Ok(row),
            Err(e) => return Err(ProtocolError::Protocol(format!("malformed DataRow: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn copy_both_response_is_handled_by_hand() {
        let mut buf = BytesMut::from(&frame(b'W', &[0, 0, 0])[..]);
        buf.put_slice(&frame(b'Z', b"I"));
        assert!(matches!(
            split_message(&mut buf),
            Ok(Some(Backend::CopyBothResponse))
        ));
        assert!(matches!(
            split_message(&mut buf),
            Ok(Some(Backend::Message(Message::ReadyForQuery(_))))
        ));
        assert!(buf.is_empty());
        let mut bad = BytesMut::from(&frame(b'W', &[0, 0, 2, 0, 0])[..]);
        assert!(matches!(
            split_message(&mut bad),
            Err(ProtocolError::Protocol(_))
        ));
    }

    #[test]
    fn partial_frames_stay_in_the_buffer() {
        let whole = frame(b'd', b"kxxxxxxxxxxxxxxxxx");
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(matches!(split_message(&mut buf), Ok(None)), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
            assert!(bytes_missing(&buf).is_some());
            buf.put_slice(&whole[cut..]);
            assert_eq!(bytes_missing(&buf), None);
            match split_message(&mut buf) {
                Ok(Some(Backend::Message(Message::CopyData(d)))) => {
                    assert_eq!(d.data(), b"kxxxxxxxxxxxxxxxxx")
                }
                _ => panic!("expected CopyData at cut {cut}"),
            }
        }
    }

    #[test]
    fn rejects_bad_lengths_and_unknown_tags() {
        let mut short = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(matches!(
            split_message(&mut short),
            Err(ProtocolError::Protocol(_))
        ));
        let mut huge = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_message(&mut huge),
            Err(ProtocolError::Protocol(_))
        ));
        assert_eq!(bytes_missing(&huge), None, "rejected, not waited for");
        let mut unknown = BytesMut::from(&frame(b'?', b"")[..]);
        assert!(matches!(
            split_message(&mut unknown),
            Err(ProtocolError::Protocol(_))
        ));
    }

    #[test]
    fn error_response_fields() {
        let mut body = Vec::new();
        for (t, v) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"u\""),
            (b'H', "check it"),
        ] {
            body.push(t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut buf = BytesMut::from(&frame(b'E', &body)[..]);
        let Ok(Some(Backend::Message(Message::ErrorResponse(e)))) = split_message(&mut buf) else {
            panic!("expected ErrorResponse")
        };
        let err = server_error(&e);
        assert_eq!(err.sqlstate(), Some("28P01"));
        assert!(
            matches!(err, ProtocolError::Server { hint: Some(ref h), detail: None, .. } if h == "check it")
        );
    }

    #[test]
    fn data_row_with_null() {
        let mut body = Vec::new();
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        let mut buf = BytesMut::from(&frame(b'D', &body)[..]);
        let Ok(Some(Backend::Message(Message::DataRow(row)))) = split_message(&mut buf) else {
            panic!("expected DataRow")
        };
        assert_eq!(data_row_text(&row).unwrap(), vec![None, Some("abc".into())]);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(message)) = split_message(&mut buf) {
                match message {
                    Backend::Message(Message::ErrorResponse(e)) => { let _ = server_error(&e); }
                    Backend::Message(Message::DataRow(r)) => { let _ = data_row_text(&r); }
                    _ => {}
                }
            }
        }
    }
}

//! Rows in COPY's text format, for bulk inserts.
//!
//! A COPY text row is the column values separated by tabs and ended by a newline, NULL written
//! `\N`, and backslash, tab, newline and carriage return escaped with a backslash. Values arrive
//! from pgoutput already in text form, so encoding is escaping only.

use bytes::{BufMut, BytesMut};

/// Appends one value, escaped; `None` is NULL.
pub fn push_value(buf: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        None => buf.put_slice(b"\\N"),
        Some(v) => {
            let mut start = 0;
            for (i, &b) in v.iter().enumerate() {
                let esc: &[u8] = match b {
                    b'\\' => b"\\\\",
                    b'\t' => b"\\t",
                    b'\n' => b"\\n",
                    b'\r' => b"\\r",
                    _ => continue,
                };
                buf.put_slice(&v[start..i]);
                buf.put_slice(esc);
                start = i + 1;
            }
            buf.put_slice(&v[start..]);
        }
    }
}

/// Decodes one escaped value back (used by tests to check the encoding is lossless).
#[cfg(test)]
fn unescape(v: &[u8]) -> Option<Vec<u8>> {
    if v == b"\\N" {
        return None;
    }
    let mut out = Vec::new();
    let mut it = v.iter();
    while let Some(&b) = it.next() {
        if b == b'\\' {
            match it.next() {
                Some(b't') => out.push(b'\t'),
                Some(b'n') => out.push(b'\n'),
                Some(b'r') => out.push(b'\r'),
                Some(&o) => out.push(o),
                None => panic!("dangling backslash"),
            }
        } else {
            out.push(b);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_specials() {
        let mut b = BytesMut::new();
        push_value(&mut b, Some(b"a\tb\nc\\d\re"));
        assert_eq!(&b[..], b"a\\tb\\nc\\\\d\\re");
        let mut b = BytesMut::new();
        push_value(&mut b, None);
        assert_eq!(&b[..], b"\\N");
    }

    proptest! {
        #[test]
        fn lossless(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::new();
            push_value(&mut b, Some(&v));
            prop_assert!(!b.contains(&b'\t') && !b.contains(&b'\n') && !b.contains(&b'\r'));
            prop_assert_eq!(unescape(&b), Some(v));
        }
    }
}

//! A query parameter sent in PostgreSQL's text format, whatever the target column's type.
//!
//! pgoutput ships column values as their type's text output. Binding them in text format lets
//! the target parse each with its own column type's input function, so every type (enums,
//! domains, arrays, ranges, extension types) round-trips without a Rust mapping per type.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_types::{Format, IsNull, ToSql, Type};

/// A value in text format; `None` is SQL NULL.
#[derive(Clone, Debug)]
pub struct TextValue(pub Option<Bytes>);

impl ToSql for TextValue {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(b) => {
                out.put_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
}

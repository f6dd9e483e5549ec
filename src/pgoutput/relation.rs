//! Relation and Type: the schema descriptions that precede the changes using them.

use bytes::BufMut;

use super::error::DecodeError;
use super::wire::{Reader, put_cstring, put_streamed_xid};

/// The namespace pgoutput abbreviates to an empty string on the wire.
const PG_CATALOG: &str = "pg_catalog";

/// Bit of [`RelationColumn::flags`] marking a replica identity column.
const FLAG_REPLICA_IDENTITY: u8 = 1;

/// Describes a table's published columns. Sent before the first change of the table in a
/// session and again after every change to its schema, so a consumer must replace what it knew
/// (see [`super::RelationCache`]).
///
/// Columns carry no attribute numbers: match them to the target by name, and re-check on every
/// Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Inside a stream chunk, the xid of the (sub)transaction whose change needed this
    /// description (not always the top-level xid of the Stream Start); `None` outside streaming.
    pub xid: Option<u32>,
    /// The table's OID on the source; changes refer to the table by it.
    pub oid: u32,
    /// Schema name. The wire sends "" for `pg_catalog`; decoding restores `"pg_catalog"`, like
    /// PostgreSQL's own subscriber does.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Which old values Update and Delete messages of this table carry.
    pub replica_identity: ReplicaIdentity,
    /// The published columns, in the order tuples list their values (dropped and unpublished
    /// generated columns are left out).
    pub columns: Vec<RelationColumn>,
}

/// A table's `REPLICA IDENTITY` (`pg_class.relreplident`), which decides what Update and
/// Delete messages carry about the old row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key columns (old key sent only when they change, and on delete).
    Default,
    /// `n`: nothing; updates and deletes cannot be published.
    Nothing,
    /// `f`: the whole old row, sent as an `O` tuple.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

/// One published column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// Raw flags; bit 0 is "part of the replica identity". Kept raw so an unknown bit is
    /// visible rather than dropped.
    pub flags: u8,
    /// Whether the column is part of the replica identity (flags bit 0); every column is, under
    /// [`ReplicaIdentity::Full`].
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// The OID of the column's type on the source (a [`TypeMessage`] names non-builtin ones).
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), e.g. the length of `varchar(n)`; -1 when none.
    pub type_modifier: i32,
}

/// Names a non-builtin type (enum, composite, domain base, extension type) used by a column,
/// sent before the Relation message that uses it, so the consumer can map the source's type
/// OID to the target's by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeMessage {
    /// Inside a stream chunk, the xid of the (sub)transaction it belongs to (not always the
    /// top-level xid of the Stream Start); `None` outside streaming.
    pub xid: Option<u32>,
    /// The type's OID on the source, as used in [`RelationColumn::type_oid`].
    pub oid: u32,
    /// Schema name of the type (for a domain: of its base type), "" on the wire restored to
    /// `"pg_catalog"`.
    pub namespace: String,
    /// Type name (for a domain: its base type's name).
    pub name: String,
}

impl ReplicaIdentity {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    /// The `relreplident` character that stands for this identity on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

impl RelationColumn {
    /// On the wire: flags byte, name, type OID, type modifier.
    const MIN_WIRE_SIZE: usize = 1 + 1 + 4 + 4;
}

fn decode_namespace(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let namespace = r.cstring("namespace")?;
    Ok(if namespace.is_empty() {
        PG_CATALOG.to_owned()
    } else {
        namespace
    })
}

fn encode_namespace(out: &mut Vec<u8>, namespace: &str) {
    put_cstring(
        out,
        if namespace == PG_CATALOG {
            ""
        } else {
            namespace
        },
    );
}

impl Relation {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        let xid = r.streamed_xid(in_streamed_transaction)?;
        let oid = r.u32("oid")?;
        let namespace = decode_namespace(r)?;
        let name = r.cstring("name")?;
        let identity_offset = r.offset();
        let identity_byte = r.u8("replica_identity")?;
        let replica_identity = ReplicaIdentity::from_byte(identity_byte).ok_or(
            DecodeError::UnknownReplicaIdentity {
                found: identity_byte,
                offset: identity_offset,
            },
        )?;
        let count = usize::from(r.u16("column count")?);
        r.check_count(count, RelationColumn::MIN_WIRE_SIZE, "columns")?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.u8("column flags")?;
            columns.push(RelationColumn {
                flags,
                is_key: flags & FLAG_REPLICA_IDENTITY != 0,
                name: r.cstring("column name")?,
                type_oid: r.u32("column type_oid")?,
                type_modifier: r.i32("column type_modifier")?,
            });
        }
        Ok(Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// Writes [`RelationColumn::flags`]; `is_key` is derived from it and not written.
    ///
    /// # Panics
    /// If there are more than 65535 columns.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_streamed_xid(out, self.xid);
        out.put_u32(self.oid);
        encode_namespace(out, &self.namespace);
        put_cstring(out, &self.name);
        out.put_u8(self.replica_identity.as_byte());
        let count =
            u16::try_from(self.columns.len()).expect("a relation has at most 65535 columns");
        out.put_u16(count);
        for column in &self.columns {
            debug_assert_eq!(
                column.is_key,
                column.flags & FLAG_REPLICA_IDENTITY != 0,
                "{column:?}"
            );
            out.put_u8(column.flags);
            put_cstring(out, &column.name);
            out.put_u32(column.type_oid);
            out.put_i32(column.type_modifier);
        }
    }

    /// The columns that make up the replica identity, in column order.
    pub fn key_columns(&self) -> impl Iterator<Item = &RelationColumn> {
        self.columns.iter().filter(|c| c.is_key)
    }
}

impl TypeMessage {
    pub(super) fn decode(
        r: &mut Reader<'_>,
        in_streamed_transaction: bool,
    ) -> Result<Self, DecodeError> {
        Ok(TypeMessage {
            xid: r.streamed_xid(in_streamed_transaction)?,
            oid: r.u32("oid")?,
            namespace: decode_namespace(r)?,
            name: r.cstring("name")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        put_streamed_xid(out, self.xid);
        out.put_u32(self.oid);
        encode_namespace(out, &self.namespace);
        put_cstring(out, &self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{V1, V2_STREAMED, assert_round_trip};
    use super::super::{Message, decode};
    use super::*;

    fn accounts() -> Relation {
        Relation {
            xid: None,
            oid: 16384,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                RelationColumn {
                    flags: 1,
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    is_key: false,
                    name: "note".into(),
                    type_oid: 1043,
                    type_modifier: 24,
                },
            ],
        }
    }

    #[test]
    fn relation_round_trips() {
        let wire = assert_round_trip(&Message::Relation(accounts()), &V1);
        let mut expected = b"R\0\0\x40\0public\0accounts\0d\0\x02".to_vec();
        expected.extend_from_slice(b"\x01id\0\0\0\0\x17\xff\xff\xff\xff");
        expected.extend_from_slice(b"\x00note\0\0\0\x04\x13\0\0\0\x18");
        assert_eq!(wire, expected);
        assert_eq!(
            accounts()
                .key_columns()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["id"]
        );
    }

    #[test]
    fn relation_round_trips_in_streamed_transaction() {
        let relation = Relation {
            xid: Some(77),
            replica_identity: ReplicaIdentity::Full,
            ..accounts()
        };
        let wire = assert_round_trip(&Message::Relation(relation), &V2_STREAMED);
        assert_eq!(&wire[..9], b"R\0\0\0\x4d\0\0\x40\0");
    }

    #[test]
    fn empty_namespace_means_pg_catalog() {
        let relation = Relation {
            namespace: "pg_catalog".into(),
            ..accounts()
        };
        let wire = assert_round_trip(&Message::Relation(relation), &V1);
        assert_eq!(&wire[..6], b"R\0\0\x40\0\0");
    }

    #[test]
    fn type_round_trips() {
        let message = TypeMessage {
            xid: None,
            oid: 16390,
            namespace: "public".into(),
            name: "mood".into(),
        };
        let wire = assert_round_trip(&Message::Type(message.clone()), &V1);
        assert_eq!(wire, b"Y\0\0\x40\x06public\0mood\0");
        assert_round_trip(
            &Message::Type(TypeMessage {
                xid: Some(5),
                ..message
            }),
            &V2_STREAMED,
        );
    }

    #[test]
    fn rejects_unknown_replica_identity() {
        let data = bytes::Bytes::from_static(b"R\0\0\0\x01s\0t\0x\0\0");
        assert_eq!(
            decode(&data, &V1),
            Err(DecodeError::UnknownReplicaIdentity {
                found: b'x',
                offset: 9
            })
        );
    }
}

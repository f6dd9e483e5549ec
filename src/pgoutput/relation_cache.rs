//! The latest [`Relation`] description of each table, which tuples are read against.

use std::collections::HashMap;

use super::relation::Relation;
use super::tuple::TupleData;

/// The schema of every table seen in this replication session, keyed by the table's source OID.
///
/// Tuples list values by position only, so each change must be read against the latest
/// Relation message for its table. The server sends one before a table's first change in a
/// session and after each schema change, so every Relation message replaces the entry,
/// mid-transaction included. Start a new cache (or [`clear`](Self::clear) this one) for a new
/// replication session: the server's memory of what it sent starts over too.
#[derive(Clone, Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

/// A change that does not fit the relation cache: the stream skipped or misordered a Relation
/// message, so its tuples cannot be interpreted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// A change names a table no Relation message has described in this session.
    #[error(
        "change for relation OID {oid}, which no Relation message has described in this session"
    )]
    UnknownRelation {
        /// The table's source OID.
        oid: u32,
    },
    /// A tuple's column count differs from the latest Relation message for its table.
    #[error(
        "tuple for {namespace}.{name} (OID {oid}) has {tuple_columns} columns, but its latest \
         Relation message has {relation_columns}"
    )]
    ColumnCountMismatch {
        /// The table's source OID.
        oid: u32,
        /// The table's schema.
        namespace: String,
        /// The table's name.
        name: String,
        /// Columns in the latest Relation message.
        relation_columns: usize,
        /// Columns in the tuple.
        tuple_columns: usize,
    },
}

impl RelationCache {
    /// An empty cache, for a new replication session.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `relation` as the current schema of its table, returning the description it
    /// replaces, if any (so the caller can see what changed and re-match columns by name).
    pub fn update(&mut self, relation: Relation) -> Option<Relation> {
        self.relations.insert(relation.oid, relation)
    }

    /// The current schema of the table with source OID `oid`.
    pub fn get(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// The current schema of `relation_oid`, checked to have as many columns as `tuple`: what
    /// the pipeline needs before interpreting a change's values.
    pub fn resolve(&self, relation_oid: u32, tuple: &TupleData) -> Result<&Relation, SchemaError> {
        let relation = self
            .get(relation_oid)
            .ok_or(SchemaError::UnknownRelation { oid: relation_oid })?;
        if relation.columns.len() != tuple.columns.len() {
            return Err(SchemaError::ColumnCountMismatch {
                oid: relation_oid,
                namespace: relation.namespace.clone(),
                name: relation.name.clone(),
                relation_columns: relation.columns.len(),
                tuple_columns: tuple.columns.len(),
            });
        }
        Ok(relation)
    }

    /// Forgets every table, for a new replication session.
    pub fn clear(&mut self) {
        self.relations.clear();
    }

    /// How many tables are described.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// Whether no table is described yet.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ColumnValue, RelationColumn, ReplicaIdentity};
    use super::*;

    fn relation(oid: u32, columns: &[&str]) -> Relation {
        Relation {
            xid: None,
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|name| RelationColumn {
                    flags: 0,
                    is_key: false,
                    name: (*name).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn every_relation_message_replaces_the_entry() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        assert_eq!(cache.update(relation(1, &["a"])), None);
        assert_eq!(cache.update(relation(2, &["x"])), None);
        let previous = cache.update(relation(1, &["a", "b"]));
        assert_eq!(previous, Some(relation(1, &["a"])));
        assert_eq!(cache.get(1), Some(&relation(1, &["a", "b"])));
        assert_eq!(cache.len(), 2);
        cache.clear();
        assert_eq!(cache.get(1), None);
    }

    #[test]
    fn resolve_checks_the_tuple_against_the_latest_schema() {
        let mut cache = RelationCache::new();
        let two = TupleData {
            columns: vec![ColumnValue::Null, ColumnValue::UnchangedToast],
        };
        assert_eq!(
            cache.resolve(1, &two),
            Err(SchemaError::UnknownRelation { oid: 1 })
        );
        cache.update(relation(1, &["a"]));
        let err = cache.resolve(1, &two).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tuple for public.t1 (OID 1) has 2 columns, but its latest Relation message has 1"
        );
        cache.update(relation(1, &["a", "b"]));
        assert_eq!(cache.resolve(1, &two).map(|r| r.columns.len()), Ok(2));
    }
}

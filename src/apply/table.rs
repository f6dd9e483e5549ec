//! How a source relation maps onto its target table, and the SQL the apply runs for it.
//!
//! Relation messages carry column names but no attribute numbers, so columns are matched by
//! name against the target's catalog, again on every Relation message (DESIGN §3). This module
//! is pure: the catalog rows come in, SQL text comes out.

use crate::db::{quote_ident, quote_literal};
use crate::pgoutput::{Relation, ReplicaIdentity};

use super::ApplyError;

/// One column of the target table, as read from its catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    /// `GENERATED ALWAYS AS (...) STORED` (or virtual): never written.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: inserts need `OVERRIDING SYSTEM VALUE`.
    pub identity_always: bool,
    /// The column's type without its modifier, as `format_type(oid, -1)` spells it (`bpchar`,
    /// not `character`, which would mean char(1)). Used to type multi-row VALUES lists; the
    /// modifier is applied by the assignment, which errors where an explicit cast would
    /// silently truncate.
    pub type_name: String,
    /// Part of a unique or exclusion index: updates setting it are not grouped (a multi-row
    /// UPDATE checks uniqueness per row, so valid chains and swaps would fail or be lost).
    pub unique: bool,
    /// The table is partitioned (the same for every column of a table).
    pub partitioned: bool,
}

/// A source relation resolved against the target table.
#[derive(Clone, Debug)]
pub struct TableMap {
    /// `schema.table` for messages.
    pub display: String,
    /// Quoted `"schema"."table"` for SQL.
    pub target: String,
    /// Per source column (by position in the Relation message): the quoted target column name.
    pub names: Vec<String>,
    /// Per source column: `None` when the target column is generated and must not be
    /// written, else the quoted name again.
    pub columns: Vec<Option<String>>,
    /// Positions of the replica identity columns (the primary key, or every column with
    /// REPLICA IDENTITY FULL).
    pub key: Vec<usize>,
    /// Per source column: the target column's type, for casts in multi-row statements.
    pub types: Vec<String>,
    /// Per source column: part of a unique or exclusion index on the target.
    pub unique: Vec<bool>,
    /// The target is a partitioned table (TRUNCATE cannot use ONLY; ctid needs tableoid).
    pub partitioned: bool,
    /// Per source column: an identity column GENERATED ALWAYS on the target. UPDATE cannot
    /// set such a column (only INSERT has OVERRIDING SYSTEM VALUE), and on the source an
    /// UPDATE can only change it with `SET col = DEFAULT`, so updates leave it out.
    pub identity_always: Vec<bool>,
    /// REPLICA IDENTITY FULL: rows are found by comparing every old column.
    pub full_identity: bool,
    /// The target has an identity column declared GENERATED ALWAYS.
    pub overriding_system_value: bool,
}

impl TableMap {
    /// Matches `rel`'s columns by name against the target's; errors name the table and column.
    pub fn resolve(rel: &Relation, target_columns: &[TargetColumn]) -> Result<TableMap, ApplyError> {
        TableMap::resolve_inner(rel, target_columns, false)
    }

    /// [`TableMap::resolve`] for replaying held changes (schema drift): a source column the
    /// target lacks is left out (it was dropped on the source since; its values are gone there
    /// too) instead of being an error. Key columns must still exist.
    pub fn resolve_lenient(rel: &Relation, target_columns: &[TargetColumn]) -> Result<TableMap, ApplyError> {
        TableMap::resolve_inner(rel, target_columns, true)
    }

    fn resolve_inner(rel: &Relation, target_columns: &[TargetColumn], skip_missing: bool) -> Result<TableMap, ApplyError> {
        let display = format!("{}.{}", rel.namespace, rel.name);
        if target_columns.is_empty() {
            return Err(ApplyError::MissingTable { table: display });
        }
        let mut columns = Vec::with_capacity(rel.columns.len());
        let mut names = Vec::with_capacity(rel.columns.len());
        let mut identity_always = Vec::with_capacity(rel.columns.len());
        let mut types = Vec::with_capacity(rel.columns.len());
        let mut unique = Vec::with_capacity(rel.columns.len());
        let mut overriding = false;
        let full_identity = rel.replica_identity == ReplicaIdentity::Full;
        let mut missing = vec![false; rel.columns.len()];
        for (i, col) in rel.columns.iter().enumerate() {
            let Some(t) = target_columns.iter().find(|t| t.name == col.name) else {
                // A real key column must exist; with REPLICA IDENTITY FULL every column is "key",
                // and the others identify the row.
                if skip_missing && (!col.is_key || full_identity) {
                    missing[i] = true;
                    names.push(quote_ident(&col.name));
                    identity_always.push(false);
                    types.push(String::new());
                    unique.push(false);
                    columns.push(None);
                    continue;
                }
                return Err(ApplyError::MissingColumn { table: display.clone(), column: col.name.clone() });
            };
            names.push(quote_ident(&t.name));
            identity_always.push(t.identity_always);
            types.push(t.type_name.clone());
            unique.push(t.unique);
            if t.generated {
                columns.push(None);
            } else {
                overriding |= t.identity_always;
                columns.push(Some(quote_ident(&t.name)));
            }
        }
        let key: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(i, c)| c.is_key && !missing[*i])
            .map(|(i, _)| i)
            .collect();
        if key.is_empty() && !matches!(rel.replica_identity, ReplicaIdentity::Nothing) && !full_identity {
            return Err(ApplyError::NoReplicaIdentity { table: display });
        }
        Ok(TableMap {
            target: format!("{}.{}", quote_ident(&rel.namespace), quote_ident(&rel.name)),
            display,
            names,
            columns,
            types,
            unique,
            partitioned: target_columns.first().is_some_and(|c| c.partitioned),
            identity_always,
            key,
            full_identity,
            overriding_system_value: overriding,
        })
    }

    /// `COPY "s"."t" ("a", "b") FROM STDIN` over the writable columns.
    pub fn copy_sql(&self) -> String {
        let cols: Vec<&str> = self.columns.iter().flatten().map(String::as_str).collect();
        format!("COPY {} ({}) FROM STDIN", self.target, cols.join(", "))
    }

    /// `INSERT` of the writable columns, parameters in source column order (generated skipped).
    pub fn insert_sql(&self) -> String {
        let cols: Vec<&str> = self.columns.iter().flatten().map(String::as_str).collect();
        let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        format!(
            "INSERT INTO {} ({}){} VALUES ({})",
            self.target,
            cols.join(", "),
            if self.overriding_system_value { " OVERRIDING SYSTEM VALUE" } else { "" },
            params.join(", ")
        )
    }

    /// `UPDATE ... SET <set columns> WHERE <identity>`; parameters: the set columns' new values
    /// in order, then the identity values (see [`TableMap::where_clause`]). `set` holds
    /// writable columns only.
    pub fn update_sql(&self, set: &[usize], identity: &[usize]) -> String {
        debug_assert!(set.iter().all(|&c| self.columns[c].is_some()), "generated column in SET");
        let assignments: Vec<String> = set
            .iter()
            .enumerate()
            .map(|(p, &c)| format!("{} = ${}", self.names[c], p + 1))
            .collect();
        format!(
            "UPDATE {} SET {} WHERE {}",
            self.target,
            assignments.join(", "),
            self.where_clause(identity, set.len())
        )
    }

    /// One UPDATE for `rows` changes to distinct keys of one table that set the same columns:
    /// `UPDATE t SET c = d.c FROM (VALUES (...), ...) AS d(...) WHERE t.k = d.k`. Parameters
    /// row by row: the set columns' values, then the key values. Far cheaper on the server than
    /// `rows` single-row statements. Keys must be distinct: a target row joined twice would
    /// take only one of the changes.
    pub fn update_many_sql(&self, set: &[usize], identity: &[usize], rows: usize) -> String {
        debug_assert!(!self.full_identity);
        let cols: Vec<usize> = set.iter().chain(identity).copied().collect();
        let alias: Vec<String> = (0..cols.len()).map(|i| format!("c{i}")).collect();
        let assignments: Vec<String> =
            set.iter().enumerate().map(|(i, &c)| format!("{} = d.c{i}", self.names[c])).collect();
        let conds: Vec<String> = identity
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("t.{} = d.c{}", self.names[c], set.len() + i))
            .collect();
        format!(
            "UPDATE {} AS t SET {} FROM (VALUES {}) AS d({}) WHERE {}",
            self.target,
            assignments.join(", "),
            self.values_list(&cols, rows),
            alias.join(", "),
            conds.join(" AND ")
        )
    }

    /// One DELETE for `rows` keys: `DELETE FROM t USING (VALUES ...) AS d(...) WHERE t.k = d.k`.
    pub fn delete_many_sql(&self, identity: &[usize], rows: usize) -> String {
        debug_assert!(!self.full_identity);
        let alias: Vec<String> = (0..identity.len()).map(|i| format!("c{i}")).collect();
        let conds: Vec<String> =
            identity.iter().enumerate().map(|(i, &c)| format!("t.{} = d.c{i}", self.names[c])).collect();
        format!(
            "DELETE FROM {} AS t USING (VALUES {}) AS d({}) WHERE {}",
            self.target,
            self.values_list(identity, rows),
            alias.join(", "),
            conds.join(" AND ")
        )
    }

    /// `($1::t1, $2::t2), ($3::t1, $4::t2), ...`: `rows` tuples of `cols`, typed by cast.
    fn values_list(&self, cols: &[usize], rows: usize) -> String {
        let mut out = String::new();
        let mut n = 0;
        for r in 0..rows {
            if r > 0 {
                out.push_str(", ");
            }
            out.push('(');
            for (i, &c) in cols.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                n += 1;
                out.push_str(&format!("${n}::{}", self.types[c]));
            }
            out.push(')');
        }
        out
    }

    /// `DELETE ... WHERE <identity>`.
    pub fn delete_sql(&self, identity: &[usize]) -> String {
        format!("DELETE FROM {} WHERE {}", self.target, self.where_clause(identity, 0))
    }

    /// The row filter over the identity columns `identity`, parameters numbered after `offset`.
    /// With a key it is `k1 = $n AND ...` (an index lookup). With REPLICA IDENTITY FULL it
    /// compares every sent old column as text (types such as json have no equality operator),
    /// both sides rendered by the target session from a value of the column's type (so `t`
    /// and `true`, or char padding, compare equal), and touches exactly one matching row, as
    /// the native apply worker does; `tableoid` with `ctid` because a partitioned table's
    /// partitions reuse ctids.
    pub fn where_clause(&self, identity: &[usize], offset: usize) -> String {
        let name = |c: usize| self.names[c].as_str();
        if self.full_identity {
            let conds: Vec<String> = identity
                .iter()
                .enumerate()
                .map(|(p, &c)| {
                    format!("{}::text IS NOT DISTINCT FROM (${}::{})::text", name(c), offset + p + 1, self.types[c])
                })
                .collect();
            let conds = if conds.is_empty() { "true".to_string() } else { conds.join(" AND ") };
            format!(
                "(tableoid, ctid) = (SELECT tableoid, ctid FROM {} WHERE {} LIMIT 1 FOR UPDATE)",
                self.target, conds
            )
        } else {
            identity
                .iter()
                .enumerate()
                .map(|(p, &c)| format!("{} = ${}", name(c), offset + p + 1))
                .collect::<Vec<_>>()
                .join(" AND ")
        }
    }

    /// `TRUNCATE` of several tables, as one statement (as the source ran it): `ONLY` for
    /// plain tables (a partitioned one cannot use it), and never CASCADE: the source lists
    /// every table its cascade reached, and a cascade on the target could empty tables that
    /// are not replicated (the native apply worker does the same).
    pub fn truncate_sql(tables: &[&TableMap], restart_identity: bool) -> String {
        let names: Vec<String> = tables
            .iter()
            .map(|t| if t.partitioned { t.target.clone() } else { format!("ONLY {}", t.target) })
            .collect();
        format!("TRUNCATE {}{}", names.join(", "), if restart_identity { " RESTART IDENTITY" } else { "" })
    }
}

/// The catalog query listing a target table's live columns; parameters: schema, table.
pub const TARGET_COLUMNS_SQL: &str = "SELECT a.attname::text, a.attgenerated <> '' AS generated, \
     a.attidentity = 'a' AS identity_always, format_type(a.atttypid, -1), \
     EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisunique OR i.indisexclusion) \
             AND a.attnum = ANY (i.indkey)) AS in_unique, \
     c.relkind = 'p' AS partitioned \
     FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

/// The columns of `rel` that the target lacks, in source order: schema drift when not empty.
/// `None` when the target table is missing altogether. (A target column that is generated is
/// not missing: the target computes it.)
pub fn missing_columns(rel: &Relation, target_columns: &[TargetColumn]) -> Option<Vec<String>> {
    if target_columns.is_empty() {
        return None;
    }
    Some(
        rel.columns
            .iter()
            .filter(|c| !target_columns.iter().any(|t| t.name == c.name))
            .map(|c| c.name.clone())
            .collect(),
    )
}

/// A literal for `pg_replication_origin_xact_setup`'s timestamp: µs since 2000-01-01 UTC.
pub fn pg_timestamp_literal(micros_since_2000: i64) -> String {
    format!(
        "({}::timestamptz + {} * interval '1 microsecond')",
        quote_literal("2000-01-01 00:00:00+00"),
        micros_since_2000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::RelationColumn;

    fn rel(identity: ReplicaIdentity, cols: &[(&str, bool)]) -> Relation {
        Relation {
            xid: None,
            oid: 1,
            namespace: "public".into(),
            name: "T".into(),
            replica_identity: identity,
            columns: cols
                .iter()
                .map(|(n, k)| RelationColumn {
                    flags: u8::from(*k),
                    is_key: *k,
                    name: n.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn tcol(name: &str, generated: bool) -> TargetColumn {
        TargetColumn {
            name: name.into(),
            generated,
            identity_always: false,
            type_name: "text".into(),
            unique: false,
            partitioned: false,
        }
    }

    #[test]
    fn key_table_sql() {
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("v", false), ("g", false)]);
        let m = TableMap::resolve(&r, &[tcol("id", false), tcol("v", false), tcol("g", true)]).unwrap();
        assert_eq!(m.insert_sql(), r#"INSERT INTO "public"."T" ("id", "v") VALUES ($1, $2)"#);
        assert_eq!(m.copy_sql(), r#"COPY "public"."T" ("id", "v") FROM STDIN"#);
        assert_eq!(m.update_sql(&[1], &[0]), r#"UPDATE "public"."T" SET "v" = $1 WHERE "id" = $2"#);
        assert_eq!(m.delete_sql(&[0]), r#"DELETE FROM "public"."T" WHERE "id" = $1"#);
        assert_eq!(
            m.update_many_sql(&[1], &[0], 2),
            r#"UPDATE "public"."T" AS t SET "v" = d.c0 FROM (VALUES ($1::text, $2::text), ($3::text, $4::text)) AS d(c0, c1) WHERE t."id" = d.c1"#
        );
        assert_eq!(
            m.delete_many_sql(&[0], 2),
            r#"DELETE FROM "public"."T" AS t USING (VALUES ($1::text), ($2::text)) AS d(c0) WHERE t."id" = d.c0"#
        );
    }

    #[test]
    fn full_identity_touches_one_row() {
        let r = rel(ReplicaIdentity::Full, &[("a", true), ("b", true)]);
        let m = TableMap::resolve(&r, &[tcol("a", false), tcol("b", false)]).unwrap();
        let sql = m.delete_sql(&[0, 1]);
        assert!(sql.contains("LIMIT 1"), "{sql}");
        assert!(sql.contains(r#""b"::text IS NOT DISTINCT FROM ($2::text)::text"#), "{sql}");
        assert!(sql.starts_with(r#"DELETE FROM "public"."T" WHERE (tableoid, ctid) = (SELECT tableoid, ctid"#), "{sql}");
    }

    #[test]
    fn errors_name_table_and_column() {
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("extra", false)]);
        let e = TableMap::resolve(&r, &[tcol("id", false)]).unwrap_err().to_string();
        assert!(e.contains("public.T") && e.contains("extra"), "{e}");
        let e = TableMap::resolve(&r, &[]).unwrap_err().to_string();
        assert!(e.contains("public.T"), "{e}");
    }

    #[test]
    fn drift_lists_every_missing_column() {
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("a", false), ("b", false), ("g", false)]);
        let target = [tcol("id", false), tcol("g", true)];
        assert_eq!(missing_columns(&r, &target), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(missing_columns(&r, &[]), None);
        let all = [tcol("id", false), tcol("a", false), tcol("b", false), tcol("g", true), tcol("extra", false)];
        assert_eq!(missing_columns(&r, &all), Some(vec![]));
    }

    #[test]
    fn lenient_resolve_leaves_missing_columns_out() {
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("gone", false), ("v", false)]);
        let m = TableMap::resolve_lenient(&r, &[tcol("id", false), tcol("v", false)]).unwrap();
        assert_eq!(m.insert_sql(), r#"INSERT INTO "public"."T" ("id", "v") VALUES ($1, $2)"#);
        assert_eq!(m.columns[1], None);
        // A missing key column is still an error.
        let r = rel(ReplicaIdentity::Default, &[("id", true), ("v", false)]);
        assert!(TableMap::resolve_lenient(&r, &[tcol("v", false)]).is_err());
        // With REPLICA IDENTITY FULL the remaining columns identify the row.
        let r = rel(ReplicaIdentity::Full, &[("a", true), ("gone", true), ("b", true)]);
        let m = TableMap::resolve_lenient(&r, &[tcol("a", false), tcol("b", false)]).unwrap();
        assert_eq!(m.key, vec![0, 2]);
    }
}

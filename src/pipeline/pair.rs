//! Pairs each row change of a two-way table with the versions row its capture trigger wrote
//! (DESIGN §6). Pure: decoded messages in, paired changes out.
//!
//! Why pairing is by `(table, key, occurrence)` and per transaction: the capture trigger is an
//! AFTER ROW trigger, and PostgreSQL runs those at the end of the statement, so a 3-row UPDATE
//! decodes as `D1 D2 D3 V1 V2 V3`, and a user trigger writing other tables interleaves more. The
//! n-th change of a key within a transaction belongs to the n-th versions change of that key:
//! the trigger writes exactly one versions change per data change, in the order of the data
//! changes. An UPDATE that changes the primary key is a delete of the old key and an insert of
//! the new one, and the trigger writes one versions change for each.
//!
//! A data change whose versions change never comes (the trigger was disabled, or a session
//! set `pgduplex.apply`) and a versions change without a data change are errors of that
//! transaction: it must be parked, never applied as "no change".

use std::collections::{HashMap, VecDeque};

use crate::pgoutput::{ColumnValue, Delete, Insert, Relation, TupleData, Update};

/// The schema holding the versions tables; a relation there named `<schema>.<table>` is the
/// versions table of `<schema>.<table>`.
pub const VERSIONS_SCHEMA: &str = "pgduplex";

/// What a row change does to the row's existence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RowOp {
    /// The row was inserted (or is the new key of a key change).
    Insert,
    /// Columns of an existing row changed (the key did not).
    Update,
    /// The row was deleted (or is the old key of a key change).
    Delete,
}

/// A text value of a column; `None` is SQL NULL.
pub type Text = Option<String>;

/// One row change of a two-way table with its versions row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowChange {
    /// Schema of the data table.
    pub schema: String,
    /// Name of the data table.
    pub table: String,
    pub op: RowOp,
    /// The primary key: column names and values, in key order.
    pub key: Vec<(String, Text)>,
    /// The new row's non-key columns by name (empty for a delete).
    pub values: Vec<(String, Text)>,
    /// Columns whose value was not sent (unchanged TOAST): the source kept its value.
    pub unchanged: Vec<String>,
    /// The versions row the trigger wrote, column name -> value.
    pub versions: Vec<(String, Text)>,
}

impl RowChange {
    /// `schema.table`, as in messages and the conflicts table.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Drops the values and registers of the non-key columns `keep` rejects (replaying a held
    /// change after its column was dropped on both nodes). Row-level versions (`$row`,
    /// `$stamp`, `$dead`) stay.
    pub fn retain_columns(&mut self, keep: impl Fn(&str) -> bool) {
        self.values.retain(|(c, _)| keep(c));
        self.unchanged.retain(|c| keep(c));
        let keys: Vec<String> = self.key.iter().map(|(k, _)| k.clone()).collect();
        self.versions.retain(|(name, _)| {
            if keys.contains(name) {
                return true;
            }
            match name.rsplit_once('|') {
                Some((col, _)) => col.starts_with('$') || keep(col),
                None => true,
            }
        });
    }
}

/// Why a transaction's changes could not be paired.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    #[error("change of table {table} (key {key}) has no versions change: its capture trigger did not fire (disabled, or the writing session set pgduplex.apply)")]
    MissingVersions { table: String, key: String },
    #[error("versions change of table {table} (key {key}) matches no change of the table in its transaction")]
    StrayVersions { table: String, key: String },
    #[error("change of relation OID {oid} arrived before its Relation message")]
    UnknownRelation { oid: u32 },
    #[error("table {table}, column {column}: {problem}")]
    BadValue { table: String, column: String, problem: String },
}

struct Pending {
    change: RowChange,
    paired: bool,
    /// For the insert half of a key change: the index of its delete half, whose tombstone
    /// values supply the columns the update did not send (unchanged TOAST).
    old_half: Option<usize>,
}

/// `(table, key)`, the key's values ordered by column name: the data relation lists key columns
/// in table order, the versions table in primary-key order.
type PairKey = (String, Vec<(String, Text)>);

fn pair_key(table: String, mut key: Vec<(String, Text)>) -> PairKey {
    key.sort_by(|a, b| a.0.cmp(&b.0));
    (table, key)
}

/// Collects the changes of one source transaction and pairs them at its commit.
#[derive(Default)]
pub struct Pairer {
    relations: HashMap<u32, Relation>,
    pending: Vec<Pending>,
    /// Unpaired data changes per (table, key), oldest first.
    waiting: HashMap<PairKey, VecDeque<usize>>,
    /// The first pairing error of the open transaction, reported at its end.
    error: Option<PairError>,
}

impl Pairer {
    pub fn new() -> Pairer {
        Pairer::default()
    }

    /// A Relation message (data or versions table).
    pub fn relation(&mut self, rel: &Relation) {
        self.relations.insert(rel.oid, rel.clone());
    }

    /// Whether `oid` is a versions table.
    pub fn is_versions(&self, oid: u32) -> bool {
        self.relations.get(&oid).is_some_and(|r| r.namespace == VERSIONS_SCHEMA)
    }

    pub fn insert(&mut self, ins: &Insert) {
        let r = self.take_insert(ins);
        self.note(r);
    }

    pub fn update(&mut self, up: &Update) {
        let r = self.take_update(up);
        self.note(r);
    }

    pub fn delete(&mut self, del: &Delete) {
        let r = self.take_delete(del);
        self.note(r);
    }

    fn note(&mut self, r: Result<(), PairError>) {
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }

    fn rel(&self, oid: u32) -> Result<&Relation, PairError> {
        self.relations.get(&oid).ok_or(PairError::UnknownRelation { oid })
    }

    fn take_insert(&mut self, ins: &Insert) -> Result<(), PairError> {
        let rel = self.rel(ins.relation_oid)?;
        if rel.namespace == VERSIONS_SCHEMA {
            let (table, key, versions) = versions_row(rel, &ins.new)?;
            return self.pair(table, key, versions);
        }
        let change = data_change(rel, RowOp::Insert, &ins.new, &ins.new)?;
        self.push(change);
        Ok(())
    }

    fn take_update(&mut self, up: &Update) -> Result<(), PairError> {
        let rel = self.rel(up.relation_oid)?;
        if rel.namespace == VERSIONS_SCHEMA {
            let (table, key, versions) = versions_row(rel, &up.new)?;
            return self.pair(table, key, versions);
        }
        let new_key = data_change(rel, RowOp::Update, &up.new, &up.new)?;
        let old = up.old_key.as_ref().or(up.old_row.as_ref());
        match old {
            Some(old) => {
                let old_key = data_change(rel, RowOp::Delete, old, &TupleData::default())?;
                if old_key.key != new_key.key {
                    let insert = RowChange { op: RowOp::Insert, ..new_key };
                    let old_half = self.pending.len();
                    self.push(old_key);
                    self.push(insert);
                    if let Some(p) = self.pending.last_mut() {
                        p.old_half = Some(old_half);
                    }
                    return Ok(());
                }
                self.push(new_key);
            }
            None => self.push(new_key),
        }
        Ok(())
    }

    fn take_delete(&mut self, del: &Delete) -> Result<(), PairError> {
        let rel = self.rel(del.relation_oid)?;
        let old = del.old_key.as_ref().or(del.old_row.as_ref()).cloned().unwrap_or_default();
        if rel.namespace == VERSIONS_SCHEMA {
            let (table, key, _) = versions_row(rel, &old)?;
            let values: Vec<Text> = key.into_iter().map(|(_, v)| v).collect();
            return Err(PairError::StrayVersions { table, key: show_key(&values) });
        }
        let change = data_change(rel, RowOp::Delete, &old, &TupleData::default())?;
        self.push(change);
        Ok(())
    }

    fn push(&mut self, change: RowChange) {
        let k = pair_key(change.qualified(), change.key.clone());
        self.waiting.entry(k).or_default().push_back(self.pending.len());
        self.pending.push(Pending { change, paired: false, old_half: None });
    }

    fn pair(&mut self, table: String, key: Vec<(String, Text)>, versions: Vec<(String, Text)>) -> Result<(), PairError> {
        let k = pair_key(table, key);
        let Some(i) = self.waiting.get_mut(&k).and_then(VecDeque::pop_front) else {
            let values: Vec<Text> = k.1.iter().map(|(_, v)| v.clone()).collect();
            return Err(PairError::StrayVersions { table: k.0, key: show_key(&values) });
        };
        let p = &mut self.pending[i];
        p.change.versions = versions;
        p.paired = true;
        Ok(())
    }

    /// The transaction committed: its paired changes in data order, or why it cannot be paired
    /// (with every change, for parking). Resets for the next transaction.
    pub fn finish(&mut self) -> Result<Vec<RowChange>, (PairError, Vec<RowChange>)> {
        self.waiting.clear();
        let mut pending = std::mem::take(&mut self.pending);
        // A key change's new row lacks the values the update did not send; the old row's
        // tombstone (written by the same trigger call) has them.
        for i in 0..pending.len() {
            let Some(old) = pending[i].old_half else { continue };
            if pending[i].change.unchanged.is_empty() {
                continue;
            }
            let dead: Option<serde_json::Map<String, serde_json::Value>> = pending[old]
                .change
                .versions
                .iter()
                .find(|(k, _)| k == DEAD)
                .and_then(|(_, v)| v.as_deref())
                .and_then(|v| serde_json::from_str(v).ok());
            let Some(dead) = dead else { continue };
            let change = &mut pending[i].change;
            for col in std::mem::take(&mut change.unchanged) {
                match dead.get(&col) {
                    Some(serde_json::Value::String(v)) => change.values.push((col, Some(v.clone()))),
                    Some(serde_json::Value::Null) => change.values.push((col, None)),
                    _ => change.unchanged.push(col),
                }
            }
        }
        let missing = pending.iter().find(|p| !p.paired).map(|p| PairError::MissingVersions {
            table: p.change.qualified(),
            key: show_key(&p.change.key.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()),
        });
        let changes = pending.into_iter().map(|p| p.change).collect();
        match self.error.take().or(missing) {
            None => Ok(changes),
            Some(e) => Err((e, changes)),
        }
    }

    /// Forgets a transaction (an echo, or the stream restarted).
    pub fn discard(&mut self) {
        self.waiting.clear();
        self.pending.clear();
        self.error = None;
    }

    /// Whether no changes are buffered.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.error.is_none()
    }
}

/// `(1, 'x')`-like text of a key, for messages.
pub fn show_key(key: &[Text]) -> String {
    let parts: Vec<String> = key.iter().map(|v| v.clone().unwrap_or_else(|| "NULL".into())).collect();
    format!("({})", parts.join(", "))
}

fn text(table: &str, column: &str, v: &ColumnValue) -> Result<Option<Text>, PairError> {
    let bad = |problem: &str| PairError::BadValue { table: table.into(), column: column.into(), problem: problem.into() };
    match v {
        ColumnValue::Null => Ok(Some(None)),
        ColumnValue::UnchangedToast => Ok(None),
        ColumnValue::Text(b) => {
            Ok(Some(Some(String::from_utf8(b.to_vec()).map_err(|_| bad("value is not valid UTF-8"))?)))
        }
        ColumnValue::Binary(_) => Err(bad("binary values are not requested")),
    }
}

/// The key and values of a data change. `key_from` holds the key columns (the new row, or
/// the old key of a delete), `values_from` the row whose non-key columns are wanted.
fn data_change(rel: &Relation, op: RowOp, key_from: &TupleData, values_from: &TupleData) -> Result<RowChange, PairError> {
    let table = format!("{}.{}", rel.namespace, rel.name);
    let mut key = Vec::new();
    let mut values = Vec::new();
    let mut unchanged = Vec::new();
    for (i, col) in rel.columns.iter().enumerate() {
        if col.is_key {
            let v = key_from.columns.get(i).ok_or_else(|| PairError::BadValue {
                table: table.clone(),
                column: col.name.clone(),
                problem: "missing from the tuple".into(),
            })?;
            let v = text(&table, &col.name, v)?.ok_or_else(|| PairError::BadValue {
                table: table.clone(),
                column: col.name.clone(),
                problem: "key value not sent".into(),
            })?;
            key.push((col.name.clone(), v));
        } else if let Some(v) = values_from.columns.get(i) {
            match text(&table, &col.name, v)? {
                Some(v) => values.push((col.name.clone(), v)),
                None => unchanged.push(col.name.clone()),
            }
        }
    }
    Ok(RowChange {
        schema: rel.namespace.clone(),
        table: rel.name.clone(),
        op,
        key,
        values,
        unchanged,
        versions: Vec::new(),
    })
}

/// A versions row: its data table (`schema.table`), key values, and every column.
type VersionsRow = (String, Vec<(String, Text)>, Vec<(String, Text)>);

/// The tombstone-values column of a versions table.
const DEAD: &str = "$dead";

/// The data table, key and columns of a versions row.
fn versions_row(rel: &Relation, tuple: &TupleData) -> Result<VersionsRow, PairError> {
    let table = rel.name.clone();
    let mut key = Vec::new();
    let mut cols = Vec::new();
    for (i, col) in rel.columns.iter().enumerate() {
        let v = tuple.columns.get(i).ok_or_else(|| PairError::BadValue {
            table: table.clone(),
            column: col.name.clone(),
            problem: "missing from the versions tuple".into(),
        })?;
        let v = text(&table, &col.name, v)?.ok_or_else(|| PairError::BadValue {
            table: table.clone(),
            column: col.name.clone(),
            problem: "versions value not sent (unchanged TOAST)".into(),
        })?;
        if col.is_key {
            key.push((col.name.clone(), v.clone()));
        }
        cols.push((col.name.clone(), v));
    }
    Ok((table, key, cols))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::pgoutput::{RelationColumn, ReplicaIdentity};

    fn rel(oid: u32, ns: &str, name: &str, cols: &[(&str, bool)]) -> Relation {
        Relation {
            xid: None,
            oid,
            namespace: ns.into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|(n, k)| RelationColumn { flags: u8::from(*k), is_key: *k, name: (*n).into(), type_oid: 25, type_modifier: -1 })
                .collect(),
        }
    }

    fn tuple(vals: &[Option<&str>]) -> TupleData {
        TupleData {
            columns: vals
                .iter()
                .map(|v| match v {
                    None => ColumnValue::Null,
                    Some("<u>") => ColumnValue::UnchangedToast,
                    Some(s) => ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                })
                .collect(),
        }
    }

    fn pairer() -> Pairer {
        let mut p = Pairer::new();
        p.relation(&rel(1, "public", "t", &[("id", true), ("x", false)]));
        p.relation(&rel(2, VERSIONS_SCHEMA, "public.t", &[("id", true), ("x|t", false)]));
        p
    }

    fn ins(oid: u32, vals: &[Option<&str>]) -> Insert {
        Insert { xid: None, relation_oid: oid, new: tuple(vals) }
    }

    fn up(oid: u32, old_key: Option<&[Option<&str>]>, vals: &[Option<&str>]) -> Update {
        Update { xid: None, relation_oid: oid, old_key: old_key.map(tuple), old_row: None, new: tuple(vals) }
    }

    #[test]
    fn pairs_statement_order_by_key_and_occurrence() {
        let mut p = pairer();
        // UPDATE of rows 1 and 2, then again of row 1, in one transaction: D1 D2 V1 V2 D1' V1'.
        p.update(&up(1, None, &[Some("1"), Some("a")]));
        p.update(&up(1, None, &[Some("2"), Some("b")]));
        p.update(&up(2, None, &[Some("2"), Some("20")]));
        p.update(&up(2, None, &[Some("1"), Some("10")]));
        p.update(&up(1, None, &[Some("1"), Some("c")]));
        p.update(&up(2, None, &[Some("1"), Some("11")]));
        let out = p.finish().expect("paired");
        let got: Vec<(&str, &str, &str)> = out
            .iter()
            .map(|c| (c.key[0].1.as_deref().unwrap(), c.values[0].1.as_deref().unwrap(), c.versions[1].1.as_deref().unwrap()))
            .collect();
        assert_eq!(got, vec![("1", "a", "10"), ("2", "b", "20"), ("1", "c", "11")]);
        assert!(p.is_empty());
    }

    #[test]
    fn key_change_is_delete_then_insert() {
        let mut p = pairer();
        p.update(&up(1, Some(&[Some("1"), None]), &[Some("5"), Some("a")]));
        p.update(&up(2, None, &[Some("1"), Some("7")]));
        p.insert(&ins(2, &[Some("5"), Some("7")]));
        let out = p.finish().expect("paired");
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].op, out[0].key[0].1.as_deref()), (RowOp::Delete, Some("1")));
        assert!(out[0].values.is_empty());
        assert_eq!((out[1].op, out[1].key[0].1.as_deref()), (RowOp::Insert, Some("5")));
        assert_eq!(out[1].values, vec![("x".to_string(), Some("a".to_string()))]);
    }

    #[test]
    fn missing_and_stray_versions_are_errors_with_the_changes() {
        let mut p = pairer();
        p.insert(&ins(1, &[Some("1"), Some("a")]));
        let (e, changes) = p.finish().unwrap_err();
        assert!(matches!(e, PairError::MissingVersions { ref table, .. } if table == "public.t"), "{e}");
        assert_eq!(changes.len(), 1);

        let mut p = pairer();
        p.insert(&ins(2, &[Some("9"), Some("1")]));
        let (e, _) = p.finish().unwrap_err();
        assert!(matches!(e, PairError::StrayVersions { .. }), "{e}");
        // the next transaction starts clean
        p.insert(&ins(1, &[Some("1"), Some("a")]));
        p.insert(&ins(2, &[Some("1"), Some("1")]));
        assert!(p.finish().is_ok());
    }

    #[test]
    fn unchanged_toast_is_listed_not_null() {
        let mut p = pairer();
        p.update(&up(1, None, &[Some("1"), Some("<u>")]));
        p.update(&up(2, None, &[Some("1"), Some("3")]));
        let out = p.finish().expect("paired");
        assert_eq!(out[0].unchanged, vec!["x".to_string()]);
        assert!(out[0].values.is_empty());
    }

    #[test]
    fn versions_key_in_primary_key_order_still_pairs() {
        // Table (a, b, v) with PRIMARY KEY (b, a): the versions table lists b first.
        let mut p = Pairer::new();
        p.relation(&rel(1, "public", "t", &[("a", true), ("b", true), ("v", false)]));
        p.relation(&rel(2, VERSIONS_SCHEMA, "public.t", &[("b", true), ("a", true), ("v|t", false)]));
        p.insert(&ins(1, &[Some("1"), Some("x"), Some("v")]));
        p.insert(&ins(2, &[Some("x"), Some("1"), Some("5")]));
        let out = p.finish().expect("paired despite the column order");
        assert_eq!(out[0].versions[2].1.as_deref(), Some("5"));
    }

    #[test]
    fn key_change_takes_unsent_values_from_the_old_rows_tombstone() {
        let mut p = Pairer::new();
        p.relation(&rel(1, "public", "t", &[("id", true), ("x", false)]));
        p.relation(&rel(2, VERSIONS_SCHEMA, "public.t", &[("id", true), ("$dead", false), ("x|t", false)]));
        // UPDATE t SET id = 5 WHERE id = 1, x is TOASTed: not sent.
        p.update(&up(1, Some(&[Some("1"), None]), &[Some("5"), Some("<u>")]));
        p.update(&up(2, None, &[Some("1"), Some(r#"{"x": "big value"}"#), Some("7")]));
        p.insert(&ins(2, &[Some("5"), None, Some("8")]));
        let out = p.finish().expect("paired");
        assert_eq!(out[1].op, RowOp::Insert);
        assert!(out[1].unchanged.is_empty());
        assert_eq!(out[1].values, vec![("x".to_string(), Some("big value".to_string()))]);
    }

    #[test]
    fn retain_columns_drops_values_and_registers_of_dropped_columns() {
        let t = |v: &str| Some(v.to_string());
        let mut c = RowChange {
            schema: "public".into(),
            table: "t".into(),
            op: RowOp::Update,
            key: vec![("id".into(), t("1"))],
            values: vec![("a".into(), t("x")), ("gone".into(), t("y"))],
            unchanged: vec!["gone".into()],
            versions: vec![
                ("id".into(), t("1")),
                ("$row|a".into(), t("1")),
                ("$stamp".into(), t("5")),
                ("a|t".into(), t("5")),
                ("gone|t".into(), t("4")),
                ("gone|n".into(), t("a")),
            ],
        };
        c.retain_columns(|col| col != "gone");
        assert_eq!(c.values, vec![("a".to_string(), t("x"))]);
        assert!(c.unchanged.is_empty());
        let names: Vec<&str> = c.versions.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "$row|a", "$stamp", "a|t"]);
    }
}

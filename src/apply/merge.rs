//! Two-way apply (DESIGN §6, §6b): each row change meets the locked local row and its
//! versions row, [`merge_row`] decides every column and `$row`, and the merged row and
//! registers are written back; conflicts are recorded; a source transaction that hits a
//! constraint no merge can avoid is parked, never retried forever, never dropped.
//!
//! Locking: the local data row is locked first (`SELECT ... FOR UPDATE`), then its versions
//! row, the order in which an application's write and its capture trigger take them. A versions
//! row that does not exist yet is created empty first (`INSERT ... ON CONFLICT DO NOTHING`) so
//! it can be locked before it is read: a concurrent local write then waits for the apply
//! instead of being overwritten by registers computed without it. The empty row means
//! "registers all empty", the same as no row, and is overwritten by the merged registers in the
//! same transaction.
//!
//! Parking: every source transaction runs under a savepoint. An integrity error (class 23) or
//! a value the target rejects (class 22) rolls back to it, and the transaction's changes are
//! stored in `pgduplex.parked` instead, in the target transaction that advances the origin past
//! them: nothing is lost, the stream goes on. Later transactions touching a parked key are
//! parked behind it, in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::{Client, Statement};

use super::{ApplyError, Applier, ConflictCount, TextValue};
use crate::config::ConflictPolicies;
use crate::db::{DbError, quote_ident};
use crate::lsn::Lsn;
use crate::pipeline::pair::{PairError, RowChange, RowOp, Text};
use crate::versions::{
    Cell, Existence, NodeId, Outcome, Policy, ROW, Register, Resolution, RowMerge, RowVersions, Side, Stamp,
    VersionVector, merge_row,
};

/// Name of the tombstone-values column of a versions table.
const DEAD: &str = "$dead";
/// Name of the column holding the largest stamp a row has seen (what a local write's stamp must
/// exceed).
const STAMP: &str = "$stamp";

/// A two-way table on the target, as `pgduplex.tracked` and the catalog describe it.
struct TwoWayTable {
    qualified: String,
    target: String,
    versions: String,
    keys: Vec<String>,
    columns: Vec<String>,
    policy: Policy,
    overriding: bool,
    /// The primary key constraint's name: a violation of it is a race with a local insert
    /// (retry), not a conflict the merge cannot settle (park).
    primary_key: Option<String>,
    read_row: Statement,
    placeholder: Statement,
    read_versions: Statement,
}

/// `"k1" = $<offset+1> AND ...`
fn where_keys(keys: &[String], offset: usize) -> String {
    keys.iter().enumerate().map(|(i, k)| format!("{} = ${}", quote_ident(k), i + offset + 1)).collect::<Vec<_>>().join(" AND ")
}

/// `$row` and every tracked column, in versions-table order.
fn registers(columns: &[String]) -> impl Iterator<Item = &str> {
    std::iter::once(ROW).chain(columns.iter().map(String::as_str))
}

impl TwoWayTable {
    fn where_keys(&self, offset: usize) -> String {
        where_keys(&self.keys, offset)
    }

    fn registers(&self) -> impl Iterator<Item = &str> {
        registers(&self.columns)
    }
}

/// What the two-way apply of one direction knows beyond the one-way applier.
pub struct TwoWay {
    /// The node this applier writes to.
    local: NodeId,
    /// The node the changes come from.
    remote: NodeId,
    /// Both nodes, sorted: the order of the per-node counter columns.
    nodes: [NodeId; 2],
    policies: ConflictPolicies,
    tables: HashMap<String, TwoWayTable>,
    statements: HashMap<String, Statement>,
    /// `(table, key as JSON)` of every parked change from this source.
    parked: HashSet<(String, String)>,
}

/// A failed merge: either the change cannot be applied here and should be parked, or the apply
/// itself failed (connection, lock conflict, schema drift) and the batch must be retried.
enum MergeFailure {
    Park { error: String, sqlstate: Option<String> },
    Apply(ApplyError),
}

impl From<ApplyError> for MergeFailure {
    fn from(e: ApplyError) -> Self {
        MergeFailure::Apply(e)
    }
}

/// Errors the merge cannot avoid: integrity (23) and data exceptions (22).
fn parkable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("23") || c.code().starts_with("22"))
}

fn text_param(v: &Text) -> TextValue {
    TextValue(v.as_ref().map(|s| Bytes::copy_from_slice(s.as_bytes())))
}

/// The key as a JSON object `{"column": "text value"}`, as stored in conflicts and parked, with
/// its keys in jsonb's own order (shorter first, then bytewise) so that it equals `key::text`
/// read back from the table.
fn key_json(key: &[(String, Text)]) -> String {
    let mut pairs: Vec<&(String, Text)> = key.iter().collect();
    pairs.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then_with(|| a.0.cmp(&b.0)));
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v.as_ref().map_or(serde_json::Value::Null, |v| serde_json::Value::String(v.clone()));
            format!("{}: {}", serde_json::Value::String(k.clone()), v)
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// A register as text for `pgduplex.conflicts`: `{a: 3, b: 5} t=... n=a`.
fn show_register(r: &Register) -> String {
    let v: Vec<String> = r.v().iter().map(|(n, c)| format!("{n}: {c}")).collect();
    match r.stamp() {
        Some(s) => format!("{{{}}} t={} n={}", v.join(", "), s.t, s.node),
        None => "{}".into(),
    }
}

fn resolution_label(r: Resolution) -> &'static str {
    match r {
        Resolution::Local => "local",
        Resolution::Remote => "remote",
        Resolution::Mixed => "mixed",
    }
}

/// Parses the tombstone values (`{"column": "text" | null}`).
fn dead_values(json: Option<&str>, table: &str) -> Result<HashMap<String, Text>, ApplyError> {
    let Some(json) = json else { return Ok(HashMap::new()) };
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).map_err(|e| ApplyError::BadChange {
        table: table.into(),
        message: format!("tombstone values are not a JSON object: {e}"),
    })?;
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let t = match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s),
                other => Some(other.to_string()),
            };
            (k, t)
        })
        .collect())
}

/// Builds a register from its stored parts: per-node counters, `t`, `n`.
fn register(table: &str, column: &str, counters: [(NodeId, Option<i64>); 2], t: Option<i64>, n: Option<&str>) -> Result<Register, ApplyError> {
    let bad = |message: String| ApplyError::BadChange { table: table.into(), message: format!("register of column {column}: {message}") };
    let mut v = VersionVector::new();
    for (node, c) in counters {
        if let Some(c) = c.filter(|c| *c > 0) {
            v.set(node, c as u64);
        }
    }
    let stamp = match (t, n) {
        (Some(t), Some(n)) => Some(Stamp { t, node: NodeId::new(n).map_err(|e| bad(e.to_string()))? }),
        (None, None) => None,
        _ => return Err(bad("t and n must both be set or both be empty".into())),
    };
    Register::new(v, stamp).map_err(|e| bad(e.to_string()))
}

impl TwoWay {
    pub fn new(local: NodeId, remote: NodeId, policies: ConflictPolicies) -> TwoWay {
        let nodes = if local.as_str() < remote.as_str() { [local, remote] } else { [remote, local] };
        TwoWay { local, remote, nodes, policies, tables: HashMap::new(), statements: HashMap::new(), parked: HashSet::new() }
    }
}

impl Applier {
    /// Turns this applier into a two-way one: changes arrive paired with their versions rows
    /// and are merged. Reads the keys already parked from this source.
    pub async fn enable_two_way(&mut self, two_way: TwoWay) -> Result<(), ApplyError> {
        self.two_way = Some(two_way);
        self.refresh_parked().await
    }

    /// Re-reads the parked changes from this source (`pgduplex resolve` removes them while we
    /// run): the gauge, and the keys later changes must be parked behind.
    pub async fn refresh_parked(&mut self) -> Result<(), ApplyError> {
        let Some(tw) = &self.two_way else { return Ok(()) };
        let remote = tw.remote.as_str().to_string();
        let rows = self
            .client
            .query("SELECT table_name, key::text FROM pgduplex.parked WHERE source_node = $1", &[&remote])
            .await
            .map_err(self.db_err("cannot read pgduplex.parked"))?;
        self.metrics.parked_changes.with_label_values(&[&self.label]).set(rows.len() as i64);
        if let Some(tw) = &mut self.two_way {
            tw.parked = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        Ok(())
    }

    /// A Relation message for a two-way table (or its versions table): its catalog facts are
    /// read again before its next change.
    pub fn forget_two_way_table(&mut self, qualified: &str) {
        if let Some(tw) = &mut self.two_way {
            tw.tables.remove(qualified);
        }
    }

    /// Applies one source transaction of a two-way direction: its paired changes, or, when they
    /// could not be paired, parks it.
    pub async fn apply_paired(
        &mut self,
        changes: Result<Vec<RowChange>, (PairError, Vec<RowChange>)>,
        source_lsn: Lsn,
    ) -> Result<(), ApplyError> {
        let (changes, park_reason) = match changes {
            Ok(c) => (c, None),
            Err((e, c)) => (c, Some((e.to_string(), None))),
        };
        if changes.is_empty() {
            return Ok(());
        }
        self.begin_if_needed().await?;
        self.flush_pending().await?;
        self.drain().await?;
        let client = self.client.clone();
        let node = self.node.clone();
        let exec = |sql: &'static str| {
            let client = client.clone();
            let node = node.clone();
            async move { client.batch_execute(sql).await.map_err(|e| ApplyError::Db(DbError::new(&node, sql, e))) }
        };

        let behind_parked = self.parked_key_among(&changes).await?;
        let mut park = park_reason.or(behind_parked.map(|m| (m, None)));
        if park.is_none() {
            let conflicts_before = self.batch.as_ref().map_or(0, |b| b.conflicts.len());
            exec("SAVEPOINT pgduplex_source_transaction").await?;
            for c in &changes {
                match self.merge_changes(std::slice::from_ref(c), source_lsn).await {
                    Ok(()) => {}
                    Err(MergeFailure::Park { error, sqlstate }) => {
                        park = Some((error, sqlstate));
                        break;
                    }
                    Err(MergeFailure::Apply(e)) => return Err(e),
                }
            }
            if park.is_some() {
                exec("ROLLBACK TO SAVEPOINT pgduplex_source_transaction").await?;
                if let Some(b) = &mut self.batch {
                    b.conflicts.truncate(conflicts_before);
                }
            }
            exec("RELEASE SAVEPOINT pgduplex_source_transaction").await?;
        }
        if let Some((error, sqlstate)) = park {
            self.park(&changes, source_lsn, &error, sqlstate.as_deref()).await?;
        }
        if let Some(b) = &mut self.batch {
            b.rows += changes.len() as u64;
        }
        Ok(())
    }

    /// Whether a change of `changes` touches a key with parked changes from this source: then
    /// it must be parked behind them. The in-memory set is only a fast path (`resolve` removes
    /// rows behind our back): a hit is confirmed in `pgduplex.parked`, waiting for a `resolve`
    /// in progress on that key (it holds the rows FOR UPDATE).
    async fn parked_key_among(&mut self, changes: &[RowChange]) -> Result<Option<String>, ApplyError> {
        let Some(tw) = &self.two_way else { return Ok(None) };
        let remote = tw.remote.as_str().to_string();
        let hits: Vec<(String, String)> = changes
            .iter()
            .map(|c| (c.qualified(), key_json(&c.key)))
            .filter(|k| tw.parked.contains(k))
            .collect();
        for (table, key) in hits {
            let still = self
                .client
                .query_opt(
                    "SELECT id FROM pgduplex.parked WHERE source_node = $1 AND table_name = $2 AND key = $3::text::jsonb \
                     ORDER BY id LIMIT 1 FOR SHARE",
                    &[&remote, &table, &key],
                )
                .await
                .map_err(self.db_err("cannot read pgduplex.parked"))?;
            match still {
                Some(row) => {
                    let id: i64 = row.get(0);
                    return Ok(Some(format!("parked behind change {id} of {table} key {key}, which is parked")));
                }
                None => {
                    if let Some(tw) = &mut self.two_way {
                        tw.parked.remove(&(table, key));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Applies the parked changes of one row (the key of parked change `id` from this source),
    /// joined in their order, to the target in a transaction of its own, and removes them from
    /// `pgduplex.parked`. `Ok(Err(reason))` when the row still cannot be applied (it stays
    /// parked).
    pub async fn resolve_parked(&mut self, id: i64) -> Result<Result<usize, String>, ApplyError> {
        let Some(tw) = &self.two_way else { return Ok(Err("not a two-way applier".into())) };
        let remote = tw.remote.as_str().to_string();
        self.client.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SET CONSTRAINTS ALL IMMEDIATE").await.map_err(self.db_err("cannot begin"))?;
        let result = self.resolve_in_transaction(id, &remote).await;
        let end = match &result {
            Ok(Ok(_)) => "COMMIT",
            _ => "ROLLBACK",
        };
        self.client.batch_execute(end).await.map_err(self.db_err(format!("cannot {end} the resolve transaction")))?;
        result
    }

    async fn resolve_in_transaction(&mut self, id: i64, remote: &str) -> Result<Result<usize, String>, ApplyError> {
        let Some(first) = self
            .client
            .query_opt("SELECT table_name, key::text FROM pgduplex.parked WHERE id = $1 AND source_node = $2", &[&id, &remote])
            .await
            .map_err(self.db_err("cannot read pgduplex.parked"))?
        else {
            return Ok(Err(format!("no parked change {id} from node {remote} on node {}", self.node)));
        };
        let (table, key): (String, String) = (first.get(0), first.get(1));
        let rows = self
            .client
            .query(
                "SELECT id, source_lsn::text, change::text FROM pgduplex.parked \
                 WHERE source_node = $1 AND table_name = $2 AND key = $3::text::jsonb ORDER BY id FOR UPDATE",
                &[&remote, &table, &key],
            )
            .await
            .map_err(self.db_err("cannot lock parked changes"))?;
        let mut chain = Vec::new();
        let mut ids = Vec::new();
        let mut lsn = Lsn::ZERO;
        for r in &rows {
            ids.push(r.get::<_, i64>(0));
            lsn = r.get::<_, String>(1).parse().unwrap_or(Lsn::ZERO);
            let change: RowChange = serde_json::from_str(r.get::<_, &str>(2)).map_err(|e| ApplyError::BadChange {
                table: table.clone(),
                message: format!("parked change {} cannot be read: {e}", r.get::<_, i64>(0)),
            })?;
            chain.push(change);
        }
        if chain.iter().any(|c| c.versions.is_empty()) {
            return Ok(Err(format!(
                "a parked change of {table} key {key} came without its versions row (its capture trigger did not fire on node {remote}): \
                 pgduplex cannot merge it; make the rows agree by hand, then discard it"
            )));
        }
        match self.merge_changes(&chain, lsn).await {
            Ok(()) => {}
            Err(MergeFailure::Park { error, .. }) => return Ok(Err(error)),
            Err(MergeFailure::Apply(e)) => return Err(e),
        }
        self.client
            .execute("DELETE FROM pgduplex.parked WHERE id = ANY ($1)", &[&ids])
            .await
            .map_err(self.db_err("cannot remove resolved changes from pgduplex.parked"))?;
        Ok(Ok(ids.len()))
    }

    /// Stores a source transaction's changes in `pgduplex.parked` (in the open batch, so with
    /// the origin progress past them) and alerts.
    async fn park(&mut self, changes: &[RowChange], source_lsn: Lsn, error: &str, sqlstate: Option<&str>) -> Result<(), ApplyError> {
        let Some(tw) = &mut self.two_way else { return Ok(()) };
        let remote = tw.remote.as_str().to_string();
        for c in changes {
            let key = key_json(&c.key);
            let change = serde_json::to_string(c).map_err(|e| ApplyError::BadChange { table: c.qualified(), message: e.to_string() })?;
            self.client
                .execute(
                    "INSERT INTO pgduplex.parked (source_node, source_lsn, table_name, key, change, error, sqlstate) \
                     VALUES ($1, $2::text::pg_lsn, $3, $4::text::jsonb, $5::text::jsonb, $6, $7)",
                    &[&remote, &source_lsn.to_string(), &c.qualified(), &key, &change, &error, &sqlstate],
                )
                .await
                .map_err(|e| ApplyError::Db(DbError::new(&self.node, format!("cannot park a change of {}", c.qualified()), e)))?;
            tw.parked.insert((c.qualified(), key.clone()));
            tracing::warn!(direction = %self.label, table = %c.qualified(), key = %key, %source_lsn, error, "change parked: see `pgduplex resolve`");
        }
        self.metrics.parked_changes.with_label_values(&[&self.label]).add(changes.len() as i64);
        Ok(())
    }

    async fn two_way_table(&mut self, schema: &str, table: &str) -> Result<(), ApplyError> {
        let qualified = format!("{schema}.{table}");
        let Some(tw) = &self.two_way else { return Ok(()) };
        if tw.tables.contains_key(&qualified) {
            return Ok(());
        }
        let row = self
            .client
            .query_opt(
                "SELECT key_columns, tracked_columns, versions_table, \
                 EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = format('%I.%I', table_schema, table_name)::regclass \
                         AND a.attidentity = 'a' AND NOT a.attisdropped), \
                 (SELECT conname::text FROM pg_constraint WHERE conrelid = format('%I.%I', table_schema, table_name)::regclass \
                         AND contype = 'p') \
                 FROM pgduplex.tracked WHERE table_schema = $1 AND table_name = $2",
                &[&schema, &table],
            )
            .await
            .map_err(self.db_err(format!("cannot read pgduplex.tracked for {qualified}")))?;
        let Some(row) = row else {
            return Err(ApplyError::BadChange {
                table: qualified,
                message: format!("not replicated both ways on node {} (no entry in pgduplex.tracked): run `pgduplex init`", self.node),
            });
        };
        let keys: Vec<String> = row.get(0);
        let columns: Vec<String> = row.get(1);
        let versions_table: String = row.get(2);
        let overriding: bool = row.get(3);
        let primary_key: Option<String> = row.get(4);
        let target = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let versions = format!("pgduplex.{}", quote_ident(&versions_table));
        let tw = self.two_way.as_ref().expect("checked above");
        let policy = tw.policies.for_table(schema, table);
        let nodes = tw.nodes;
        let where_all_keys = where_keys(&keys, 0);
        let cols: String = columns.iter().map(|c| format!(", {}::text", quote_ident(c))).collect();
        let read_row = format!("SELECT true{cols} FROM ONLY {target} WHERE {where_all_keys} FOR UPDATE");
        let key_list = keys.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
        let key_params = (1..=keys.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let placeholder = format!("INSERT INTO {versions} ({key_list}) VALUES ({key_params}) ON CONFLICT DO NOTHING");
        let regs: String = registers(&columns)
            .map(|r| {
                format!(
                    ", {}, {}, {}, {}",
                    quote_ident(&format!("{r}|{}", nodes[0])),
                    quote_ident(&format!("{r}|{}", nodes[1])),
                    quote_ident(&format!("{r}|t")),
                    quote_ident(&format!("{r}|n"))
                )
            })
            .collect();
        let read_versions = format!(
            "SELECT {}::text, {}{regs} FROM {versions} WHERE {where_all_keys} FOR UPDATE",
            quote_ident(DEAD),
            quote_ident(STAMP),
        );
        let prep = |sql: String| {
            let client = self.client.clone();
            let node = self.node.clone();
            let q = qualified.clone();
            async move {
                client.prepare(&sql).await.map_err(|e| {
                    ApplyError::Db(DbError::new(&node, format!("cannot prepare the two-way apply of {q} (do both nodes have the same columns?)"), e))
                })
            }
        };
        let t = TwoWayTable {
            read_row: prep(read_row).await?,
            placeholder: prep(placeholder).await?,
            read_versions: prep(read_versions).await?,
            qualified: qualified.clone(),
            target,
            versions,
            keys,
            columns,
            policy,
            overriding,
            primary_key,
        };
        if let Some(tw) = &mut self.two_way {
            tw.tables.insert(qualified, t);
        }
        Ok(())
    }

    async fn cached(&mut self, sql: String) -> Result<Statement, ApplyError> {
        if let Some(tw) = &self.two_way
            && let Some(s) = tw.statements.get(&sql)
        {
            return Ok(s.clone());
        }
        let stmt = self.client.prepare(&sql).await.map_err(self.db_err(format!("cannot prepare {sql}")))?;
        if let Some(tw) = &mut self.two_way {
            if tw.statements.len() > 4096 {
                tw.statements.clear();
            }
            tw.statements.insert(sql, stmt.clone());
        }
        Ok(stmt)
    }

    /// Merges a chain of changes of one row (one change while streaming; a key's parked
    /// changes on resolve) into the target.
    async fn merge_changes(&mut self, chain: &[RowChange], source_lsn: Lsn) -> Result<(), MergeFailure> {
        let Some(c) = chain.first() else { return Ok(()) };
        self.two_way_table(&c.schema, &c.table).await?;
        let client: Arc<Client> = self.client.clone();
        let node = self.node.clone();
        let tw = self.two_way.as_ref().expect("two-way applier");
        let t = tw.tables.get(&c.qualified()).expect("loaded above");
        let (local_node, remote_node, nodes, policy) = (tw.local, tw.remote, tw.nodes, t.policy);
        let db = |context: &str, e: tokio_postgres::Error| -> MergeFailure {
            if parkable(&e) {
                let sqlstate = e.code().map(|s| s.code().to_string());
                let error = DbError::new(&node, context.to_string(), e).to_string();
                MergeFailure::Park { error, sqlstate }
            } else {
                MergeFailure::Apply(ApplyError::Db(DbError::new(&node, context.to_string(), e)))
            }
        };
        // Key values in the table's primary-key order (the change lists them in column order).
        let key: Vec<TextValue> = t
            .keys
            .iter()
            .map(|k| {
                c.key.iter().find(|(n, _)| n == k).map(|(_, v)| text_param(v)).ok_or_else(|| {
                    MergeFailure::Apply(ApplyError::SchemaDrift {
                        table: t.qualified.clone(),
                        message: format!("the change has no value for key column {k}: the nodes' primary keys differ"),
                    })
                })
            })
            .collect::<Result<_, _>>()?;
        let key_refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = key.iter().map(|v| v as _).collect();

        // Lock and read: data row first, then the versions row (the trigger's order).
        // The data row is read twice: locked first (the trigger's order), and again once the
        // versions row is locked, since a local insert of the key may have committed in between
        // (it was invisible, so not locked, the first time). All four in one round trip.
        let (_, _, versions, row) = tokio::try_join!(
            async { client.query_opt(&t.read_row, &key_refs).await.map_err(|e| db(&format!("cannot read {} for update", t.qualified), e)) },
            async { client.execute(&t.placeholder, &key_refs).await.map_err(|e| db(&format!("cannot create the versions row of {}", t.qualified), e)) },
            async { client.query_one(&t.read_versions, &key_refs).await.map_err(|e| db(&format!("cannot read versions of {}", t.qualified), e)) },
            async { client.query_opt(&t.read_row, &key_refs).await.map_err(|e| db(&format!("cannot read {} for update", t.qualified), e)) },
        )?;

        // The local row and registers.
        let local_dead = dead_values(versions.get::<_, Option<&str>>(0), &t.qualified)?;
        let local_stamp: Option<i64> = versions.get(1);
        let local_alive = row.is_some();
        let mut regs = HashMap::new();
        for (i, r) in t.registers().enumerate() {
            let base = 2 + i * 4;
            let reg = register(
                &t.qualified,
                r,
                [(nodes[0], versions.get(base)), (nodes[1], versions.get(base + 1))],
                versions.get(base + 2),
                versions.get::<_, Option<&str>>(base + 3),
            )?;
            regs.insert(r.to_string(), reg);
        }
        let local_values: BTreeMap<String, Text> = t
            .columns
            .iter()
            .enumerate()
            .map(|(i, col)| {
                let v = match &row {
                    Some(row) => row.get::<_, Option<String>>(i + 1),
                    None => local_dead.get(col).cloned().flatten(),
                };
                (col.clone(), v)
            })
            .collect();
        let local = RowVersions {
            row: Cell { reg: regs.remove(ROW).unwrap_or_default(), value: if local_alive { Existence::Alive } else { Existence::Dead } },
            columns: local_values.iter().map(|(k, v)| (k.clone(), Cell { reg: regs.remove(k).unwrap_or_default(), value: v.clone() })).collect(),
        };

        // The remote row and registers: the change's, or the join of a parked chain's.
        let mut unsent = Vec::new();
        let mut absent = Vec::new();
        let mut remote: Option<RowVersions<Text>> = None;
        let mut row_stamp = local_stamp;
        for c in chain {
            let shipped = c.versions.iter().find(|(k, _)| k == STAMP).and_then(|(_, v)| v.as_deref());
            if let Some(v) = shipped {
                let v: i64 = v.parse().map_err(|e| {
                    MergeFailure::Apply(ApplyError::BadChange { table: t.qualified.clone(), message: format!("versions column {STAMP}: {e}") })
                })?;
                row_stamp = row_stamp.max(Some(v));
            }
            let RemoteRow { row: r, unsent: mut u, absent: mut a } = remote_row(c, &t.qualified, nodes, &local_values)?;
            unsent.append(&mut u);
            absent.append(&mut a);
            remote = Some(match remote {
                None => r,
                Some(acc) => merge_row(&acc, &r, policy)
                    .map_err(|e| MergeFailure::Apply(ApplyError::SchemaDrift { table: t.qualified.clone(), message: e.to_string() }))?
                    .row,
            });
        }
        let Some(remote) = remote else { return Ok(()) };
        let c = &chain[chain.len() - 1];
        let merged: RowMerge<Text> = merge_row(&local, &remote, policy).map_err(|e| {
            MergeFailure::Apply(ApplyError::SchemaDrift { table: t.qualified.clone(), message: e.to_string() })
        })?;
        for col in &unsent {
            if merged.column_outcomes.get(col).is_some_and(|o| *o != Outcome::KeepLocal) {
                return Err(MergeFailure::Park {
                    error: format!("table {}, column {col}: the remote value wins the merge but was not sent (unchanged TOAST)", t.qualified),
                    sqlstate: None,
                });
            }
        }

        // Write the merged row.
        let m = &merged.row;
        let (target, versions_table, overriding) = (t.target.clone(), t.versions.clone(), t.overriding);
        let primary_key = t.primary_key.clone();
        let keys = t.keys.clone();
        let columns = t.columns.clone();
        let qualified = t.qualified.clone();
        let registers: Vec<String> = t.registers().map(str::to_string).collect();
        let where_all_keys = t.where_keys(0);
        if m.is_alive() {
            if local_alive {
                let changed: Vec<&String> = columns.iter().filter(|col| m.columns[*col].value != local_values[*col]).collect();
                if !changed.is_empty() {
                    let set = changed.iter().enumerate().map(|(i, col)| format!("{} = ${}", quote_ident(col), i + 1)).collect::<Vec<_>>().join(", ");
                    let sql = format!("UPDATE ONLY {target} SET {set} WHERE {}", t.where_keys(changed.len()));
                    let mut params: Vec<TextValue> = changed.iter().map(|col| text_param(&m.columns[*col].value)).collect();
                    params.extend(key.iter().cloned());
                    let stmt = self.cached(sql).await?;
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|v| v as _).collect();
                    client.execute(&stmt, &refs).await.map_err(|e| db(&format!("cannot update {qualified}"), e))?;
                }
            } else {
                // A column the source lacks and nobody wrote here takes its default, as it
                // will on the source when the same ALTER TABLE adds it there.
                let columns: Vec<String> = columns
                    .into_iter()
                    .filter(|col| !(absent.contains(col) && m.columns[col].reg == Register::default()))
                    .collect();
                let names: Vec<String> = keys.iter().chain(columns.iter()).map(|c| quote_ident(c)).collect();
                let params_sql = (1..=names.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                let sql = format!(
                    "INSERT INTO {target} ({}){} VALUES ({params_sql})",
                    names.join(", "),
                    if overriding { " OVERRIDING SYSTEM VALUE" } else { "" }
                );
                let mut params: Vec<TextValue> = key.clone();
                params.extend(columns.iter().map(|col| text_param(&m.columns[col].value)));
                let stmt = self.cached(sql).await?;
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|v| v as _).collect();
                client.execute(&stmt, &refs).await.map_err(|e| {
                    let pk_race = e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
                        && e.as_db_error().and_then(|d| d.constraint()).is_some_and(|c| Some(c) == primary_key.as_deref());
                    if pk_race {
                        // A local insert of this key committed after our reads: retry the batch.
                        MergeFailure::Apply(ApplyError::Db(DbError::new(&node, format!("row of {qualified} inserted concurrently; retrying"), e)))
                    } else {
                        db(&format!("cannot insert into {qualified}"), e)
                    }
                })?;
            }
        } else if local_alive {
            let stmt = self.cached(format!("DELETE FROM ONLY {target} WHERE {where_all_keys}")).await?;
            client.execute(&stmt, &key_refs).await.map_err(|e| db(&format!("cannot delete from {qualified}"), e))?;
        }

        // Write the merged registers (and the tombstone values of a dead row).
        let dead: Text = if m.is_alive() {
            None
        } else {
            let map: serde_json::Map<String, serde_json::Value> = m
                .columns
                .iter()
                .map(|(k, cell)| (k.clone(), cell.value.clone().map_or(serde_json::Value::Null, serde_json::Value::String)))
                .collect();
            Some(serde_json::Value::Object(map).to_string())
        };
        // The row's Lamport clock is the largest stamp either side has seen: a maximum, so a join.
        let row_stamp = row_stamp.max(m.max_t());
        let mut set = vec![format!("{} = $1::text::jsonb", quote_ident(DEAD)), format!("{} = $2", quote_ident(STAMP))];
        let mut params = vec![text_param(&dead), text_param(&row_stamp.map(|t| t.to_string()))];
        for r in &registers {
            let reg = if r == ROW { &m.row.reg } else { &m.columns[r].reg };
            for n in nodes {
                let counter = reg.v().get(n);
                params.push(text_param(&(counter > 0).then(|| counter.to_string())));
                set.push(format!("{} = ${}", quote_ident(&format!("{r}|{n}")), params.len()));
            }
            params.push(text_param(&reg.t().map(|t| t.to_string())));
            set.push(format!("{} = ${}", quote_ident(&format!("{r}|t")), params.len()));
            params.push(text_param(&reg.n().map(|n| n.to_string())));
            set.push(format!("{} = ${}", quote_ident(&format!("{r}|n")), params.len()));
        }
        let offset = params.len();
        let where_v = where_keys(&keys, offset);
        params.extend(key.iter().cloned());
        let stmt = self.cached(format!("UPDATE {versions_table} SET {} WHERE {where_v}", set.join(", "))).await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|v| v as _).collect();
        client.execute(&stmt, &refs).await.map_err(|e| db(&format!("cannot write versions of {qualified}"), e))?;

        if let Some(conflict) = &merged.conflict {
            self.record_conflict(c, &local, &remote, &merged, conflict, source_lsn, local_node, remote_node).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_conflict(
        &mut self,
        c: &RowChange,
        local: &RowVersions<Text>,
        remote: &RowVersions<Text>,
        merged: &RowMerge<Text>,
        conflict: &crate::versions::RowConflict,
        source_lsn: Lsn,
        local_node: NodeId,
        remote_node: NodeId,
    ) -> Result<(), MergeFailure> {
        let key = key_json(&c.key);
        let resolution = resolution_label(conflict.resolution);
        let existence = |e: Existence| Some(if e == Existence::Alive { "alive" } else { "dead" }.to_string());
        for col in &conflict.columns {
            let (l_reg, l_val, r_reg, r_val, outcome) = if col == ROW {
                (&local.row.reg, existence(local.row.value), &remote.row.reg, existence(remote.row.value), merged.row_outcome)
            } else {
                let (l, r) = (&local.columns[col], &remote.columns[col]);
                (&l.reg, l.value.clone(), &r.reg, r.value.clone(), merged.column_outcomes[col])
            };
            let side = match conflict.resolution {
                Resolution::Local => Side::Local,
                Resolution::Remote => Side::Remote,
                Resolution::Mixed => outcome.winner(),
            };
            let winner = match side {
                Side::Local => local_node,
                Side::Remote => remote_node,
            };
            self.client
                .execute(
                    "INSERT INTO pgduplex.conflicts (source_node, source_lsn, table_name, key, column_name, kind, resolution, \
                     local_register, local_value, remote_register, remote_value, winner) \
                     VALUES ($1, $2::text::pg_lsn, $3, $4::text::jsonb, $5, $6, $7, $8, $9, $10, $11, $12)",
                    &[
                        &remote_node.as_str(),
                        &source_lsn.to_string(),
                        &c.qualified(),
                        &key,
                        col,
                        &conflict.kind.as_str(),
                        &resolution,
                        &show_register(l_reg),
                        &l_val,
                        &show_register(r_reg),
                        &r_val,
                        &winner.as_str(),
                    ],
                )
                .await
                .map_err(|e| MergeFailure::Apply(ApplyError::Db(DbError::new(&self.node, "cannot record a conflict in pgduplex.conflicts", e))))?;
        }
        match &mut self.batch {
            Some(b) => b.conflicts.push(ConflictCount { table: c.qualified(), kind: conflict.kind.as_str(), resolution }),
            // `resolve` runs outside batches: its transaction is its own.
            None => {
                self.metrics.conflicts.with_label_values(&[&c.qualified(), conflict.kind.as_str(), resolution]).inc();
            }
        }
        tracing::debug!(direction = %self.label, table = %c.qualified(), key = %key, kind = %conflict.kind, resolution, "conflict resolved");
        Ok(())
    }
}

/// The remote row of one change: its registers from the versions row, its values from the
/// data change (or the tombstone values of a delete). Columns whose value was not sent
/// (unchanged TOAST) take the local value and are returned, to check they do not win.
fn remote_row(
    c: &RowChange,
    qualified: &str,
    nodes: [NodeId; 2],
    local_values: &BTreeMap<String, Text>,
) -> Result<RemoteRow, ApplyError> {
        let shipped: HashMap<&str, Option<&str>> = c.versions.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let num = |name: String| -> Result<Option<i64>, ApplyError> {
            shipped.get(name.as_str()).copied().flatten().map(str::parse::<i64>).transpose().map_err(|e| ApplyError::BadChange {
                table: c.qualified(),
                message: format!("versions column {name}: {e}"),
            })
        };
        let remote_reg = |col: &str| -> Result<Register, ApplyError> {
            register(
                &c.qualified(),
                col,
                [(nodes[0], num(format!("{col}|{}", nodes[0]))?), (nodes[1], num(format!("{col}|{}", nodes[1]))?)],
                num(format!("{col}|t"))?,
                shipped.get(format!("{col}|n").as_str()).copied().flatten(),
            )
        };
        let remote_cols: Vec<&str> = c
            .versions
            .iter()
            .filter_map(|(k, _)| k.strip_suffix("|t"))
            .filter(|k| *k != ROW)
            .collect();
        let remote_dead = if c.op == RowOp::Delete {
            dead_values(shipped.get(DEAD).copied().flatten(), qualified)?
        } else {
            HashMap::new()
        };
        let sent: HashMap<&str, &Text> = c.values.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut unsent = Vec::new();
        let mut remote_columns = BTreeMap::new();
        for col in remote_cols {
            let value = if c.op == RowOp::Delete {
                remote_dead.get(col).cloned().flatten()
            } else if let Some(v) = sent.get(col) {
                (*v).clone()
            } else {
                // Unchanged TOAST: the source kept its value, which the registers say we have.
                unsent.push(col.to_string());
                local_values.get(col).cloned().flatten()
            };
            remote_columns.insert(col.to_string(), Cell { reg: remote_reg(col)?, value });
        }
        // Columns the source does not have (added here first, DESIGN §6b): the source never
        // wrote them, so their register there is the empty one and the local value stands.
        let mut absent = Vec::new();
        for (col, value) in local_values {
            if !remote_columns.contains_key(col) {
                absent.push(col.clone());
                remote_columns.insert(col.clone(), Cell { reg: Register::default(), value: value.clone() });
            }
        }
        let remote = RowVersions {
            row: Cell { reg: remote_reg(ROW)?, value: if c.op == RowOp::Delete { Existence::Dead } else { Existence::Alive } },
            columns: remote_columns,
        };

        Ok(RemoteRow { row: remote, unsent, absent })
}

/// The remote row of one change, and what it lacks.
struct RemoteRow {
    row: RowVersions<Text>,
    /// Columns whose value was not sent (unchanged TOAST).
    unsent: Vec<String>,
    /// Columns the source's table does not have.
    absent: Vec<String>,
}

//! The target writer: applies one direction's decoded changes to the target database.
//!
//! Guarantees, and what they rest on:
//! - Every source transaction is applied whole, in source commit order, inside a target
//!   transaction. Several consecutive source transactions may share one target transaction
//!   (a *batch*), capped by rows and time; a TRUNCATE ends its batch.
//! - Exactly once: each batch calls `pg_replication_origin_xact_setup(<end LSN of the last
//!   source commit in the batch>, <its commit time>)` before COMMIT, so the origin's progress is
//!   durable together with the rows (DESIGN §5). A restart reads that progress and streams
//!   from there; nothing committed is applied twice, nothing uncommitted is skipped.
//! - The LSN reported to the source as flushed comes from
//!   `pg_replication_origin_session_progress(true)`, which flushes the target's WAL first, so
//!   the apply session may use `synchronous_commit = off`.
//!
//! Statements are pipelined: each one is sent on creation and its result collected later, in
//! order, so a batch costs round trips only at its end. Consecutive inserts into one table are
//! sent as COPY.

mod copy_text;
mod drift;
mod merge;
mod table;
mod text_value;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::{Client, CopyInSink, Statement};

use crate::config::{ApplyConfig, Direction, NodeConfig};
use crate::db::{self, DbError, quote_literal};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pgoutput::{ColumnValue, Commit, Delete, Insert, Relation, TupleData, Truncate, Update};

pub use drift::{HeldChange, PausedTable};
pub use merge::TwoWay;
pub use table::{TableMap, TargetColumn, TARGET_COLUMNS_SQL, pg_timestamp_literal};
pub use text_value::TextValue;

/// Why a change could not be applied. Each variant names the table (and column) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("table {table} is replicated from the source but does not exist on the target: create it with the same columns")]
    MissingTable { table: String },
    #[error("column {column} of table {table} exists on the source but not on the target: add it on the target")]
    MissingColumn { table: String, column: String },
    #[error("table {table} has no primary key and no REPLICA IDENTITY FULL on the source, so its updates and deletes cannot be matched")]
    NoReplicaIdentity { table: String },
    #[error("change for relation OID {oid} arrived before its Relation message")]
    UnknownRelation { oid: u32 },
    #[error("table {table}: {message}")]
    BadChange { table: String, message: String },
    /// The two nodes' tables differ (DDL applied on one side only so far): waits for the other.
    #[error("table {table}: {message}")]
    SchemaDrift { table: String, message: String },
}

impl ApplyError {
    /// Whether retrying (after reconnecting) may succeed without a person changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Db(e) => e.is_retryable(),
            ApplyError::SchemaDrift { .. } => true,
            _ => false,
        }
    }
}

/// What a pipelined request reports when it completes.
enum Completion {
    Done,
    /// A batch's COMMIT went through: its progress is now the origin's.
    Committed { end_lsn: Lsn, transactions: u64, rows: u64, started: Instant, conflicts: Vec<ConflictCount> },
}

/// A conflict recorded in a batch, counted in `pgduplex_conflicts_total` once the batch commits
/// (a batch that is rolled back and retried must not count its conflicts twice).
struct ConflictCount {
    table: String,
    kind: &'static str,
    resolution: &'static str,
}

type InFlight = Pin<Box<dyn Future<Output = Result<Completion, ApplyError>> + Send>>;

/// Statements are cached per relation, statement kind and the set of columns they touch.
#[derive(Clone, PartialEq, Eq, Hash)]
struct StatementKey {
    relation: u32,
    kind: u8,
    columns: Box<[u64]>,
    /// Rows per statement (multi-row UPDATE/DELETE), 1 otherwise.
    rows: usize,
}

fn column_mask(cols: &[usize]) -> Box<[u64]> {
    let mut mask = vec![0u64; cols.iter().max().map_or(0, |m| m / 64 + 1)];
    for &c in cols {
        mask[c / 64] |= 1 << (c % 64);
    }
    mask.into_boxed_slice()
}

/// An open COPY into one table: rows are streamed to the server while the stream is read, so
/// the target works in parallel with decoding instead of after it.
struct ActiveCopy {
    relation: u32,
    display: String,
    sink: Pin<Box<CopyInSink<Bytes>>>,
    buf: BytesMut,
}

/// Updates (or deletes) of one table, setting the same columns, to distinct keys: sent as one
/// multi-row statement.
struct RowGroup {
    relation: u32,
    kind: u8,
    set: Vec<usize>,
    identity: Vec<usize>,
    keys: HashSet<Vec<Option<Bytes>>>,
    params: Vec<TextValue>,
    rows: usize,
}

/// Most rows in one multi-row statement.
const GROUP_MAX_ROWS: usize = 256;

/// The target transaction being filled.
struct Batch {
    started: Instant,
    transactions: u64,
    rows: u64,
    /// End LSN and commit time of the last source transaction completed in this batch.
    last_end_lsn: Option<(Lsn, i64)>,
    /// Set by a TRUNCATE: commit after the current source transaction.
    must_end: bool,
    /// Conflicts resolved in this batch (two-way), counted when it commits.
    conflicts: Vec<ConflictCount>,
    /// Something other than applied rows was written (held changes, pauses): never roll back.
    dirty: bool,
}

/// Hand COPY data to the connection in chunks of about this size.
const COPY_CHUNK_BYTES: usize = 256 * 1024;
/// Wait for the oldest result once this many statements are in flight.
const MAX_IN_FLIGHT: usize = 1024;

/// Applies one direction's changes to its target.
pub struct Applier {
    client: Arc<Client>,
    node: String,
    label: String,
    origin: String,
    cfg: ApplyConfig,
    metrics: Arc<Metrics>,
    tables: HashMap<u32, TableMap>,
    statements: HashMap<StatementKey, Statement>,
    in_flight: VecDeque<InFlight>,
    copy: Option<ActiveCopy>,
    group: Option<RowGroup>,
    batch: Option<Batch>,
    /// End LSN of the last source transaction committed on the target.
    committed: Lsn,
    /// End LSN of a batch whose pipelined COMMIT has not been collected yet.
    commit_in_flight: Option<Lsn>,
    /// Set for two-way directions: changes are merged with version vectors.
    two_way: Option<TwoWay>,
}

impl Applier {
    /// Connects to the target, sets the apply session up and claims the replication origin.
    /// Returns the applier and the origin's durable progress (where streaming must resume).
    pub async fn connect(
        target: &NodeConfig,
        direction: &Direction,
        cfg: ApplyConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Applier, Lsn), ApplyError> {
        Applier::connect_with_origin(target, direction, cfg, metrics, direction.origin_name()).await
    }

    /// [`Applier::connect`] under another replication origin (`pgduplex resolve` tags its
    /// writes with the direction's resolve origin while `run` holds the apply origin).
    pub async fn connect_with_origin(
        target: &NodeConfig,
        direction: &Direction,
        cfg: ApplyConfig,
        metrics: Arc<Metrics>,
        origin: String,
    ) -> Result<(Applier, Lsn), ApplyError> {
        let node = target.name.to_string();
        let client = db::connect(target, &format!("pgduplex apply {}", direction.label())).await?;
        let setup = format!(
            "SET session_replication_role = replica; SET synchronous_commit = off; \
             SET lock_timeout = {}; SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SELECT set_config('transaction_timeout', '0', false) WHERE current_setting('server_version_num')::int >= 170000; \
             SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; SET bytea_output = 'hex'; \
             SET extra_float_digits = 3; SET pgduplex.apply = on",
            cfg.lock_timeout.as_millis()
        );
        client.batch_execute(&setup).await.map_err(|e| {
            DbError::new(
                &node,
                "cannot set up the apply session (session_replication_role needs superuser or \
                 GRANT SET ON PARAMETER session_replication_role)",
                e,
            )
        })?;
        let row = client
            .query_opt("SELECT roident FROM pg_replication_origin WHERE roname = $1", &[&origin])
            .await
            .map_err(|e| DbError::new(&node, "cannot read pg_replication_origin", e))?;
        if row.is_none() {
            return Err(ApplyError::BadChange {
                table: "-".into(),
                message: format!("replication origin {origin} is missing on node {node}: run `pgduplex init`"),
            });
        }
        client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map_err(|e| DbError::new(&node, format!("cannot claim replication origin {origin}"), e))?;
        let progress: Option<String> = client
            .query_one("SELECT pg_replication_origin_session_progress(false)::text", &[])
            .await
            .map_err(|e| DbError::new(&node, format!("cannot read progress of origin {origin}"), e))?
            .get(0);
        let committed = match progress {
            Some(p) => p.parse().map_err(|_| ApplyError::BadChange {
                table: "-".into(),
                message: format!("origin {origin} reports progress {p:?}, not an LSN"),
            })?,
            None => Lsn::ZERO,
        };
        Ok((
            Applier {
                client: Arc::new(client),
                node,
                label: direction.label(),
                origin,
                cfg,
                metrics,
                tables: HashMap::new(),
                statements: HashMap::new(),
                in_flight: VecDeque::new(),
                copy: None,
                group: None,
                batch: None,
                committed,
                commit_in_flight: None,
                two_way: None,
            },
            committed,
        ))
    }

    /// End LSN of the last source transaction committed on the target (maybe not yet flushed).
    pub fn committed_lsn(&self) -> Lsn {
        self.committed
    }

    /// Whether a target transaction is open.
    pub fn batch_open(&self) -> bool {
        self.batch.is_some()
    }

    /// When the open batch must be committed at the latest (its time cap).
    pub fn batch_deadline(&self) -> Option<Instant> {
        self.batch.as_ref().map(|b| b.started + self.cfg.batch_max_delay)
    }

    fn db_err(&self, context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + '_ {
        let context = context.into();
        move |e| ApplyError::Db(DbError::new(&self.node, context, e))
    }

    /// Opens a target transaction unless a batch is open. Called before a source
    /// transaction's first change, so transactions with nothing to apply open nothing.
    pub async fn begin_if_needed(&mut self) -> Result<(), ApplyError> {
        if self.batch.is_none() {
            // Deferrable constraints are checked at COMMIT, when the whole batch is in place.
            // READ COMMITTED whatever the target's default: a serializable COMMIT could fail
            // after the origin was set up (see commit_batch).
            //
            // While the previous batch's COMMIT is still in flight (pipelined), this batch first
            // checks that it landed: if that batch failed, this one must fail too, never commit
            // and move the origin past the lost batch.
            let sql = match self.commit_in_flight {
                None => "BEGIN ISOLATION LEVEL READ COMMITTED; SET CONSTRAINTS ALL DEFERRED".to_string(),
                Some(lsn) => format!(
                    "BEGIN ISOLATION LEVEL READ COMMITTED; SET CONSTRAINTS ALL DEFERRED; \
                     DO $pgduplex$BEGIN \
                     IF coalesce(pg_replication_origin_session_progress(false) < {l}::pg_lsn, true) THEN \
                     RAISE EXCEPTION 'the previous apply transaction (source transactions up to {lsn}) did not commit'; \
                     END IF; END$pgduplex$",
                    l = quote_literal(&lsn.to_string())
                ),
            };
            let client = self.client.clone();
            let node = self.node.clone();
            self.enqueue(Box::pin(async move {
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| ApplyError::Db(DbError::new(&node, "cannot begin apply transaction", e)))?;
                Ok(Completion::Done)
            }))
            .await?;
            self.batch = Some(Batch { started: Instant::now(), transactions: 0, rows: 0, last_end_lsn: None, must_end: false, conflicts: Vec::new(), dirty: false });
        }
        Ok(())
    }

    /// A Relation message: (re)matches the source relation against the target's catalog.
    pub async fn relation(&mut self, rel: &Relation) -> Result<(), ApplyError> {
        self.match_relation(rel, false).await
    }

    /// [`Applier::relation`]; `lenient` for replaying held changes (see
    /// [`TableMap::resolve_lenient`]).
    async fn match_relation(&mut self, rel: &Relation, lenient: bool) -> Result<(), ApplyError> {
        // (target_columns waits for the pipeline first.)
        let cols = self.target_columns(&rel.namespace, &rel.name).await?;
        self.install_relation(rel, &cols, lenient)
    }

    /// Matches `rel` against the target columns `cols` (already read) and caches the mapping.
    fn install_relation(&mut self, rel: &Relation, cols: &[TargetColumn], lenient: bool) -> Result<(), ApplyError> {
        let map = if lenient { TableMap::resolve_lenient(rel, cols)? } else { TableMap::resolve(rel, cols)? };
        self.statements.retain(|k, _| k.relation != rel.oid);
        self.tables.insert(rel.oid, map);
        Ok(())
    }

    fn table(&self, oid: u32) -> Result<&TableMap, ApplyError> {
        self.tables.get(&oid).ok_or(ApplyError::UnknownRelation { oid })
    }

    fn count_row(&mut self) {
        if let Some(b) = &mut self.batch {
            b.rows += 1;
        }
    }

    /// Streams an insert into the open COPY for its table (starting one if needed).
    pub async fn insert(&mut self, ins: &Insert) -> Result<(), ApplyError> {
        self.flush_group().await?;
        if self.copy.as_ref().is_some_and(|c| c.relation != ins.relation_oid) {
            self.flush_copy().await?;
        }
        if self.copy.is_none() {
            self.start_copy(ins.relation_oid).await?;
        }
        let table = self.tables.get(&ins.relation_oid).ok_or(ApplyError::UnknownRelation { oid: ins.relation_oid })?;
        if ins.new.columns.len() != table.columns.len() {
            return Err(ApplyError::BadChange {
                table: table.display.clone(),
                message: format!("insert has {} columns, the relation {}", ins.new.columns.len(), table.columns.len()),
            });
        }
        let Some(copy) = self.copy.as_mut() else { return Ok(()) };
        let mut first = true;
        for (i, value) in ins.new.columns.iter().enumerate() {
            if table.columns[i].is_none() {
                continue;
            }
            if !first {
                copy.buf.extend_from_slice(b"\t");
            }
            first = false;
            match value {
                ColumnValue::Null => copy_text::push_value(&mut copy.buf, None),
                ColumnValue::Text(b) => copy_text::push_value(&mut copy.buf, Some(b)),
                ColumnValue::UnchangedToast | ColumnValue::Binary(_) => {
                    return Err(ApplyError::BadChange {
                        table: table.display.clone(),
                        message: format!("insert carries an unexpected {} value in column {}", kind_name(value), table.names[i]),
                    });
                }
            }
        }
        copy.buf.extend_from_slice(b"\n");
        if copy.buf.len() >= COPY_CHUNK_BYTES {
            let chunk = copy.buf.split().freeze();
            let display = copy.display.clone();
            copy.sink.as_mut().send(chunk).await.map_err(self.db_err(format!("COPY into {display} failed")))?;
        }
        self.count_row();
        Ok(())
    }

    /// Opens a COPY into the table of `relation`. Waits for the pipeline first: COPY needs the
    /// connection to itself.
    async fn start_copy(&mut self, relation: u32) -> Result<(), ApplyError> {
        self.drain().await?;
        let table = self.table(relation)?;
        let sql = table.copy_sql();
        let display = table.display.clone();
        let sink = self
            .client
            .copy_in::<_, Bytes>(&sql)
            .await
            .map_err(self.db_err(format!("cannot start COPY into {display}")))?;
        self.copy = Some(ActiveCopy { relation, display, sink: Box::pin(sink), buf: BytesMut::with_capacity(COPY_CHUNK_BYTES) });
        Ok(())
    }

    /// Sends whatever is buffered (the open COPY or a row group) into the pipeline.
    async fn flush_pending(&mut self) -> Result<(), ApplyError> {
        self.flush_copy().await?;
        self.flush_group().await
    }

    /// Ends the open COPY; its completion is collected with the pipeline.
    async fn flush_copy(&mut self) -> Result<(), ApplyError> {
        let Some(ActiveCopy { display, mut sink, buf, .. }) = self.copy.take() else { return Ok(()) };
        let node = self.node.clone();
        self.enqueue(Box::pin(async move {
            let err = |e| ApplyError::Db(DbError::new(&node, format!("COPY into {display} failed"), e));
            if !buf.is_empty() {
                sink.as_mut().send(buf.freeze()).await.map_err(err)?;
            }
            sink.as_mut().finish().await.map_err(|e| ApplyError::Db(DbError::new(&node, format!("COPY into {display} failed"), e)))?;
            Ok(Completion::Done)
        }))
        .await
    }

    /// Prepares `sql` and caches it under `key` (callers look the cache up first, so SQL text
    /// is built only on a miss).
    async fn prepare(&mut self, key: StatementKey, sql: String) -> Result<Statement, ApplyError> {
        // A request that waits for its answer must not queue behind an unfinished COPY.
        self.drain().await?;
        let s = self.client.prepare(&sql).await.map_err(self.db_err(format!("cannot prepare {sql}")))?;
        self.statements.insert(key, s.clone());
        Ok(s)
    }

    /// Pipelines one statement; `expect_rows` names the change and how many rows it must touch
    /// (fewer means the target lacks rows the source had).
    async fn pipeline(&mut self, stmt: Statement, params: Vec<TextValue>, expect_rows: Option<(&'static str, String, u64)>) -> Result<(), ApplyError> {
        let client = self.client.clone();
        let node = self.node.clone();
        let metrics = self.metrics.clone();
        let label = self.label.clone();
        let context = match &expect_rows {
            Some((change, table, _)) => format!("{change} on {table} failed"),
            None => "apply statement failed".to_string(),
        };
        self.enqueue(Box::pin(async move {
            let n = client
                .execute_raw(&stmt, params.iter())
                .await
                .map_err(|e| ApplyError::Db(DbError::new(&node, context, e)))?;
            if let Some((change, table, expected)) = expect_rows
                && n < expected
            {
                metrics.missing_rows.with_label_values(&[&label]).inc_by(expected - n);
                tracing::warn!(direction = %label, %table, change, missing = expected - n, "rows not found on the target");
            }
            Ok(Completion::Done)
        }))
        .await
    }

    /// Sends a request (its first poll puts it on the connection, so requests reach the server
    /// in the order they are enqueued) and keeps it to collect its result later.
    async fn enqueue(&mut self, mut fut: InFlight) -> Result<(), ApplyError> {
        if let Poll::Ready(r) = futures_util::poll!(fut.as_mut()) {
            return r.map(|c| self.complete(c));
        }
        self.in_flight.push_back(fut);
        if self.in_flight.len() >= MAX_IN_FLIGHT
            && let Some(f) = self.in_flight.pop_front()
        {
            let c = f.await?;
            self.complete(c);
        }
        Ok(())
    }

    /// Books a completed request: a COMMIT moves the committed position and the metrics.
    fn complete(&mut self, c: Completion) {
        if let Completion::Committed { end_lsn, transactions, rows, started, conflicts } = c {
            for c in conflicts {
                self.metrics.conflicts.with_label_values(&[&c.table, c.kind, c.resolution]).inc();
            }
            debug_assert!(end_lsn >= self.committed, "origin progress must not go backwards");
            self.committed = self.committed.max(end_lsn);
            if self.commit_in_flight.is_some_and(|l| l <= end_lsn) {
                self.commit_in_flight = None;
            }
            tracing::debug!(direction = %self.label, transactions, rows, open_ms = started.elapsed().as_millis() as u64,
                %end_lsn, "batch committed");
            let l = [self.label.as_str()];
            self.metrics.applied_transactions.with_label_values(&l).inc_by(transactions);
            self.metrics.applied_changes.with_label_values(&l).inc_by(rows);
            self.metrics.apply_batch_transactions.with_label_values(&l).observe(transactions as f64);
            self.metrics.apply_batch_seconds.with_label_values(&l).observe(started.elapsed().as_secs_f64());
        }
    }

    /// Collects the results of pipelined requests that have completed, without waiting.
    pub async fn collect_completed(&mut self) -> Result<(), ApplyError> {
        while let Some(f) = self.in_flight.front_mut() {
            match futures_util::poll!(f.as_mut()) {
                Poll::Pending => break,
                Poll::Ready(r) => {
                    self.in_flight.pop_front();
                    match r {
                        Ok(c) => self.complete(c),
                        Err(e) => {
                            self.in_flight.clear();
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for every pipelined statement, in order.
    async fn drain(&mut self) -> Result<(), ApplyError> {
        while let Some(f) = self.in_flight.pop_front() {
            match f.await {
                Ok(c) => self.complete(c),
                Err(e) => {
                    self.in_flight.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The identity of the row an update/delete targets: the old key or old row when sent,
    /// else the key columns of the new row (the key did not change).
    fn identity<'a>(table: &TableMap, old: Option<&'a TupleData>, new: Option<&'a TupleData>) -> Result<(Vec<usize>, Vec<TextValue>), ApplyError> {
        let tuple = old.or(new).ok_or_else(|| ApplyError::BadChange {
            table: table.display.clone(),
            message: "update/delete without key or old row".into(),
        })?;
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for &c in &table.key {
            match tuple.columns.get(c) {
                Some(ColumnValue::Text(b)) => {
                    cols.push(c);
                    vals.push(TextValue(Some(b.clone())));
                }
                Some(ColumnValue::Null) => {
                    cols.push(c);
                    vals.push(TextValue(None));
                }
                // With REPLICA IDENTITY FULL an unchanged TOAST value is not sent: leave it out.
                Some(ColumnValue::UnchangedToast) if table.full_identity => {}
                other => {
                    return Err(ApplyError::BadChange {
                        table: table.display.clone(),
                        message: format!("key column {} is {}", table.names[c], other.map_or("missing", kind_name)),
                    });
                }
            }
        }
        Ok((cols, vals))
    }

    /// Pipelines an UPDATE of the sent columns (unchanged TOAST values are left untouched).
    pub async fn update(&mut self, up: &Update) -> Result<(), ApplyError> {
        self.flush_copy().await?;
        let table = self.table(up.relation_oid)?;
        let old = up.old_key.as_ref().or(up.old_row.as_ref());
        let (id_cols, id_vals) = Self::identity(table, old, Some(&up.new))?;
        // Without an old key the key did not change: no need to set it.
        let key_unchanged = old.is_none();
        let mut set = Vec::with_capacity(up.new.columns.len());
        let mut params = Vec::with_capacity(up.new.columns.len() + id_vals.len());
        for (i, v) in up.new.columns.iter().enumerate() {
            if table.columns.get(i).is_none_or(|c| c.is_none())
                || table.identity_always[i]
                || (key_unchanged && !table.full_identity && table.key.contains(&i))
            {
                continue;
            }
            match v {
                ColumnValue::Null => params.push(TextValue(None)),
                ColumnValue::Text(b) => params.push(TextValue(Some(b.clone()))),
                ColumnValue::UnchangedToast => continue,
                ColumnValue::Binary(_) => {
                    return Err(ApplyError::BadChange { table: table.display.clone(), message: "binary value received".into() });
                }
            }
            set.push(i);
        }
        // Setting a unique column (a key change included) goes alone: a multi-row UPDATE
        // checks uniqueness row by row, so a valid chain or swap would fail or be lost.
        let solo = set.iter().any(|&c| table.unique[c]);
        self.count_row();
        if set.is_empty() {
            return Ok(());
        }
        self.add_row(up.relation_oid, b'U', set, id_cols, params, id_vals, solo).await
    }

    /// Pipelines a DELETE.
    pub async fn delete(&mut self, del: &Delete) -> Result<(), ApplyError> {
        self.flush_copy().await?;
        let table = self.table(del.relation_oid)?;
        let old = del.old_key.as_ref().or(del.old_row.as_ref());
        let (id_cols, id_vals) = Self::identity(table, old, None)?;
        self.count_row();
        self.add_row(del.relation_oid, b'D', Vec::new(), id_cols, Vec::new(), id_vals, false).await
    }

    /// Adds an update (`kind` `U`) or delete (`D`) to the row group, sending the group first
    /// when this row cannot join it (other table or columns, a key already in it, full).
    #[allow(clippy::too_many_arguments)] // one row's parts; a struct would only be unpacked here
    async fn add_row(
        &mut self,
        relation: u32,
        kind: u8,
        set: Vec<usize>,
        identity: Vec<usize>,
        mut params: Vec<TextValue>,
        id_vals: Vec<TextValue>,
        solo: bool,
    ) -> Result<(), ApplyError> {
        let key: Vec<Option<Bytes>> = id_vals.iter().map(|v| v.0.clone()).collect();
        let per_row = set.len() + identity.len();
        let max_rows = GROUP_MAX_ROWS.min(u16::MAX as usize / per_row.max(1));
        let fits = !solo && self.group.as_ref().is_none_or(|g| {
            g.relation == relation
                && g.kind == kind
                && g.set == set
                && g.identity == identity
                && g.rows < max_rows
                && !g.keys.contains(&key)
        });
        if !fits {
            self.flush_group().await?;
        }
        params.extend(id_vals);
        let g = self.group.get_or_insert_with(|| RowGroup {
            relation,
            kind,
            set,
            identity,
            keys: HashSet::new(),
            params: Vec::new(),
            rows: 0,
        });
        g.keys.insert(key);
        g.params.extend(params);
        g.rows += 1;
        if solo {
            self.flush_group().await?;
        }
        Ok(())
    }

    /// Sends the row group as multi-row statements of power-of-two sizes (so few distinct
    /// statements are prepared), a lone row as a single-row statement.
    async fn flush_group(&mut self) -> Result<(), ApplyError> {
        let Some(g) = self.group.take() else { return Ok(()) };
        let table = self.table(g.relation)?;
        // REPLICA IDENTITY FULL rows are matched one at a time (`ctid ... LIMIT 1`).
        let single_only = table.full_identity;
        let display = table.display.clone();
        let per_row = g.set.len() + g.identity.len();
        let mut mask_cols: Vec<usize> = g.set.iter().map(|c| c * 2).collect();
        mask_cols.extend(g.identity.iter().map(|c| c * 2 + 1));
        let columns = column_mask(&mask_cols);
        let change = if g.kind == b'U' { "update" } else { "delete" };
        let mut params = g.params.into_iter();
        let mut remaining = g.rows;
        while remaining > 0 {
            let rows = if single_only { 1 } else { 1 << remaining.ilog2() };
            remaining -= rows;
            let key = StatementKey { relation: g.relation, kind: g.kind, columns: columns.clone(), rows };
            let stmt = match self.statements.get(&key) {
                Some(s) => s.clone(),
                None => {
                    let table = self.table(g.relation)?;
                    let sql = match (g.kind, rows) {
                        (b'U', 1) => table.update_sql(&g.set, &g.identity),
                        (b'U', n) => table.update_many_sql(&g.set, &g.identity, n),
                        (_, 1) => table.delete_sql(&g.identity),
                        (_, n) => table.delete_many_sql(&g.identity, n),
                    };
                    self.prepare(key, sql).await?
                }
            };
            let chunk: Vec<TextValue> = params.by_ref().take(rows * per_row).collect();
            self.pipeline(stmt, chunk, Some((change, display.clone(), rows as u64))).await?;
        }
        Ok(())
    }

    /// Applies a TRUNCATE; the batch then ends with this source transaction.
    pub async fn truncate(&mut self, tr: &Truncate) -> Result<(), ApplyError> {
        self.flush_pending().await?;
        self.drain().await?;
        let maps: Vec<&TableMap> = tr.relation_oids.iter().map(|&o| self.table(o)).collect::<Result<_, _>>()?;
        let sql = TableMap::truncate_sql(&maps, tr.restart_identity);
        self.client.batch_execute(&sql).await.map_err(self.db_err(sql.clone()))?;
        if let Some(b) = &mut self.batch {
            b.rows += tr.relation_oids.len() as u64;
            b.must_end = true;
        }
        Ok(())
    }

    /// A source transaction ended. Returns whether the batch should be committed now (a cap
    /// was reached); the caller also commits at the batch deadline and when the stream idles.
    /// An echo (`applied == false`) still moves the batch's progress past it, but is not counted.
    pub fn end_source_transaction(&mut self, commit: &Commit, applied: bool) -> bool {
        let Some(b) = &mut self.batch else { return false };
        b.transactions += u64::from(applied);
        b.last_end_lsn = Some((commit.end_lsn, commit.commit_time));
        b.must_end || b.rows >= self.cfg.batch_max_rows as u64 || b.started.elapsed() >= self.cfg.batch_max_delay
    }

    /// Commits the open batch with the origin progress of its last source transaction. The
    /// COMMIT is pipelined: [`Applier::committed_lsn`] moves when it completes (collected by
    /// [`Applier::drain`], which [`Applier::flushed_progress`] calls).
    pub async fn commit_batch(&mut self) -> Result<(), ApplyError> {
        let Some(batch) = self.batch.take() else { return Ok(()) };
        self.flush_pending().await?;
        let client = self.client.clone();
        let node = self.node.clone();
        let last = match batch.last_end_lsn {
            Some(last) => Some(last),
            // No source transaction completed but rows were written (a replay of held changes):
            // commit with the origin where it is.
            None if batch.rows > 0 || batch.dirty => Some((self.committed, crate::protocol::pg_epoch_micros_now())),
            None => None,
        };
        let Some((end_lsn, commit_time)) = last else {
            // Nothing happened in this batch.
            return self
                .enqueue(Box::pin(async move {
                    client.batch_execute("ROLLBACK").await.map_err(|e| ApplyError::Db(DbError::new(&node, "rollback", e)))?;
                    Ok(Completion::Done)
                }))
                .await;
        };
        // Deferred constraints are checked (SET CONSTRAINTS ALL IMMEDIATE) before the origin is
        // set up: PostgreSQL 14+ advances the origin on ABORT too, so a COMMIT that failed after
        // xact_setup would move the origin past a batch that was rolled back. Nothing that can
        // fail for the data's sake may run between xact_setup and COMMIT.
        let sql = format!(
            "SET CONSTRAINTS ALL IMMEDIATE; SELECT pg_replication_origin_xact_setup({}::pg_lsn, {}); COMMIT",
            quote_literal(&end_lsn.to_string()),
            pg_timestamp_literal(commit_time)
        );
        let (transactions, rows, started, conflicts) = (batch.transactions, batch.rows, batch.started, batch.conflicts);
        self.commit_in_flight = Some(end_lsn);
        self.enqueue(Box::pin(async move {
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| ApplyError::Db(DbError::new(&node, "cannot commit apply transaction", e)))?;
            Ok(Completion::Committed { end_lsn, transactions, rows, started, conflicts })
        }))
        .await
    }

    /// Abandons the open batch (after an error the connection is dropped anyway).
    pub fn abandon(&mut self) {
        self.in_flight.clear();
        self.commit_in_flight = None;
        self.copy = None;
        self.group = None;
        self.batch = None;
    }

    /// Records an idle source position (no transaction pending) durably in the origin, so the
    /// slot can be confirmed past WAL that held no transaction for us (DESIGN §5). A heartbeat
    /// row is written because an empty transaction records nothing.
    pub async fn record_idle_position(&mut self, lsn: Lsn, source: &str) -> Result<(), ApplyError> {
        debug_assert!(self.batch.is_none());
        self.drain().await?;
        if lsn <= self.committed {
            return Ok(());
        }
        let sql = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; INSERT INTO pgduplex.heartbeat AS h (source_node, lsn, at) VALUES ({src}, {l}::pg_lsn, now()) \
             ON CONFLICT (source_node) DO UPDATE SET lsn = excluded.lsn, at = excluded.at; \
             SELECT pg_replication_origin_xact_setup({l}::pg_lsn, now()); COMMIT",
            src = quote_literal(source),
            l = quote_literal(&lsn.to_string())
        );
        if let Err(e) = self.client.batch_execute(&sql).await {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(self.db_err("cannot record idle position in pgduplex.heartbeat")(e));
        }
        self.committed = self.committed.max(lsn);
        tracing::debug!(direction = %self.label, %lsn, "recorded idle position");
        Ok(())
    }

    /// Flushes the target's WAL up to the last applied commit and returns the origin progress
    /// that is now durable: the only LSN that may be reported to the source as flushed.
    pub async fn flushed_progress(&mut self) -> Result<Lsn, ApplyError> {
        self.flush_pending().await?;
        self.drain().await?;
        let row = self
            .client
            .query_one("SELECT pg_replication_origin_session_progress(true)::text", &[])
            .await
            .map_err(self.db_err(format!("cannot read progress of origin {}", self.origin)))?;
        let v: Option<String> = row.get(0);
        Ok(v.and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO))
    }
}

fn kind_name(v: &ColumnValue) -> &'static str {
    match v {
        ColumnValue::Null => "NULL",
        ColumnValue::UnchangedToast => "unchanged-TOAST",
        ColumnValue::Text(_) => "text",
        ColumnValue::Binary(_) => "binary",
    }
}

//! Schema drift on the target (DESIGN §6b): the catalog side of pausing a table.
//!
//! A source table with columns this node lacks (an ALTER TABLE applied on the source only, so
//! far) is *paused*: its changes are held in `pgduplex.paused_changes`, as the pgoutput messages
//! they came in, inside the apply batch, so they become durable together with the origin
//! progress past them; nothing of the table is lost while the rest of the stream goes on. The
//! pipeline decides what to hold and when to replay; this module reads the target's catalog and
//! stores, reads and removes held changes.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::{ApplyError, Applier, Completion, StatementKey, TargetColumn, TARGET_COLUMNS_SQL};
use crate::db::DbError;
use crate::lsn::Lsn;
use crate::pgoutput::Relation;

/// One held change, as stored.
pub struct HeldChange {
    pub id: i64,
    /// Commit LSN of its source transaction.
    pub commit_lsn: Lsn,
    /// The Relation message the change refers to.
    pub relation: Bytes,
    /// The Insert, Update, Delete or Truncate message.
    pub message: Bytes,
}

/// A table paused on this target, as stored.
pub struct PausedTable {
    pub table: String,
    pub error: String,
    /// The source's latest Relation message for the table.
    pub relation: Bytes,
}

impl Applier {
    /// The target table's columns (empty when it does not exist). Waits for the pipeline
    /// first: a query must not queue behind an open COPY.
    pub async fn target_columns(&mut self, schema: &str, table: &str) -> Result<Vec<TargetColumn>, ApplyError> {
        self.settle().await?;
        let rows = self
            .client
            .query(TARGET_COLUMNS_SQL, &[&schema, &table])
            .await
            .map_err(self.db_err(format!("cannot read columns of {schema}.{table}")))?;
        Ok(rows
            .iter()
            .map(|r| TargetColumn {
                name: r.get(0),
                generated: r.get(1),
                identity_always: r.get(2),
                type_name: r.get(3),
                unique: r.get(4),
                partitioned: r.get(5),
            })
            .collect())
    }

    /// Whether the source relation `rel` can be applied here: `None`, or why not (naming the
    /// table, the columns and the fix) when the target lacks the table or some of its columns.
    pub async fn drift(&mut self, rel: &Relation, source: &str) -> Result<Option<String>, ApplyError> {
        let cols = self.target_columns(&rel.namespace, &rel.name).await?;
        Ok(self.drift_message(rel, source, &cols))
    }

    /// A Relation message from the stream: [`Applier::drift`], and when there is none, one way,
    /// the relation is matched for applying its changes (the target's columns read once).
    pub async fn relation_or_drift(&mut self, rel: &Relation, source: &str) -> Result<Option<String>, ApplyError> {
        let cols = self.target_columns(&rel.namespace, &rel.name).await?;
        let drift = self.drift_message(rel, source, &cols);
        if drift.is_none() && self.two_way.is_none() {
            self.install_relation(rel, &cols, false)?;
        }
        Ok(drift)
    }

    fn drift_message(&self, rel: &Relation, source: &str, cols: &[TargetColumn]) -> Option<String> {
        let table = format!("{}.{}", rel.namespace, rel.name);
        match super::table::missing_columns(rel, cols) {
            None => Some(format!(
                "table {table} exists on node {source} but not on node {}: create it there (its changes are held until then)",
                self.node
            )),
            Some(missing) if missing.is_empty() => None,
            Some(missing) => Some(format!(
                "table {table}: column{s} {cols} exist{v} on node {source} but not on node {target}: its changes from node {source} \
                 are held (other tables go on) until both nodes have the same columns: add {them} on node {target} \
                 (or drop {them} on node {source}) with the same ALTER TABLE",
                s = if missing.len() == 1 { "" } else { "s" },
                cols = missing.join(", "),
                v = if missing.len() == 1 { "s" } else { "" },
                target = self.node,
                them = if missing.len() == 1 { "it" } else { "them" },
            )),
        }
    }

    /// Records (or updates) a paused table in the open batch.
    pub async fn pause_table(&mut self, source: &str, table: &str, error: &str, relation: &Bytes) -> Result<(), ApplyError> {
        let sql = "INSERT INTO pgduplex.paused_tables (source_node, table_name, error, relation) VALUES ($1, $2, $3, $4) \
                   ON CONFLICT (source_node, table_name) DO UPDATE SET error = excluded.error, relation = excluded.relation";
        let stmt = self.drift_statement(b'P', sql).await?;
        let (source, table, error, relation) = (source.to_string(), table.to_string(), error.to_string(), relation.to_vec());
        let context = format!("cannot record paused table {table} in pgduplex.paused_tables");
        self.enqueue_write(stmt, context, move |client, stmt| async move {
            let params: [&(dyn ToSql + Sync); 4] = [&source, &table, &error, &relation];
            client.execute_raw(&stmt, params).await
        })
        .await
    }

    /// Holds one change of a paused table, in the open batch (pipelined).
    pub async fn hold_change(&mut self, source: &str, table: &str, commit_lsn: Lsn, relation: &Bytes, message: &Bytes) -> Result<(), ApplyError> {
        let sql = "INSERT INTO pgduplex.paused_changes (source_node, table_name, commit_lsn, relation, message) \
                   VALUES ($1, $2, $3::text::pg_lsn, $4, $5)";
        let stmt = self.drift_statement(b'H', sql).await?;
        let (source, table, lsn) = (source.to_string(), table.to_string(), commit_lsn.to_string());
        let (relation, message) = (relation.to_vec(), message.to_vec());
        let context = format!("cannot hold a change of paused table {table}");
        self.enqueue_write(stmt, context, move |client, stmt| async move {
            let params: [&(dyn ToSql + Sync); 5] = [&source, &table, &lsn, &relation, &message];
            client.execute_raw(&stmt, params).await
        })
        .await
    }

    /// The prepared statement of one of the drift writes (cached like the apply's own).
    async fn drift_statement(&mut self, kind: u8, sql: &str) -> Result<Statement, ApplyError> {
        let key = StatementKey { relation: 0, kind, columns: Box::new([]), rows: 1 };
        match self.statements.get(&key) {
            Some(s) => Ok(s.clone()),
            None => self.prepare(key, sql.to_string()).await,
        }
    }

    /// Pipelines a write of a prepared statement in the open batch (opening one), which then
    /// commits even without a completed source transaction. The statement goes out on the
    /// first poll, so it reaches the server in order with the batch's other requests.
    async fn enqueue_write<F, Fut>(&mut self, stmt: Statement, context: String, write: F) -> Result<(), ApplyError>
    where
        F: FnOnce(Arc<Client>, Statement) -> Fut,
        Fut: Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
    {
        self.begin_if_needed().await?;
        self.flush_pending().await?;
        if let Some(b) = &mut self.batch {
            b.dirty = true;
        }
        let node = self.node.clone();
        let fut = write(self.client.clone(), stmt);
        self.enqueue(Box::pin(async move {
            fut.await.map_err(|e| ApplyError::Db(DbError::new(&node, context, e)))?;
            Ok(Completion::Done)
        }))
        .await
    }

    /// The tables paused on this node for changes from `source` (read at start).
    pub async fn paused_tables(&mut self, source: &str) -> Result<Vec<PausedTable>, ApplyError> {
        let rows = self
            .client
            .query(
                "SELECT table_name, error, relation FROM pgduplex.paused_tables WHERE source_node = $1 ORDER BY table_name",
                &[&source],
            )
            .await
            .map_err(self.db_err("cannot read pgduplex.paused_tables (run `pgduplex init` again to add it)"))?;
        Ok(rows
            .iter()
            .map(|r| PausedTable { table: r.get(0), error: r.get(1), relation: Bytes::from(r.get::<_, Vec<u8>>(2)) })
            .collect())
    }

    /// Tables being added to this direction (`init --copy-from` on an established setup):
    /// `None` while copying, else the copy's consistent point.
    pub async fn table_sync(&mut self, source: &str) -> Result<Vec<(String, Option<Lsn>)>, ApplyError> {
        self.settle().await?;
        let rows = self
            .client
            .query("SELECT table_name, lsn::text FROM pgduplex.table_sync WHERE source_node = $1", &[&source])
            .await
            .map_err(self.db_err("cannot read pgduplex.table_sync (run `pgduplex init` again to add it)"))?;
        rows.iter()
            .map(|r| {
                let table: String = r.get(0);
                let lsn: Option<String> = r.get(1);
                let lsn = lsn
                    .map(|l| {
                        l.parse().map_err(|_| ApplyError::BadChange { table: table.clone(), message: format!("pgduplex.table_sync has LSN {l:?}") })
                    })
                    .transpose()?;
                Ok((table, lsn))
            })
            .collect()
    }

    /// Ends the addition of `table`: the stream is past its copy (in the open batch).
    pub async fn end_table_sync(&mut self, source: &str, table: &str) -> Result<(), ApplyError> {
        self.begin_if_needed().await?;
        self.settle().await?;
        if let Some(b) = &mut self.batch {
            b.dirty = true;
        }
        self.client
            .execute("DELETE FROM pgduplex.table_sync WHERE source_node = $1 AND table_name = $2", &[&source, &table])
            .await
            .map_err(self.db_err(format!("cannot remove {table} from pgduplex.table_sync")))?;
        Ok(())
    }

    /// Up to `limit` held changes of `table` after id `after`, in order. Waits for the pipeline
    /// first (so changes held in the open batch are visible).
    pub async fn held_changes(&mut self, source: &str, table: &str, after: i64, limit: i64) -> Result<Vec<HeldChange>, ApplyError> {
        self.settle().await?;
        let rows = self
            .client
            .query(
                "SELECT id, commit_lsn::text, relation, message FROM pgduplex.paused_changes \
                 WHERE source_node = $1 AND table_name = $2 AND id > $3 ORDER BY id LIMIT $4",
                &[&source, &table, &after, &limit],
            )
            .await
            .map_err(self.db_err(format!("cannot read the held changes of {table}")))?;
        rows.iter()
            .map(|r| {
                let lsn: String = r.get(1);
                Ok(HeldChange {
                    id: r.get(0),
                    commit_lsn: lsn.parse().map_err(|_| ApplyError::BadChange {
                        table: table.to_string(),
                        message: format!("held change has commit LSN {lsn:?}"),
                    })?,
                    relation: Bytes::from(r.get::<_, Vec<u8>>(2)),
                    message: Bytes::from(r.get::<_, Vec<u8>>(3)),
                })
            })
            .collect()
    }

    /// Removes a resumed table's held changes (up to id `last`) and its pause, in the open batch.
    pub async fn end_pause(&mut self, source: &str, table: &str, last: i64) -> Result<(), ApplyError> {
        self.begin_if_needed().await?;
        self.settle().await?;
        if let Some(b) = &mut self.batch {
            b.dirty = true;
        }
        self.client
            .execute(
                "DELETE FROM pgduplex.paused_changes WHERE source_node = $1 AND table_name = $2 AND id <= $3",
                &[&source, &table, &last],
            )
            .await
            .map_err(self.db_err(format!("cannot remove the replayed changes of {table}")))?;
        self.client
            .execute("DELETE FROM pgduplex.paused_tables WHERE source_node = $1 AND table_name = $2", &[&source, &table])
            .await
            .map_err(self.db_err(format!("cannot remove the pause of {table}")))?;
        Ok(())
    }

    /// Matches a held change's relation for replay: source columns the target lacks are left
    /// out (they were dropped on the source since, or replay would not have started).
    pub async fn replay_relation(&mut self, rel: &Relation) -> Result<(), ApplyError> {
        self.match_relation(rel, true).await
    }

    /// Sends whatever is buffered and waits for every pipelined statement: errors of earlier
    /// statements surface here.
    pub async fn settle(&mut self) -> Result<(), ApplyError> {
        self.flush_pending().await?;
        self.drain().await
    }

    /// Checks the open batch's deferred constraints now (a replay's failure must surface
    /// before its COMMIT, where it could only stop the direction).
    pub async fn check_deferred_constraints(&mut self) -> Result<(), ApplyError> {
        self.settle().await?;
        self.client
            .batch_execute("SET CONSTRAINTS ALL IMMEDIATE; SET CONSTRAINTS ALL DEFERRED")
            .await
            .map_err(self.db_err("deferred constraints of the replayed changes failed"))
    }

    /// Abandons and rolls back the open batch (a replay that failed: only it was in the batch).
    pub async fn rollback_batch(&mut self) -> Result<(), ApplyError> {
        self.abandon();
        self.client.batch_execute("ROLLBACK").await.map_err(self.db_err("cannot roll back a failed replay"))
    }
}

//! The initial copy (DESIGN §7): `init --copy-from <node>` fills the other node's tables from a
//! snapshot of the source, taken by the creation of the direction's replication slot, so that
//! streaming from the slot's consistent point neither loses nor repeats a change.
//!
//! Why it is exact: `CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')` returns a snapshot that
//! sees exactly the transactions committed before the slot's consistent point, and the slot
//! decodes exactly those committed after it. Every copy worker imports that snapshot (`SET
//! TRANSACTION SNAPSHOT`) into one REPEATABLE READ transaction for all its tables; the origin
//! on the target is set to the consistent point; `run` then streams from there.
//!
//! Each table is copied in one target transaction (COPY ... FROM STDIN, then COMMIT), streamed
//! from the source's COPY TO STDOUT without being held in memory. An interrupted copy leaves
//! `pgduplex.copy_state` unfinished; running init again empties the tables and starts over from
//! a new slot, so nothing is doubled. Two-way, the versions tables are copied too, and the
//! reverse direction's slot is created only after the copy, so the copied rows are not decoded
//! as the target's own writes.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::config::{Config, Direction};
use crate::db::{self, DbError, quote_ident};
use crate::lsn::Lsn;
use crate::protocol::{ConnectParams, ReplicationClient, SnapshotAction};

use super::{SetupError, SourceTable};

/// One table to copy: qualified names and the columns both nodes have (generated ones left out).
#[derive(Clone, Debug)]
struct CopyItem {
    display: String,
    sql_name: String,
    columns: Vec<String>,
    /// A partitioned table: read without ONLY (its rows live in the partitions).
    partitioned: bool,
    /// Every column has a built-in type: copy in binary format (no text output and parsing;
    /// the measured difference is ~1.4x). User types are copied as text: their binary form
    /// carries type OIDs that differ between clusters (arrays, composites).
    binary: bool,
    /// Estimated size on the source, for the ETA.
    bytes_estimate: i64,
}

/// What a finished copy did.
#[derive(Debug, Default)]
pub struct CopyReport {
    pub consistent_point: Lsn,
    pub tables: Vec<(String, u64, u64)>,
    pub elapsed: Duration,
}

/// Rows are handed to the target's COPY in buffers of about this size.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Progress shared by the workers.
#[derive(Default)]
struct Progress {
    rows: u64,
    bytes: u64,
    /// Per table: rows, bytes, done.
    tables: Vec<(String, u64, u64, bool)>,
}

/// Whether the target of `d` already holds rows in the replicated tables; lists them.
pub async fn non_empty_tables(target: &Client, node: &str, tables: &[SourceTable]) -> Result<Vec<String>, DbError> {
    let mut out = Vec::new();
    for t in tables {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {}.{})", quote_ident(&t.schema), quote_ident(&t.name));
        let any: bool = target
            .query_one(&sql, &[])
            .await
            .map_err(|e| DbError::new(node, format!("cannot read {}.{}", t.schema, t.name), e))?
            .get(0);
        if any {
            out.push(format!("{}.{}", t.schema, t.name));
        }
    }
    Ok(out)
}

/// Whether an earlier copy from `source` into this node was interrupted.
pub async fn unfinished_copy(target: &Client, node: &str, source: &str) -> Result<bool, DbError> {
    let exists: bool = target
        .query_one("SELECT to_regclass('pgduplex.copy_state') IS NOT NULL", &[])
        .await
        .map_err(|e| DbError::new(node, "cannot read the catalog", e))?
        .get(0);
    if !exists {
        return Ok(false);
    }
    Ok(target
        .query_opt("SELECT 1 FROM pgduplex.copy_state WHERE source_node = $1 AND finished_at IS NULL", &[&source])
        .await
        .map_err(|e| DbError::new(node, "cannot read pgduplex.copy_state", e))?
        .is_some())
}

/// Empties the target's tables after an interrupted copy, and drops the slot it was taken from.
pub async fn reset_interrupted(d: &Direction, source: &Client, target: &Client, tables: &[SourceTable], two_way: bool) -> Result<(), DbError> {
    let (src, tgt) = (d.source.as_str(), d.target.as_str());
    let mut names: Vec<String> = tables.iter().map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))).collect();
    if two_way {
        names.extend(tables.iter().map(|t| format!("pgduplex.{}", quote_ident(&format!("{}.{}", t.schema, t.name)))));
    }
    target
        .batch_execute(&format!(
            "SET session_replication_role = replica; SET pgduplex.apply = on; TRUNCATE {}; RESET session_replication_role",
            names.join(", ")
        ))
        .await
        .map_err(|e| DbError::new(tgt, "cannot empty the tables of the interrupted copy", e))?;
    source
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&d.slot_name()])
        .await
        .map_err(|e| DbError::new(src, format!("cannot drop replication slot {} of the interrupted copy", d.slot_name()), e))?;
    tracing::info!(source = src, target = tgt, "restarting an interrupted initial copy from the beginning");
    Ok(())
}

/// Creates the slot of `d` with an exported snapshot and copies every table (and, two-way, its
/// versions table) from the source at that snapshot, `jobs` tables at a time; then sets the
/// target origin to the slot's consistent point.
///
/// With `added`, the direction is established (its slot streams already) and `tables` are being
/// added to it: the snapshot comes from a temporary slot of its own and the origin is left
/// alone; the caller records the consistent point in `pgduplex.table_sync`.
pub async fn copy(config: &Config, d: &Direction, tables: &[SourceTable], jobs: usize, added: bool) -> Result<CopyReport, SetupError> {
    let (src, tgt) = (d.source.as_str(), d.target.as_str());
    let source_cfg = config.node(&d.source);
    let target_cfg = config.node(&d.target);
    let started = Instant::now();
    let source = db::connect(source_cfg, "pgduplex copy").await?;
    let target = db::connect(target_cfg, "pgduplex copy").await?;

    let mut items = Vec::new();
    for t in tables {
        items.push(item(&source, src, &target, tgt, &t.schema, &t.name).await?);
        if config.two_way() {
            items.push(item(&source, src, &target, tgt, "pgduplex", &format!("{}.{}", t.schema, t.name)).await?);
        }
    }
    // Workers pop from the end: largest tables first, so the longest copy starts first.
    items.sort_by_key(|i| i.bytes_estimate);
    let total_estimate: i64 = items.iter().map(|i| i.bytes_estimate).sum();

    // The slot, and the snapshot its creation exports (valid while this connection stays idle).
    let mut params = ConnectParams::from_config(&source_cfg.pg, "pgduplex copy slot")
        .map_err(|e| SetupError::Usage(format!("node {src}: {e}")))?;
    params.tls_mode = source_cfg.tls.mode;
    params.tls_config = source_cfg.tls_config.clone();
    let mut repl = ReplicationClient::connect(&params).await.map_err(|e| SetupError::Usage(format!("node {src}: {e}")))?;
    // A temporary slot vanishes with this connection, however the copy ends.
    let slot_name = if added { format!("{}_add_{}", d.slot_name(), std::process::id()) } else { d.slot_name() };
    let slot = repl.create_logical_slot(&slot_name, added, SnapshotAction::Export).await.map_err(|e| {
        SetupError::Usage(if added {
            format!(
                "node {src}: cannot create the temporary replication slot {slot_name} for copying the added tables: {e} \
                 (it needs a free replication slot and WAL sender: max_replication_slots, max_wal_senders); `pgduplex run` \
                 holds the added tables' changes until `pgduplex init --copy-from {src}` succeeds"
            )
        } else {
            format!("node {src}: cannot create replication slot {slot_name} for the copy: {e} (if it is left from an earlier init, run `pgduplex teardown` first)")
        })
    })?;
    if !added {
        // From here on a re-run of init starts the copy over: the slot exists and the tables may
        // hold part of the copy.
        target
            .execute(
                "INSERT INTO pgduplex.copy_state (source_node, started_at) VALUES ($1, now()) \
                 ON CONFLICT (source_node) DO UPDATE SET started_at = now(), finished_at = NULL",
                &[&src],
            )
            .await
            .map_err(|e| DbError::new(tgt, "cannot record the copy in pgduplex.copy_state", e))?;
    }
    let snapshot = slot
        .snapshot_name
        .clone()
        .ok_or_else(|| SetupError::Usage(format!("node {src}: the server exported no snapshot for slot {slot_name}")))?;
    tracing::info!(slot = %slot.slot_name, consistent_point = %slot.consistent_point, %snapshot, tables = items.len(), jobs, "copying");

    let progress = Arc::new(Mutex::new(Progress {
        tables: items.iter().map(|i| (i.display.clone(), 0, 0, false)).collect(),
        ..Default::default()
    }));
    let queue = Arc::new(Mutex::new(items.into_iter().enumerate().collect::<Vec<_>>()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..jobs.max(1) {
        let (queue, progress, snapshot) = (queue.clone(), progress.clone(), snapshot.clone());
        let (source_cfg, target_cfg) = (source_cfg.clone(), target_cfg.clone());
        let (src, tgt) = (src.to_string(), tgt.to_string());
        workers.spawn(async move {
            let source = db::connect(&source_cfg, "pgduplex copy").await?;
            let target = db::connect(&target_cfg, "pgduplex copy").await?;
            source
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
                     SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; SET TimeZone = 'UTC'; \
                     SET bytea_output = 'hex'",
                    crate::db::quote_literal(&snapshot)
                ))
                .await
                .map_err(|e| DbError::new(&src, "cannot import the slot's snapshot", e))?;
            target
                .batch_execute(
                    "SET session_replication_role = replica; SET pgduplex.apply = on; SET synchronous_commit = off; \
                     SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; SET statement_timeout = 0",
                )
                .await
                .map_err(|e| DbError::new(&tgt, "cannot set up the copy session", e))?;
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some((index, item)) = next else { break };
                copy_table(&item, index, &source, &src, &target, &tgt, &progress).await?;
            }
            source.batch_execute("COMMIT").await.map_err(|e| DbError::new(&src, "cannot end the copy transaction", e))?;
            Ok::<(), SetupError>(())
        });
    }

    let interactive = std::io::stderr().is_terminal();
    let mut last_log = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) if added => {
                    return Err(SetupError::Usage(format!(
                        "{e}\nthe copy of the added table(s) stopped; `pgduplex run` holds their changes meanwhile: run \
                         `pgduplex init --copy-from {src}` again to copy them over"
                    )));
                }
                Some(Ok(Err(e))) => {
                    return Err(SetupError::Usage(format!(
                        "{e}\nthe copy stopped; replication slot {} on node {src} now retains WAL: run `pgduplex init --copy-from {src}` again to start the copy over, or `pgduplex teardown`",
                        d.slot_name()
                    )));
                }
                Some(Err(e)) => return Err(SetupError::Usage(format!("a copy worker failed: {e}; rerun `pgduplex init --copy-from {src}`"))),
            },
            _ = tick.tick() => {
                let (rows, bytes, line) = snapshot_progress(&progress);
                let elapsed = started.elapsed().as_secs_f64();
                let rate = bytes as f64 / elapsed.max(0.001);
                let eta = if rate > 0.0 && total_estimate > 0 {
                    format!(", ETA {:.0} s", ((total_estimate as f64 - bytes as f64).max(0.0) / rate).ceil())
                } else {
                    String::new()
                };
                let text = format!("copying {src} -> {tgt}: {rows} rows, {:.1} MB ({:.1} MB/s{eta}) {line}", bytes as f64 / 1e6, rate / 1e6);
                if interactive {
                    eprint!("\r\x1b[2K{}", text.chars().take(160).collect::<String>());
                } else if last_log.elapsed() >= Duration::from_secs(5) {
                    tracing::info!("{text}");
                    last_log = Instant::now();
                }
            }
        }
    }
    if interactive {
        eprintln!();
    }
    drop(repl);
    if added {
        let p = progress.lock().map_err(|_| SetupError::Usage("copy progress lost".into()))?;
        return Ok(CopyReport {
            consistent_point: slot.consistent_point,
            tables: p.tables.iter().map(|(t, r, b, _)| (t.clone(), *r, *b)).collect(),
            elapsed: started.elapsed(),
        });
    }

    // Streaming starts exactly where the snapshot ends.
    let origin = d.origin_name();
    if !super::origin_exists(&target, tgt, &origin).await? {
        target
            .execute("SELECT pg_replication_origin_create($1)", &[&origin])
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot create replication origin {origin}"), e))?;
    }
    target
        .execute("SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)", &[&origin, &slot.consistent_point.to_string()])
        .await
        .map_err(|e| DbError::new(tgt, format!("cannot set progress of origin {origin}"), e))?;
    target
        .execute("UPDATE pgduplex.copy_state SET finished_at = now() WHERE source_node = $1", &[&src])
        .await
        .map_err(|e| DbError::new(tgt, "cannot record the end of the copy", e))?;
    let p = progress.lock().map_err(|_| SetupError::Usage("copy progress lost".into()))?;
    Ok(CopyReport {
        consistent_point: slot.consistent_point,
        tables: p.tables.iter().map(|(t, r, b, _)| (t.clone(), *r, *b)).collect(),
        elapsed: started.elapsed(),
    })
}

fn snapshot_progress(progress: &Mutex<Progress>) -> (u64, u64, String) {
    let Ok(p) = progress.lock() else { return (0, 0, String::new()) };
    let busy: Vec<String> = p
        .tables
        .iter()
        .filter(|(_, r, _, done)| !done && *r > 0)
        .map(|(t, r, _, _)| format!("{t} {r}"))
        .collect();
    let done = p.tables.iter().filter(|t| t.3).count();
    (p.rows, p.bytes, format!("[{done}/{} tables done; {}]", p.tables.len(), busy.join(", ")))
}

async fn item(source: &Client, src: &str, target: &Client, tgt: &str, schema: &str, table: &str) -> Result<CopyItem, SetupError> {
    let sql = "SELECT a.attname::text, a.atttypid < 16384 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
               ORDER BY a.attnum";
    let display = format!("{schema}.{table}");
    let ours: Vec<(String, bool)> = source
        .query(sql, &[&schema, &table])
        .await
        .map_err(|e| DbError::new(src, format!("cannot read the columns of {display}"), e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let theirs: Vec<(String, bool)> = target
        .query(sql, &[&schema, &table])
        .await
        .map_err(|e| DbError::new(tgt, format!("cannot read the columns of {display}"), e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let common: Vec<(String, bool)> =
        ours.into_iter().filter_map(|(c, b)| theirs.iter().find(|(t, _)| *t == c).map(|(_, tb)| (c, b && *tb))).collect();
    let binary = common.iter().all(|(_, b)| *b);
    let sql_name = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let row = source
        .query_one(
            "SELECT coalesce(sum(pg_table_size(relid)), 0)::bigint, \
                    (SELECT relkind = 'p' FROM pg_class WHERE oid = $1::text::regclass) \
             FROM pg_partition_tree($1::text::regclass)",
            &[&sql_name],
        )
        .await
        .map_err(|e| DbError::new(src, format!("cannot read the size of {display}"), e))?;
    let (bytes_estimate, partitioned): (i64, Option<bool>) = (row.get(0), row.get(1));
    Ok(CopyItem {
        columns: common.into_iter().map(|(c, _)| c).collect(),
        binary,
        display,
        sql_name,
        bytes_estimate,
        partitioned: partitioned.unwrap_or(false),
    })
}

/// Streams one table: source COPY TO STDOUT into target COPY FROM STDIN, in one target
/// transaction.
async fn copy_table(
    item: &CopyItem,
    index: usize,
    source: &Client,
    src: &str,
    target: &Client,
    tgt: &str,
    progress: &Mutex<Progress>,
) -> Result<(), SetupError> {
    let cols = item.columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    let format = if item.binary { " (FORMAT binary)" } else { "" };
    target.batch_execute("BEGIN").await.map_err(|e| DbError::new(tgt, "cannot begin the copy of a table", e))?;
    let out = source
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {}{}) TO STDOUT{format}",
            if item.partitioned { "" } else { "ONLY " },
            item.sql_name
        ))
        .await
        .map_err(|e| DbError::new(src, format!("cannot read {}", item.display), e))?;
    let sink = target
        .copy_in::<_, Bytes>(&format!("COPY {} ({cols}) FROM STDIN{format}", item.sql_name))
        .await
        .map_err(|e| DbError::new(tgt, format!("cannot copy into {}", item.display), e))?;
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    // The source sends one CopyData message per row: pass them on in ~256 kB buffers, and
    // count progress per buffer, not per row.
    let mut rows_seen = 0u64;
    let mut buf = bytes::BytesMut::with_capacity(COPY_BUFFER_BYTES + 8192);
    let mut buffered_rows = 0u64;
    loop {
        let chunk = match out.next().await {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => return Err(DbError::new(src, format!("cannot read {}", item.display), e).into()),
            None => None,
        };
        if let Some(chunk) = &chunk {
            // One CopyData message is one row, in both formats.
            buffered_rows += 1;
            buf.extend_from_slice(chunk);
        }
        if buf.len() >= COPY_BUFFER_BYTES || (chunk.is_none() && !buf.is_empty()) {
            let len = buf.len() as u64;
            sink.send(buf.split().freeze()).await.map_err(|e| DbError::new(tgt, format!("cannot copy into {}", item.display), e))?;
            rows_seen += buffered_rows;
            if let Ok(mut p) = progress.lock() {
                p.rows += buffered_rows;
                p.bytes += len;
                p.tables[index].1 += buffered_rows;
                p.tables[index].2 += len;
            }
            buffered_rows = 0;
        }
        if chunk.is_none() {
            break;
        }
    }
    let rows = sink.finish().await.map_err(|e| DbError::new(tgt, format!("cannot copy into {}", item.display), e))?;
    target.batch_execute("COMMIT").await.map_err(|e| DbError::new(tgt, format!("cannot commit the copy of {}", item.display), e))?;
    if let Ok(mut p) = progress.lock() {
        p.tables[index].3 = true;
        // The binary format adds a header and a trailer message: the server's count is the truth.
        p.rows = (p.rows + rows).saturating_sub(rows_seen);
        p.tables[index].1 = rows;
    }
    tracing::info!(table = %item.display, rows, "copied");
    Ok(())
}

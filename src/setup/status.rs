//! `pgduplex status`: where each direction stands, read from both nodes' catalogs and, when
//! `run` is alive, from its /metrics endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, Direction};
use crate::db::{self, DbError};
use crate::metrics;

use super::SetupError;

/// One direction's state.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionStatus {
    pub direction: String,
    pub slot: String,
    /// The slot exists on the source.
    pub slot_exists: bool,
    /// A walsender is streaming from the slot.
    pub slot_active: bool,
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the source keeps for the slot (`pg_current_wal_lsn() - restart_lsn`).
    pub retained_wal_bytes: Option<i64>,
    /// Source WAL not yet applied on the target: current WAL position minus the origin's progress.
    pub lag_bytes: Option<i64>,
    /// From the running process: seconds the target is behind (0 when caught up).
    pub lag_seconds: Option<f64>,
    /// The target origin's durable progress.
    pub origin_progress: Option<String>,
    /// From the running process: transactions and changes applied since it started.
    pub applied_transactions: Option<u64>,
    pub applied_changes: Option<u64>,
    /// From the running process: 1 while streaming.
    pub streaming: Option<bool>,
    /// Two-way: changes parked on the target.
    pub parked_changes: Option<i64>,
    /// Tables paused for schema drift (their changes held on the target).
    pub paused_tables: Vec<PausedTableStatus>,
}

/// A table whose changes are held because the target lacks some of its columns.
#[derive(Debug, Clone, Serialize)]
pub struct PausedTableStatus {
    pub table: String,
    pub since: String,
    pub held_changes: i64,
    pub error: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `run` answers on its metrics address.
    pub run_alive: bool,
    pub metrics_address: Option<String>,
    pub directions: Vec<DirectionStatus>,
    /// Two-way: conflicts resolved since `run` started (from its metrics).
    pub conflicts_since_start: Option<u64>,
    /// Two-way: conflicts recorded in pgduplex.conflicts, per node.
    pub conflicts_recorded: BTreeMap<String, i64>,
}

/// Reads the status of every direction.
pub async fn status(config: &Config) -> Result<Status, SetupError> {
    let scraped = match config.metrics_listen {
        Some(addr) => scrape(addr).await,
        None => None,
    };
    let sample = |name: &str, direction: &str| -> Option<f64> {
        let text = scraped.as_ref()?;
        let prefix = format!("{name}{{direction=\"{direction}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
    };
    let mut directions = Vec::new();
    for d in &config.directions {
        let label = d.label();
        let mut s = read_direction(config, d).await?;
        s.lag_seconds = sample(metrics::LAG_SECONDS, &label);
        s.applied_transactions = sample(metrics::APPLIED_TRANSACTIONS, &label).map(|v| v as u64);
        s.applied_changes = sample(metrics::APPLIED_CHANGES, &label).map(|v| v as u64);
        s.streaming = sample(metrics::PIPELINE_UP, &label).map(|v| v == 1.0);
        directions.push(s);
    }
    let conflicts_since_start =
        scraped.as_ref().filter(|_| config.two_way()).map(|text| metrics::Metrics::sum_samples(text, metrics::CONFLICTS) as u64);
    let mut conflicts_recorded = BTreeMap::new();
    if config.two_way() {
        for (name, node) in &config.nodes {
            let client = db::connect(node, "pgduplex status").await?;
            let n: i64 = client
                .query_one("SELECT count(*) FROM pgduplex.conflicts", &[])
                .await
                .map_err(|e| DbError::new(name.as_str(), "cannot read pgduplex.conflicts (has `pgduplex init` run?)", e))?
                .get(0);
            conflicts_recorded.insert(name.to_string(), n);
        }
    }
    Ok(Status {
        run_alive: scraped.is_some(),
        metrics_address: config.metrics_listen.map(|a| a.to_string()),
        directions,
        conflicts_since_start,
        conflicts_recorded,
    })
}

async fn read_direction(config: &Config, d: &Direction) -> Result<DirectionStatus, SetupError> {
    let (src, tgt) = (d.source.as_str(), d.target.as_str());
    let slot = d.slot_name();
    let source = db::connect(config.node(&d.source), "pgduplex status").await?;
    let target = db::connect(config.node(&d.target), "pgduplex status").await?;
    let origin: Option<String> = target
        .query_one("SELECT pg_replication_origin_progress($1, false)::text WHERE EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)", &[&d.origin_name()])
        .await
        .ok()
        .and_then(|r| r.get(0));
    let row = source
        .query_opt(
            "SELECT active, wal_status, confirmed_flush_lsn::text, (pg_current_wal_lsn() - restart_lsn)::bigint, \
                    (pg_current_wal_lsn() - $2::text::pg_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &origin.clone().unwrap_or_else(|| "0/0".into())],
        )
        .await
        .map_err(|e| DbError::new(src, format!("cannot read replication slot {slot}"), e))?;
    let parked_changes = if config.two_way() {
        Some(
            target
                .query_one("SELECT count(*) FROM pgduplex.parked WHERE source_node = $1", &[&src])
                .await
                .map_err(|e| DbError::new(tgt, "cannot read pgduplex.parked", e))?
                .get(0),
        )
    } else {
        None
    };
    let paused_tables = target
        .query(
            "SELECT p.table_name, p.since::text, \
                    (SELECT count(*) FROM pgduplex.paused_changes c WHERE c.source_node = p.source_node AND c.table_name = p.table_name), \
                    p.error \
             FROM pgduplex.paused_tables p WHERE p.source_node = $1 ORDER BY p.table_name",
            &[&src],
        )
        .await
        .map_err(|e| DbError::new(tgt, "cannot read pgduplex.paused_tables (has `pgduplex init` run?)", e))?
        .iter()
        .map(|r| PausedTableStatus { table: r.get(0), since: r.get(1), held_changes: r.get(2), error: r.get(3) })
        .collect();
    let mut s = DirectionStatus {
        direction: d.label(),
        slot: slot.clone(),
        slot_exists: row.is_some(),
        slot_active: false,
        wal_status: None,
        confirmed_flush_lsn: None,
        retained_wal_bytes: None,
        lag_bytes: None,
        lag_seconds: None,
        origin_progress: origin.clone(),
        applied_transactions: None,
        applied_changes: None,
        streaming: None,
        parked_changes,
        paused_tables,
    };
    if let Some(r) = row {
        s.slot_active = r.get(0);
        s.wal_status = r.get(1);
        s.confirmed_flush_lsn = r.get(2);
        s.retained_wal_bytes = r.get(3);
        s.lag_bytes = if origin.is_some() { r.get::<_, Option<i64>>(4).map(|b| b.max(0)) } else { None };
    }
    Ok(s)
}

/// GET /metrics from a running `pgduplex run`; `None` when nothing answers within 2 s.
async fn scrape(addr: SocketAddr) -> Option<String> {
    let addr = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8(buf).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch).await.ok().flatten()
}

/// The report as text lines for a terminal.
pub fn render(s: &Status) -> Vec<String> {
    let mut lines = vec![match (&s.metrics_address, s.run_alive) {
        (Some(a), true) => format!("pgduplex run: alive (metrics at {a})"),
        (Some(a), false) => format!("pgduplex run: not answering at {a} (not running?)"),
        (None, _) => "pgduplex run: unknown (metrics.listen is off)".into(),
    }];
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for d in &s.directions {
        lines.push(format!("direction {}:", d.direction));
        lines.push(format!(
            "  slot {}: {}{}, confirmed {}, WAL retained {}",
            d.slot,
            if !d.slot_exists { "MISSING" } else if d.slot_active { "active" } else { "inactive" },
            d.wal_status.as_ref().map(|w| format!(" ({w})")).unwrap_or_default(),
            opt(d.confirmed_flush_lsn.clone()),
            opt(d.retained_wal_bytes.map(bytes))
        ));
        lines.push(format!(
            "  applied up to {}, lag {} / {}",
            opt(d.origin_progress.clone()),
            opt(d.lag_bytes.map(bytes)),
            opt(d.lag_seconds.map(|s| format!("{s:.1} s")))
        ));
        if let (Some(t), Some(c)) = (d.applied_transactions, d.applied_changes) {
            lines.push(format!(
                "  since start: {t} transactions, {c} changes applied; {}",
                if d.streaming == Some(true) { "streaming" } else { "NOT streaming (reconnecting, see the log)" }
            ));
        }
        for p in &d.paused_tables {
            lines.push(format!("  PAUSED {} since {}, {} changes held: {}", p.table, p.since, p.held_changes, p.error));
        }
        if let Some(p) = d.parked_changes {
            lines.push(format!("  parked changes: {p}{}", if p > 0 { " (see `pgduplex resolve list`)" } else { "" }));
        }
    }
    if !s.conflicts_recorded.is_empty() {
        let per_node: Vec<String> = s.conflicts_recorded.iter().map(|(n, c)| format!("{c} on {n}")).collect();
        lines.push(format!(
            "conflicts: {} since start; recorded in pgduplex.conflicts: {}",
            s.conflicts_since_start.map_or("-".into(), |c| c.to_string()),
            per_node.join(", ")
        ));
    }
    lines
}

fn bytes(b: i64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} kiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

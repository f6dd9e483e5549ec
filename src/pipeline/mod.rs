//! One replication direction: stream -> decode -> apply, in source commit order, with progress.
//!
//! Why the positions reported to the source are safe:
//! - `flush` (and `apply`) is the origin progress after `pg_replication_origin_session_progress
//!   (true)` flushed the target's WAL: every source transaction up to it is durable on the
//!   target, so the source may forget it.
//! - `write` is the end of the last source transaction handed to the applier; it only moves
//!   forward and is never below `flush`.
//! - When nothing is open or buffered, a keepalive's `wal_end` is recorded durably in the
//!   origin (a heartbeat row, see [`Applier::record_idle_position`]) and only then confirmed,
//!   so an idle slot keeps advancing without ever claiming more than the target holds.
//! - At start, `confirmed_flush_lsn > origin progress` would mean the source discarded
//!   transactions we never applied: we refuse to start instead of skipping them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

mod drift;
pub mod pair;

use crate::apply::{ApplyError, Applier, TwoWay};
use crate::config::{Config, Direction};
use crate::db::{self, DbError};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pgoutput::{self, DecodeContext, DecodeError, Delete, Insert, Message, Update};
use crate::versions::NodeId;
use pair::Pairer;
use crate::protocol::{ConnectParams, ProtocolError, ReplicationClient, ReplicationMessage, ReplicationStream};

/// Why a direction stopped streaming.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{direction}: replication connection to node {node}: {source}")]
    Protocol { direction: String, node: String, source: Box<ProtocolError> },
    #[error("{direction}: cannot decode pgoutput message at {lsn}: {source}")]
    Decode { direction: String, lsn: Lsn, source: DecodeError },
    #[error("{direction}: {source}")]
    Apply { direction: String, source: ApplyError },
    #[error("{direction}: {source}")]
    Db { direction: String, source: DbError },
    #[error("{direction}: protocol violation at {lsn}: {message}")]
    Violation { direction: String, lsn: Lsn, message: String },
    /// Needs a person: retrying cannot help (missing slot, lost slot, a gap in the stream).
    #[error("{direction}: {message}")]
    Fatal { direction: String, message: String },
}

impl PipelineError {
    /// Errors after which the process should stop rather than reconnect: retrying cannot
    /// help when the stream itself is undecodable or breaks the protocol's rules.
    pub fn is_fatal(&self) -> bool {
        matches!(self, PipelineError::Fatal { .. } | PipelineError::Decode { .. } | PipelineError::Violation { .. })
    }

    /// A deadlock, lock timeout or serialization failure on the target: retrying with smaller
    /// batches can get the transactions before the contested row through.
    pub fn is_lock_conflict(&self) -> bool {
        match self {
            PipelineError::Apply { source: ApplyError::Db(e), .. } | PipelineError::Db { source: e, .. } => {
                matches!(e.sqlstate(), Some("40P01" | "55P03" | "40001"))
            }
            _ => false,
        }
    }

    /// The `kind` label of `pgduplex_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            PipelineError::Protocol { .. } => "source",
            PipelineError::Decode { .. } | PipelineError::Violation { .. } => "protocol",
            PipelineError::Apply { .. } => "apply",
            PipelineError::Db { .. } => "target",
            PipelineError::Fatal { .. } => "fatal",
        }
    }
}

/// How long to let a message-by-message stream accumulate before the next read (see
/// [`ReplicationStream::set_read_coalescing`]): at most this much added latency.
const READ_COALESCING: Duration = Duration::from_millis(3);

/// How long batches hold one source transaction each after a lock conflict.
const SMALL_BATCHES_FOR: Duration = Duration::from_secs(60);

/// Least time between idle-position records of a two-way direction.
const TWO_WAY_IDLE_RECORD_INTERVAL: Duration = Duration::from_secs(5);

/// How often the slot's retained WAL and status are read.
const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Runs one direction until shutdown, reconnecting with backoff after errors. Returns an error
/// only for fatal problems.
pub async fn run_direction(
    config: Arc<Config>,
    direction: Direction,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let label = direction.label();
    metrics.register_direction(&label);
    let mut backoff = Duration::from_millis(250);
    // After a lock conflict, batches hold one source transaction each for a while, so that the
    // transactions before the contested one get through (DESIGN §5: retry smaller).
    let mut one_per_batch_until: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let mut apply = config.apply.clone();
        if one_per_batch_until.is_some_and(|until| Instant::now() < until) {
            apply.batch_max_rows = 1;
        }
        let result = stream_once(&config, apply, &direction, &metrics, &mut shutdown).await;
        metrics.pipeline_up.with_label_values(&[&label]).set(0);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => {
                metrics.errors.with_label_values(&[label.as_str(), e.kind()]).inc();
                return Err(e);
            }
            Err(e) => {
                metrics.errors.with_label_values(&[label.as_str(), e.kind()]).inc();
                metrics.reconnects.with_label_values(&[&label]).inc();
                if e.is_lock_conflict() {
                    warn!(direction = %label, "lock conflict on the target: applying one source transaction per batch for {SMALL_BATCHES_FOR:?}");
                    one_per_batch_until = Some(Instant::now() + SMALL_BATCHES_FOR);
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(250);
                }
                error!(direction = %label, error = %e, retry_in = ?backoff, "replication stopped; reconnecting");
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// A row change message, routed the same way whether streamed or replayed.
enum RowMessage {
    Insert(Insert),
    Update(Update),
    Delete(Delete),
}

impl RowMessage {
    /// The row change in `m`, or `m` back when it is none.
    fn of(m: Message) -> Result<RowMessage, Message> {
        match m {
            Message::Insert(m) => Ok(RowMessage::Insert(m)),
            Message::Update(m) => Ok(RowMessage::Update(m)),
            Message::Delete(m) => Ok(RowMessage::Delete(m)),
            other => Err(other),
        }
    }

    fn relation_oid(&self) -> u32 {
        match self {
            RowMessage::Insert(m) => m.relation_oid,
            RowMessage::Update(m) => m.relation_oid,
            RowMessage::Delete(m) => m.relation_oid,
        }
    }

    /// Two-way: into the transaction's pairing.
    fn pair(&self, p: &mut Pairer) {
        match self {
            RowMessage::Insert(m) => p.insert(m),
            RowMessage::Update(m) => p.update(m),
            RowMessage::Delete(m) => p.delete(m),
        }
    }

    /// One way: to the target (in the open batch).
    async fn apply(&self, a: &mut Applier) -> Result<(), ApplyError> {
        match self {
            RowMessage::Insert(m) => a.insert(m).await,
            RowMessage::Update(m) => a.update(m).await,
            RowMessage::Delete(m) => a.delete(m).await,
        }
    }
}

/// The transaction being received.
struct OpenTransaction {
    final_lsn: Lsn,
    /// Our own write coming back: its changes are dropped.
    echo: bool,
    /// Changes of this transaction handed to the applier so far.
    changes: u64,
}

struct State<'a> {
    direction: &'a Direction,
    /// A plain connection to the source (its catalog, the slot).
    source_sql: &'a tokio_postgres::Client,
    label: String,
    metrics: &'a Metrics,
    applier: Applier,
    ctx: DecodeContext,
    open: Option<OpenTransaction>,
    /// Origin names whose transactions on the source are our own writes: the apply's and
    /// `resolve`'s, of changes that came from the target.
    echo_origins: [String; 2],
    /// Highest WAL end the server told us about.
    server_wal_end: Lsn,
    /// Highest source commit end handed to the applier.
    write_lsn: Lsn,
    /// Origin progress known durable on the target.
    flushed: Lsn,
    last_commit_time: i64,
    last_idle_record: Instant,
    /// Two-way: the open transaction's changes, paired with their versions rows at commit.
    pairer: Option<Pairer>,
    /// Least time between two idle-position records.
    idle_record_interval: Duration,
    /// The latest Relation message per source OID.
    relations: HashMap<u32, drift::SourceRelation>,
    /// Tables paused for schema drift: their changes are held on the target.
    paused: HashMap<String, drift::Paused>,
    /// Paused tables to resume once the open transaction is done (their Relation matched).
    resume_wanted: Vec<String>,
    /// Tables being added to the direction (`init --copy-from` on an established setup).
    syncing: HashMap<String, drift::Sync>,
    /// After a failed replay of an added table: not before this.
    sync_retry_at: Option<Instant>,
    next_drift_check: Instant,
}

async fn stream_once(
    config: &Config,
    apply: crate::config::ApplyConfig,
    direction: &Direction,
    metrics: &Arc<Metrics>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let label = direction.label();
    let source = config.node(&direction.source);
    let target = config.node(&direction.target);
    let slot = direction.slot_name();
    let fatal = |message: String| PipelineError::Fatal { direction: label.clone(), message };
    let db_err = |source: DbError| PipelineError::Db { direction: label.clone(), source };
    let proto_err = |source: ProtocolError| PipelineError::Protocol {
        direction: label.clone(),
        node: direction.source.to_string(),
        source: Box::new(source),
    };

    let (mut applier, origin_progress) = Applier::connect(target, direction, apply, metrics.clone())
        .await
        .map_err(|source| match source {
            ApplyError::BadChange { message, .. } => fatal(message),
            source => PipelineError::Apply { direction: label.clone(), source },
        })?;
    if config.two_way() {
        let id = |n: &crate::config::NodeName| NodeId::new(n.as_str()).map_err(|e| fatal(e.to_string()));
        applier
            .enable_two_way(TwoWay::new(id(&direction.target)?, id(&direction.source)?, config.conflicts.clone()))
            .await
            .map_err(|source| PipelineError::Apply { direction: label.clone(), source })?;
    }

    let source_sql = db::connect(source, &format!("pgduplex monitor {label}")).await.map_err(db_err)?;
    let wal_sender_timeout_ms: i64 = source_sql
        .query_one("SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'", &[])
        .await
        .map_err(|e| db_err(DbError::new(source.name.as_str(), "cannot read wal_sender_timeout", e)))?
        .get(0);
    let confirmed = read_slot(&source_sql, source.name.as_str(), &slot).await.map_err(db_err)?;
    let Some((confirmed_flush, wal_status)) = confirmed else {
        return Err(fatal(format!(
            "replication slot {slot} does not exist on node {}: run `pgduplex init`",
            direction.source
        )));
    };
    if wal_status.as_deref() == Some("lost") {
        return Err(fatal(format!(
            "replication slot {slot} on node {} has lost WAL it needed (wal_status = lost): the target can no \
             longer be kept in step; run `pgduplex teardown` and start over with a fresh copy",
            direction.source
        )));
    }
    if origin_progress == Lsn::ZERO {
        return Err(fatal(format!(
            "replication origin {} on node {} has no progress: run `pgduplex init`",
            direction.origin_name(),
            direction.target
        )));
    }
    if confirmed_flush > origin_progress {
        return Err(fatal(format!(
            "slot {slot} on node {} is confirmed up to {confirmed_flush} but node {} has applied only up to \
             {origin_progress}: transactions in between are lost to pgduplex. Refusing to skip them; \
             resynchronise the tables (verify/repair) and re-run init",
            direction.source, direction.target
        )));
    }

    let mut params = ConnectParams::from_config(&source.pg, &format!("pgduplex stream {label}")).map_err(proto_err)?;
    params.tls_mode = source.tls.mode;
    params.tls_config = source.tls_config.clone();
    let mut repl = ReplicationClient::connect(&params).await.map_err(proto_err)?;
    // Text output of every value in a form any version's input functions read back exactly.
    repl.simple_query(
        "SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; \
         SET TimeZone = 'UTC'; SET bytea_output = 'hex'",
    )
        .await
        .map_err(proto_err)?;
    let version = repl.server_version_num();
    let proto_version: u32 = match version {
        v if v >= 160000 => 4,
        v if v >= 150000 => 3,
        v if v >= 140000 => 2,
        _ => 1,
    };
    let proto = proto_version.to_string();
    let publication = direction.publication_name();
    let mut options: Vec<(&str, &str)> =
        vec![("proto_version", &proto), ("publication_names", &publication), ("messages", "false")];
    if version >= 160000 {
        // Filter echoes ourselves by exact origin name on every version (DESIGN §4).
        options.push(("origin", "any"));
    }
    let mut stream = repl.start_logical_replication(&slot, origin_progress, &options).await.map_err(proto_err)?;
    stream.set_read_coalescing(Some(READ_COALESCING));
    // The server silently starts at confirmed_flush_lsn when that is past the requested point.
    if let Some((confirmed_now, _)) = read_slot(&source_sql, source.name.as_str(), &slot).await.map_err(db_err)?
        && confirmed_now > origin_progress {
            return Err(fatal(format!(
                "slot {slot} moved to {confirmed_now}, past this node's progress {origin_progress}, while starting"
            )));
        }
    info!(direction = %label, %slot, start_lsn = %origin_progress, proto_version, "streaming");
    metrics.pipeline_up.with_label_values(&[&label]).set(1);

    let status_interval = Duration::from_millis(
        (u64::try_from(wal_sender_timeout_ms).unwrap_or(0) / 2).clamp(100, 1000),
    );
    // Wakes the loop when nothing arrives; the periodic work itself runs after every iteration
    // (below), so a stream that always has data ready cannot starve status updates.
    let mut status_tick = tokio::time::interval(status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_status = Instant::now() + status_interval;
    let mut next_slot_check = Instant::now();
    let mut last_message = Instant::now();
    // We ask for a reply every status interval, so a silent server is a dead connection.
    let receive_timeout = Duration::from_millis(u64::try_from(wal_sender_timeout_ms).unwrap_or(0).saturating_mul(2))
        .max(Duration::from_secs(120));

    let mut st = State {
        direction,
        source_sql: &source_sql,
        label: label.clone(),
        metrics,
        applier,
        ctx: DecodeContext { protocol_version: proto_version, in_streamed_transaction: false },
        open: None,
        echo_origins: {
            let reverse = Direction { source: direction.target.clone(), target: direction.source.clone() };
            [reverse.origin_name(), reverse.resolve_origin_name()]
        },
        server_wal_end: origin_progress,
        write_lsn: origin_progress,
        flushed: origin_progress,
        last_commit_time: 0,
        last_idle_record: Instant::now(),
        pairer: config.two_way().then(Pairer::new),
        // Two-way: each idle record is WAL the other direction sees move, and records there in
        // turn; a longer interval keeps that exchange slow.
        idle_record_interval: if config.two_way() { TWO_WAY_IDLE_RECORD_INTERVAL } else { Duration::from_secs(1) },
        relations: HashMap::new(),
        paused: HashMap::new(),
        resume_wanted: Vec::new(),
        syncing: HashMap::new(),
        sync_retry_at: None,
        next_drift_check: Instant::now(),
    };
    st.load_paused().await?;

    // One timer for the batch deadline, re-armed only when the deadline changes (not per message).
    let batch_timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(batch_timer);
    let mut armed: Option<Instant> = None;
    let result: Result<(), PipelineError> = async {
        loop {
            let deadline = match (&st.open, st.applier.batch_deadline()) {
                (None, Some(d)) => Some(d),
                _ => None,
            };
            if deadline != armed {
                if let Some(d) = deadline {
                    batch_timer.as_mut().reset(d.into());
                }
                armed = deadline;
            }
            // Priority: shutdown > batch deadline > new WAL > idle wake-up; status updates and
            // the slot monitor run after each iteration when due.
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if st.open.is_none() {
                        st.applier.commit_batch().await.map_err(|e| st.apply_err(e))?;
                    }
                    st.send_status(&mut stream, false).await?;
                    let _ = stream.close().await;
                    info!(direction = %st.label, "stopped");
                    return Ok(());
                }
                _ = &mut batch_timer, if deadline.is_some() => {
                    st.applier.commit_batch().await.map_err(|e| st.apply_err(e))?;
                }
                msg = stream.next() => {
                    last_message = Instant::now();
                    match msg.map_err(proto_err)? {
                        None => return Err(PipelineError::Protocol {
                            direction: st.label.clone(),
                            node: st.direction.source.to_string(),
                            source: Box::new(ProtocolError::Protocol("server ended the replication stream".into())),
                        }),
                        Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                            st.server_wal_end = st.server_wal_end.max(wal_end);
                            st.handle_xlogdata(wal_start, &data).await?;
                        }
                        Some(ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. }) => {
                            st.server_wal_end = st.server_wal_end.max(wal_end);
                            st.on_keepalive(wal_end).await?;
                            if reply_requested {
                                st.send_status(&mut stream, false).await?;
                            }
                        }
                    }
                }
                _ = status_tick.tick() => {}
            }
            let now = Instant::now();
            if now >= next_status {
                if last_message.elapsed() > receive_timeout {
                    return Err(proto_err(ProtocolError::Timeout(format!(
                        "nothing received for {:?} although replies were requested",
                        last_message.elapsed()
                    ))));
                }
                // Reply requested: the server's answer is a keepalive with its current
                // position, which lets an idle slot advance (see on_keepalive).
                st.send_status(&mut stream, true).await?;
                next_status = now + status_interval;
            }
            if now >= next_slot_check {
                next_slot_check = now + SLOT_CHECK_INTERVAL;
                check_slot(metrics, &label, direction.source.as_str(), &source_sql, &slot).await?;
                if !st.applier.batch_open() {
                    st.applier.refresh_parked().await.map_err(|e| st.apply_err(e))?;
                }
            }
            if now >= st.next_drift_check && st.open.is_none() {
                st.next_drift_check = now + drift::DRIFT_CHECK_INTERVAL;
                if !st.paused.is_empty() {
                    st.recheck_paused().await?;
                }
                if !st.syncing.is_empty() {
                    st.recheck_syncing().await?;
                }
            }
        }
    }
    .await;
    if result.is_err() {
        st.applier.abandon();
    }
    result
}

/// Reads the slot's retained WAL into the metric; a lost or dropped slot is fatal.
async fn check_slot(
    metrics: &Metrics,
    label: &str,
    source_node: &str,
    source_sql: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), PipelineError> {
    match read_slot_usage(source_sql, slot).await {
        Ok(Some((retained, status))) => {
            metrics.slot_retained_wal_bytes.with_label_values(&[label]).set(retained);
            if status.as_deref() == Some("lost") {
                return Err(PipelineError::Fatal {
                    direction: label.to_string(),
                    message: format!("replication slot {slot} lost WAL it needed (wal_status = lost)"),
                });
            }
            Ok(())
        }
        Ok(None) => Err(PipelineError::Fatal {
            direction: label.to_string(),
            message: format!("replication slot {slot} was dropped on node {source_node}"),
        }),
        Err(e) => {
            warn!(direction = %label, error = %crate::db::describe(&e), "cannot read slot usage");
            Ok(())
        }
    }
}

/// The slot's confirmed_flush_lsn and wal_status, or `None` when the slot does not exist.
async fn read_slot(client: &tokio_postgres::Client, node: &str, slot: &str) -> Result<Option<(Lsn, Option<String>)>, DbError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| DbError::new(node, format!("cannot read replication slot {slot}"), e))?;
    Ok(row.map(|r| {
        let lsn: Option<String> = r.get(0);
        (lsn.and_then(|l| l.parse().ok()).unwrap_or(Lsn::ZERO), r.get(1))
    }))
}

async fn read_slot_usage(client: &tokio_postgres::Client, slot: &str) -> Result<Option<(i64, Option<String>)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT COALESCE((pg_current_wal_lsn() - restart_lsn)::bigint, 0), wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

impl State<'_> {
    fn apply_err(&self, source: ApplyError) -> PipelineError {
        PipelineError::Apply { direction: self.label.clone(), source }
    }

    fn violation(&self, lsn: Lsn, message: impl Into<String>) -> PipelineError {
        PipelineError::Violation { direction: self.label.clone(), lsn, message: message.into() }
    }

    async fn handle_xlogdata(&mut self, lsn: Lsn, data: &bytes::Bytes) -> Result<(), PipelineError> {
        let msg = pgoutput::decode(data, &self.ctx).map_err(|source| PipelineError::Decode {
            direction: self.label.clone(),
            lsn,
            source,
        })?;
        let a = |s: &Self, e| s.apply_err(e);
        match msg {
            Message::Begin(b) => {
                if self.open.is_some() {
                    return Err(self.violation(lsn, "Begin inside an open transaction"));
                }
                self.open = Some(OpenTransaction { final_lsn: b.final_lsn, echo: false, changes: 0 });
            }
            Message::Origin(o) => {
                let Some(open) = &mut self.open else {
                    return Err(self.violation(lsn, "Origin outside a transaction"));
                };
                open.echo = self.echo_origins.contains(&o.name);
            }
            Message::Relation(rel) => self.on_relation(rel, data).await?,
            Message::Type(_) | Message::LogicalMessage(_) => {}
            Message::Insert(m) => self.row_change(lsn, data, RowMessage::Insert(m)).await?,
            Message::Update(m) => self.row_change(lsn, data, RowMessage::Update(m)).await?,
            Message::Delete(m) => self.row_change(lsn, data, RowMessage::Delete(m)).await?,
            Message::Truncate(tr) => {
                let wanted = self.change_wanted(lsn)?;
                if wanted && self.pairer.is_some() {
                    return Err(self.violation(
                        lsn,
                        "TRUNCATE of a table replicated both ways: its guard trigger (pgduplex_no_truncate) was removed; \
                         the other node cannot follow a TRUNCATE, re-run `pgduplex init` and resynchronise the table",
                    ));
                }
                if wanted {
                    // TRUNCATE takes an ACCESS EXCLUSIVE lock: keep it out of a batch with earlier
                    // source transactions (possible when it is its transaction's first change, so
                    // nothing of this transaction is in the batch yet).
                    if self.open.as_ref().is_some_and(|t| t.changes == 1) && self.applier.batch_open() {
                        self.applier.commit_batch().await.map_err(|e| a(self, e))?;
                    }
                    // Paused tables' part is held; the rest is applied.
                    let tr = self.hold_truncate(tr, data).await?;
                    if !tr.relation_oids.is_empty() {
                        self.applier.begin_if_needed().await.map_err(|e| a(self, e))?;
                        self.applier.truncate(&tr).await.map_err(|e| a(self, e))?;
                    }
                }
            }
            Message::Commit(c) => {
                let Some(open) = self.open.take() else {
                    return Err(self.violation(lsn, "Commit outside a transaction"));
                };
                if c.commit_lsn != open.final_lsn {
                    return Err(self.violation(
                        lsn,
                        format!("Commit LSN {} differs from Begin's final LSN {}", c.commit_lsn, open.final_lsn),
                    ));
                }
                if open.echo {
                    self.metrics.echoes_dropped.with_label_values(&[&self.label]).inc();
                }
                if let Some(pairer) = &mut self.pairer {
                    if open.echo {
                        pairer.discard();
                    } else {
                        let changes = pairer.finish();
                        self.applier.apply_paired(changes, c.end_lsn).await.map_err(|e| a(self, e))?;
                    }
                }
                self.write_lsn = self.write_lsn.max(c.end_lsn);
                self.last_commit_time = c.commit_time;
                if self.applier.end_source_transaction(&c, !open.echo) {
                    self.applier.commit_batch().await.map_err(|e| a(self, e))?;
                }
                if !self.resume_wanted.is_empty() {
                    self.resume_wanted_tables().await?;
                }
            }
            other => {
                return Err(self.violation(
                    lsn,
                    format!("unexpected {} message: streaming and two-phase were not requested", other.name()),
                ));
            }
        }
        Ok(())
    }

    /// Whether a change inside the open transaction should be applied (not an echo); counts it.
    fn change_wanted(&mut self, lsn: Lsn) -> Result<bool, PipelineError> {
        match &mut self.open {
            None => Err(self.violation(lsn, "change outside a transaction")),
            Some(t) => {
                t.changes += 1;
                Ok(!t.echo)
            }
        }
    }

    /// An insert, update or delete: held (paused or added table), dropped (echo, or in an
    /// added table's copy), buffered for pairing (two-way) or applied.
    async fn row_change(&mut self, lsn: Lsn, data: &bytes::Bytes, row: RowMessage) -> Result<(), PipelineError> {
        if !self.change_wanted(lsn)? || self.held(row.relation_oid(), data).await? {
            return Ok(());
        }
        match &mut self.pairer {
            Some(p) => row.pair(p),
            None => {
                self.applier.begin_if_needed().await.map_err(|e| self.apply_err(e))?;
                row.apply(&mut self.applier).await.map_err(|e| self.apply_err(e))?;
            }
        }
        Ok(())
    }

    /// A keepalive while idle: record its position durably so the slot can advance.
    async fn on_keepalive(&mut self, wal_end: Lsn) -> Result<(), PipelineError> {
        let idle = self.open.is_none() && !self.applier.batch_open();
        if idle && wal_end > self.applier.committed_lsn() && self.last_idle_record.elapsed() >= self.idle_record_interval {
            self.applier
                .record_idle_position(wal_end, self.direction.source.as_str())
                .await
                .map_err(|e| self.apply_err(e))?;
            self.write_lsn = self.write_lsn.max(wal_end);
            self.last_idle_record = Instant::now();
            debug!(direction = %self.label, lsn = %wal_end, "recorded idle position");
        }
        Ok(())
    }

    /// Sends a standby status update with the durable origin progress as flush position.
    async fn send_status(&mut self, stream: &mut ReplicationStream, reply: bool) -> Result<(), PipelineError> {
        self.applier.collect_completed().await.map_err(|e| self.apply_err(e))?;
        if self.applier.committed_lsn() > self.flushed {
            let p = self.applier.flushed_progress().await.map_err(|e| self.apply_err(e))?;
            debug_assert!(p >= self.flushed, "origin progress went backwards");
            self.flushed = self.flushed.max(p);
        }
        let write = self.write_lsn.max(self.flushed);
        stream
            .send_standby_status(write, self.flushed, self.flushed, reply)
            .await
            .map_err(|source| PipelineError::Protocol {
                direction: self.label.clone(),
                node: self.direction.source.to_string(),
                source: Box::new(source),
            })?;
        let committed = self.applier.committed_lsn();
        let behind = self.open.is_some() || self.applier.batch_open() || self.server_wal_end > committed;
        self.metrics
            .lag_bytes
            .with_label_values(&[&self.label])
            .set(i64::try_from(committed.bytes_until(self.server_wal_end)).unwrap_or(i64::MAX));
        let lag_s = if behind && self.last_commit_time != 0 {
            ((crate::protocol::pg_epoch_micros_now() - self.last_commit_time) as f64 / 1e6).max(0.0)
        } else {
            0.0
        };
        self.metrics.lag_seconds.with_label_values(&[&self.label]).set(lag_s);
        Ok(())
    }
}

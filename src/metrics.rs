//! Every metric pgduplex exports, in one place, and the `/metrics` + `/healthz` HTTP server.
//!
//! Labels: `direction` is `<source>-to-<target>` with the user's node names.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Source transactions applied (committed) on the target.
pub const APPLIED_TRANSACTIONS: &str = "pgduplex_applied_transactions_total";
/// Row changes (insert/update/delete, and one per truncated table) applied on the target.
pub const APPLIED_CHANGES: &str = "pgduplex_applied_changes_total";
/// Transactions dropped because they were our own writes coming back.
pub const ECHOES_DROPPED: &str = "pgduplex_echoes_dropped_total";
/// Bytes of source WAL between the server's current position and what the target has applied.
pub const LAG_BYTES: &str = "pgduplex_lag_bytes";
/// Seconds between now and the commit time of the last applied source transaction, while behind.
pub const LAG_SECONDS: &str = "pgduplex_lag_seconds";
/// WAL the source retains for the slot (current WAL position minus the slot's restart_lsn).
pub const SLOT_RETAINED_WAL_BYTES: &str = "pgduplex_slot_retained_wal_bytes";
/// Reconnections of a direction's pipeline after an error.
pub const RECONNECTS: &str = "pgduplex_reconnects_total";
/// Errors by direction and kind (`source`, `target`, `protocol`, `decode`, `apply`).
pub const ERRORS: &str = "pgduplex_errors_total";
/// Source transactions per target transaction.
pub const APPLY_BATCH_TRANSACTIONS: &str = "pgduplex_apply_batch_transactions";
/// Wall time of one target transaction, first statement to COMMIT.
pub const APPLY_BATCH_SECONDS: &str = "pgduplex_apply_batch_duration_seconds";
/// Rows an UPDATE or DELETE expected on the target but did not find.
pub const MISSING_ROWS: &str = "pgduplex_missing_rows_total";
/// 1 while a direction is streaming, 0 while it is reconnecting or stopped.
pub const PIPELINE_UP: &str = "pgduplex_pipeline_up";

/// Conflicts resolved by the merge, by table, kind and whose writes survived (two-way).
pub const CONFLICTS: &str = "pgduplex_conflicts_total";
/// Source transactions parked on the target because they could not be applied (two-way).
pub const PARKED_CHANGES: &str = "pgduplex_parked_changes";
/// 1 while a table's changes are held because the target lacks some of its columns (schema
/// drift), by direction and table.
pub const TABLE_PAUSED: &str = "pgduplex_table_paused";

/// Handles to every metric, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub applied_transactions: IntCounterVec,
    pub applied_changes: IntCounterVec,
    pub echoes_dropped: IntCounterVec,
    pub lag_bytes: IntGaugeVec,
    pub lag_seconds: prometheus::GaugeVec,
    pub slot_retained_wal_bytes: IntGaugeVec,
    pub reconnects: IntCounterVec,
    pub errors: IntCounterVec,
    pub apply_batch_transactions: HistogramVec,
    pub apply_batch_seconds: HistogramVec,
    pub missing_rows: IntCounterVec,
    pub pipeline_up: IntGaugeVec,
    pub conflicts: IntCounterVec,
    pub parked_changes: IntGaugeVec,
    pub table_paused: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            // Names are constants and unique, so registration cannot fail.
            r.register(Box::new(m.clone())).expect("metric names are unique");
            m
        }
        let dir = &["direction"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGaugeVec::new(Opts::new(name, help), dir).expect("valid metric"));
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), dir).expect("valid metric"),
            )
        };
        Metrics {
            applied_transactions: counter(APPLIED_TRANSACTIONS, "Source transactions applied on the target", dir),
            applied_changes: counter(APPLIED_CHANGES, "Row changes applied on the target", dir),
            echoes_dropped: counter(ECHOES_DROPPED, "Transactions dropped as echoes of our own writes", dir),
            lag_bytes: gauge(LAG_BYTES, "Source WAL bytes not yet applied on the target"),
            lag_seconds: reg(
                &registry,
                prometheus::GaugeVec::new(Opts::new(LAG_SECONDS, "Seconds the target is behind the source"), dir)
                    .expect("valid metric"),
            ),
            slot_retained_wal_bytes: gauge(SLOT_RETAINED_WAL_BYTES, "WAL bytes the source retains for the slot"),
            reconnects: counter(RECONNECTS, "Pipeline reconnections after an error", dir),
            errors: counter(ERRORS, "Errors by kind", &["direction", "kind"]),
            apply_batch_transactions: histogram(
                APPLY_BATCH_TRANSACTIONS,
                "Source transactions per target transaction",
                prometheus::exponential_buckets(1.0, 4.0, 9).expect("valid buckets"),
            ),
            apply_batch_seconds: histogram(
                APPLY_BATCH_SECONDS,
                "Duration of one target transaction",
                prometheus::exponential_buckets(0.0005, 4.0, 10).expect("valid buckets"),
            ),
            missing_rows: counter(MISSING_ROWS, "Rows an update or delete did not find on the target", dir),
            pipeline_up: gauge(PIPELINE_UP, "1 while the direction is streaming"),
            conflicts: counter(CONFLICTS, "Concurrent changes resolved by the merge", &["table", "kind", "resolution"]),
            parked_changes: gauge(PARKED_CHANGES, "Changes parked on the target, waiting for `pgduplex resolve`"),
            table_paused: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(TABLE_PAUSED, "1 while the table's changes are held: the target lacks some of its columns"),
                    &["direction", "table"],
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    /// Creates every per-direction series at zero, so dashboards and alerts see them (and a
    /// `rate()` has a start) before the first event.
    pub fn register_direction(&self, label: &str) {
        let l = [label];
        self.applied_transactions.with_label_values(&l);
        self.applied_changes.with_label_values(&l);
        self.echoes_dropped.with_label_values(&l);
        self.lag_bytes.with_label_values(&l);
        self.lag_seconds.with_label_values(&l);
        self.slot_retained_wal_bytes.with_label_values(&l);
        self.reconnects.with_label_values(&l);
        self.missing_rows.with_label_values(&l);
        self.pipeline_up.with_label_values(&l);
        self.parked_changes.with_label_values(&l);
    }

    /// The sum of every sample of the labelled metric `name` in Prometheus text `text` (e.g.
    /// all `pgduplex_conflicts_total{...}` series), for summaries.
    pub fn sum_samples(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Whether every direction in `labels` is streaming.
    pub fn healthy(&self, labels: &[String]) -> bool {
        labels.iter().all(|l| self.pipeline_up.with_label_values(&[l]).get() == 1)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Binds the metrics address (separately from serving, so a busy port is reported at start).
pub async fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on metrics.listen {listen}: {e}")))
}

/// Serves `/metrics` and `/healthz` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    directions: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let m = metrics.clone();
                let d = directions.clone();
                async move {
                    if m.healthy(&d) {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not streaming\n")
                    }
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let m = Metrics::new();
        m.applied_transactions.with_label_values(&["a-to-b"]).inc();
        m.pipeline_up.with_label_values(&["a-to-b"]).set(1);
        let text = m.render();
        assert!(text.contains("pgduplex_applied_transactions_total{direction=\"a-to-b\"} 1"), "{text}");
        assert!(m.healthy(&["a-to-b".to_string()]));
        assert!(!m.healthy(&["b-to-a".to_string()]));
    }
}

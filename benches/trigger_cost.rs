//! What pgduplex's two-way capture triggers cost the application: pgbench's TPC-B-like workload
//! on PostgreSQL 15, with and without the triggers, in the same run on the same server.
//!
//! Two-way replication (sql/two_way.sql) puts an AFTER ROW trigger on every replicated table that
//! writes one row of the table's versions table per data change (a `nextval`, a clock read and an
//! `INSERT .. ON CONFLICT DO UPDATE`). That work happens inside the application's transactions,
//! so it is paid in throughput and in WAL. The project's target: the triggers cost at most 15%
//! of TPS. This bench only prints; timings on a shared machine are not something to assert on.
//!
//! Method: one cluster, two databases initialised identically with `pgbench -i -s SCALE`, plus an
//! `id bigserial PRIMARY KEY` on pgbench_history in both (two-way replication needs a key, and the
//! schemas must match). `trig` gets the pgduplex schema (target_schema.sql, two_way.sql), nodes
//! `a` (this one) and `b`, and `pgduplex.track()` on the four pgbench tables; `base` gets nothing.
//! After a short discarded warm-up of each, pgbench's builtin TPC-B-like script runs with
//! `-c 4 -j 2` for SECONDS per run, baseline and triggers alternating for RUNS pairs (the order
//! swaps every pair) so that drift and noise hit both alike. Before each run: VACUUM ANALYZE of
//! that database and a CHECKPOINT (so each run starts with the same full-page-write state).
//! WAL per transaction is the `pg_current_wal_lsn()` difference around the run divided by the
//! transactions pgbench reports. The full-page images in it (pg_stat_wal.wal_fpi) are shown too:
//! after the CHECKPOINT their number follows the pages a run touches, not its transaction count,
//! so WAL per transaction rises when a run is slower. The whole series runs twice: with
//! `synchronous_commit = on` (commit-fsync bound: swings with the disk) and `off` (via
//! PGOPTIONS; closer to the CPU cost of the triggers).
//!
//! pgbench runs on the same machine as the server and takes CPU from it; on a small machine
//! (the project's CI has 2 cores) the `off` series is CPU bound, client included.
//!
//! Server settings: shared_buffers 1GB (both databases stay in memory), max_wal_size 8GB and
//! checkpoint_timeout 1h (no checkpoint lands inside a run), autovacuum off (the LSN is
//! cluster-wide: an autovacuum of the other database would count in this run's WAL; the
//! explicit VACUUM before each run replaces it, and its cost is not part of the figures).
//!
//! Run: `cargo bench --bench trigger_cost` (needs PGDUPLEX_PG15_BIN, see
//! scripts/install-postgres.sh). Knobs: PGDUPLEX_TRIGGER_SCALE (pgbench scale, default 10),
//! PGDUPLEX_TRIGGER_SECONDS (per run, default 20), PGDUPLEX_TRIGGER_RUNS (pairs per mode,
//! default 5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Cluster, ClusterOptions, PgVersion, start_cluster};

const TARGET_SCHEMA: &str = include_str!("../sql/target_schema.sql");
const TWO_WAY: &str = include_str!("../sql/two_way.sql");
const TABLES: [&str; 4] = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"];
const BASE: &str = "base";
const TRIG: &str = "trig";
/// Seconds of the discarded warm-up run of each database.
const WARMUP_SECONDS: u64 = 5;
/// The project's target: the triggers cost at most this share of TPS.
const TARGET_COST: f64 = 0.15;

fn env_u64(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("{var}={s:?} is not a positive integer")),
        Err(_) => default,
    }
    .max(1)
}

/// One pgbench run: what pgbench reported and the WAL written meanwhile.
#[derive(Clone, Copy)]
struct Sample {
    tps: f64,
    transactions: u64,
    wal_bytes: u64,
    /// Full-page images in that WAL (pg_stat_wal.wal_fpi): the first change of each page after
    /// the checkpoint logs the whole page, so their count depends on how many distinct pages
    /// the run touched, not on how many transactions it ran.
    wal_fpi: u64,
}

impl Sample {
    fn wal_per_txn(&self) -> f64 {
        self.wal_bytes as f64 / self.transactions as f64
    }

    fn fpi_per_txn(&self) -> f64 {
        self.wal_fpi as f64 / self.transactions as f64
    }
}

struct Mode {
    name: &'static str,
    /// PGOPTIONS for pgbench's sessions.
    pgoptions: &'static str,
}

const MODES: [Mode; 2] = [
    Mode { name: "synchronous_commit=on", pgoptions: "" },
    Mode { name: "synchronous_commit=off", pgoptions: "-c synchronous_commit=off" },
];

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs benches in test mode: nothing to do there.
        println!("trigger cost benchmark: run it with `cargo bench --bench trigger_cost`");
        return;
    }
    let scale = env_u64("PGDUPLEX_TRIGGER_SCALE", 10);
    let seconds = env_u64("PGDUPLEX_TRIGGER_SECONDS", 20);
    let runs = env_u64("PGDUPLEX_TRIGGER_RUNS", 5) as usize;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);

    let opts = ClusterOptions::default()
        .with_conf("shared_buffers", "1GB")
        .with_conf("max_wal_size", "8GB")
        .with_conf("checkpoint_timeout", "1h")
        .with_conf("autovacuum", "off");
    let cluster = start_cluster(PgVersion::V15, opts);
    let version = sql(&cluster, "postgres", "SHOW server_version");
    println!(
        "pgduplex capture trigger cost: pgbench TPC-B-like, PostgreSQL {version}, scale {scale}, \
         -c 4 -j 2, {seconds}s per run, {runs} baseline/trigger pairs per mode, {cores} cores"
    );

    let started = Instant::now();
    for db in [BASE, TRIG] {
        sql(&cluster, "postgres", &format!("CREATE DATABASE {db}"));
        pgbench(&cluster, db, &["-i", "-q", "-s", &scale.to_string()], "");
        cluster.psql(db, "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY");
    }
    install_triggers(&cluster, TRIG);
    eprintln!("initialised both databases in {:.1?}", started.elapsed());

    for db in [BASE, TRIG] {
        prepare(&cluster, db);
        pgbench(&cluster, db, &["-n", "-c", "4", "-j", "2", "-T", &WARMUP_SECONDS.to_string()], "");
    }

    let mut results: Vec<(&Mode, Vec<Sample>, Vec<Sample>)> = Vec::new();
    for mode in &MODES {
        let (mut base, mut trig) = (Vec::new(), Vec::new());
        for pair in 0..runs {
            let order = if pair % 2 == 0 { [BASE, TRIG] } else { [TRIG, BASE] };
            for db in order {
                let s = run(&cluster, db, seconds, mode.pgoptions);
                eprintln!(
                    "{} pair {}: {db:4} {:8.1} tps, {:7} txns, {:7.0} WAL bytes/txn, {:.3} FPI/txn",
                    mode.name,
                    pair + 1,
                    s.tps,
                    s.transactions,
                    s.wal_per_txn(),
                    s.fpi_per_txn()
                );
                if db == BASE { base.push(s) } else { trig.push(s) }
            }
        }
        results.push((mode, base, trig));
    }

    check_triggers_fired(&cluster);
    report(&results, runs);
}

/// Runs `sql` with psql; the output trimmed.
fn sql(cluster: &Cluster, db: &str, q: &str) -> String {
    cluster.psql(db, q).trim().to_string()
}

/// Installs two-way capture on `db` the way `pgduplex init` does on node `a` of `a`/`b`.
fn install_triggers(cluster: &Cluster, db: &str) {
    cluster.psql(db, TARGET_SCHEMA);
    cluster.psql(db, TWO_WAY);
    cluster.psql(db, "INSERT INTO pgduplex.nodes VALUES ('a', true), ('b', false)");
    for t in TABLES {
        cluster.psql(db, &format!("SELECT pgduplex.track('public.{t}'::regclass)"));
    }
    let triggers = sql(
        cluster,
        db,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgduplex_capture' AND tgenabled = 'A'",
    );
    assert_eq!(triggers, TABLES.len().to_string(), "expected one enabled capture trigger per pgbench table on {db}");
}

/// VACUUM ANALYZE of `db`, then a CHECKPOINT: every run starts from the same state.
fn prepare(cluster: &Cluster, db: &str) {
    cluster.psql(db, "VACUUM ANALYZE");
    cluster.psql("postgres", "CHECKPOINT");
}

/// One measured run of the builtin TPC-B-like script on `db`.
fn run(cluster: &Cluster, db: &str, seconds: u64, pgoptions: &str) -> Sample {
    prepare(cluster, db);
    let (before, fpi_before) = wal_position(cluster);
    let out = pgbench(cluster, db, &["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string()], pgoptions);
    // pgbench's backends flush their WAL statistics as they exit, just after pgbench returns.
    support::wait_until_blocking(&format!("pgbench's sessions on {db} to end"), Duration::from_secs(60), || {
        sql(cluster, "postgres", &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'")) == "0"
    });
    let (after, fpi_after) = wal_position(cluster);
    let wal = sql(cluster, "postgres", &format!("SELECT pg_wal_lsn_diff('{after}', '{before}')::bigint"));
    let transactions: u64 = field(&out, "number of transactions actually processed:")
        .parse()
        .unwrap_or_else(|e| panic!("pgbench's transaction count: {e}\n{out}"));
    assert!(transactions > 0, "pgbench on {db} processed no transactions:\n{out}");
    if let Some(failed) = out.lines().find_map(|l| l.trim().strip_prefix("number of failed transactions:")) {
        assert!(failed.trim().starts_with('0'), "pgbench on {db} had failed transactions:\n{out}");
    }
    let tps: f64 = field(&out, "tps =").parse().unwrap_or_else(|e| panic!("pgbench's tps: {e}\n{out}"));
    Sample {
        tps,
        transactions,
        wal_bytes: wal.parse().unwrap_or_else(|e| panic!("WAL difference {wal:?}: {e}")),
        wal_fpi: fpi_after - fpi_before,
    }
}

/// The current WAL insert position and pg_stat_wal's full-page image count.
fn wal_position(cluster: &Cluster) -> (String, u64) {
    let row = sql(cluster, "postgres", "SELECT pg_current_wal_lsn(), wal_fpi FROM pg_stat_wal");
    let (lsn, fpi) = row.split_once('|').unwrap_or_else(|| panic!("unexpected WAL position row {row:?}"));
    (lsn.to_string(), fpi.parse().unwrap_or_else(|e| panic!("pg_stat_wal.wal_fpi {fpi:?}: {e}")))
}

/// The first whitespace-separated word after `prefix` on the line that starts with it.
fn field(out: &str, prefix: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {prefix:?} line in pgbench's output:\n{out}"))
        .to_string()
}

/// Runs PostgreSQL 15's pgbench against `db` as the superuser; its stdout. Panics with its
/// output when it fails.
fn pgbench(cluster: &Cluster, db: &str, args: &[&str], pgoptions: &str) -> String {
    let mut cmd = Command::new(cluster.version.bin("pgbench"));
    // Only our connection settings: a PGHOST or PGOPTIONS of the caller's shell must not leak in.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("PG") && !var.to_string_lossy().starts_with("PGDUPLEX") {
            cmd.env_remove(var);
        }
    }
    if !pgoptions.is_empty() {
        cmd.env("PGOPTIONS", pgoptions);
    }
    let out = cmd
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &cluster.port.to_string()])
        .args(args)
        .arg(db)
        .env("LC_ALL", "C")
        .output()
        .expect("starting pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "pgbench {args:?} on {db} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// Panics unless the capture triggers wrote versions rows: a trigger database without them
/// would mean the "with triggers" figures measured nothing.
fn check_triggers_fired(cluster: &Cluster) {
    let mut counts = Vec::new();
    for t in TABLES {
        let n: u64 = sql(cluster, TRIG, &format!("SELECT count(*) FROM pgduplex.\"public.{t}\""))
            .parse()
            .expect("count(*) of a versions table");
        counts.push(format!("{t} {n}"));
        if n == 0 {
            panic!(
                "versions table pgduplex.\"public.{t}\" is empty after the runs: the capture triggers \
                 never fired, so the trigger figures are meaningless"
            );
        }
    }
    let stray = sql(cluster, BASE, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgduplex%'");
    assert_eq!(stray, "0", "the baseline database has pgduplex triggers");
    println!("versions rows written on {TRIG}: {}", counts.join(", "));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn report(results: &[(&Mode, Vec<Sample>, Vec<Sample>)], runs: usize) {
    println!();
    println!(
        "| mode | TPS baseline | TPS triggers | TPS ratio | TPS cost | median pair ratio | WAL B/txn baseline | WAL B/txn triggers | WAL ratio | FPI/txn baseline | FPI/txn triggers |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mode, base, trig) in results {
        let tps_b = median(base.iter().map(|s| s.tps).collect());
        let tps_t = median(trig.iter().map(|s| s.tps).collect());
        let wal_b = median(base.iter().map(Sample::wal_per_txn).collect());
        let wal_t = median(trig.iter().map(Sample::wal_per_txn).collect());
        let fpi_b = median(base.iter().map(Sample::fpi_per_txn).collect());
        let fpi_t = median(trig.iter().map(Sample::fpi_per_txn).collect());
        let pair_ratio = median(base.iter().zip(trig).map(|(b, t)| t.tps / b.tps).collect());
        println!(
            "| {} | {tps_b:.1} | {tps_t:.1} | {:.3} | {:.1}% | {pair_ratio:.3} | {wal_b:.0} | {wal_t:.0} | {:.2} | {fpi_b:.3} | {fpi_t:.3} |",
            mode.name,
            tps_t / tps_b,
            (1.0 - tps_t / tps_b) * 100.0,
            wal_t / wal_b
        );
    }
    println!();
    println!("TPS ratio = median TPS with triggers / median baseline TPS; cost = 1 - ratio (target: at most {:.0}%).", TARGET_COST * 100.0);
    for (mode, base, trig) in results {
        let cost = 1.0 - median(trig.iter().map(|s| s.tps).collect()) / median(base.iter().map(|s| s.tps).collect());
        println!(
            "  {}: cost {:.1}%, {} the {:.0}% target",
            mode.name,
            cost * 100.0,
            if cost <= TARGET_COST { "within" } else { "ABOVE" },
            TARGET_COST * 100.0
        );
    }
    println!();
    println!("Samples ({runs} pairs per mode; odd pairs ran the baseline first, even pairs the triggers first):");
    println!();
    println!(
        "| mode | pair | TPS baseline | TPS triggers | ratio | txns baseline | txns triggers | WAL B/txn baseline | WAL B/txn triggers | FPI/txn baseline | FPI/txn triggers |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mode, base, trig) in results {
        for (i, (b, t)) in base.iter().zip(trig).enumerate() {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.3} | {} | {} | {:.0} | {:.0} | {:.3} | {:.3} |",
                mode.name,
                i + 1,
                b.tps,
                t.tps,
                t.tps / b.tps,
                b.transactions,
                t.transactions,
                b.wal_per_txn(),
                t.wal_per_txn(),
                b.fpi_per_txn(),
                t.fpi_per_txn()
            );
        }
    }
}

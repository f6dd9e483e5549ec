//! Initial copy throughput of `pgduplex init --copy-from <node> --jobs 2` against
//! `pg_dump --data-only | psql` of the same tables, from the same source, in the same run.
//!
//! A source database gets five tables (see `TABLES`); every sample copies all of them into a
//! fresh target database that holds the same empty schema:
//!
//!   pg_dump   `pg_dump --data-only <src> | psql <dst>` (one stream; PG 18's client programs,
//!             which can dump from and restore into every older server), timed end to end.
//!   pgduplex  `pgduplex init --copy-from src --jobs 2`, timed end to end (its checks, the
//!             publication, slot and origin included), then `pgduplex teardown` so the next
//!             sample can create the slot again.
//!
//! The two alternate (the order flips every sample), PGDUPLEX_BENCH_SAMPLES (default 3) times
//! each; one more pgduplex sample with `--jobs 1` is taken for reference. Every target is
//! checked afterwards: per table the row count and an aggregate of the key must match the
//! source. Medians are reported; nothing here asserts on timing.
//!
//! Rates: rows/s counts the rows of all five tables; MB/s divides the sum of `pg_table_size`
//! of the source tables (heap + TOAST, without indexes; 1 MB = 10^6 bytes) by the time. Both
//! systems are divided by the same numbers, so the ratio is the ratio of their times.
//!
//! Run: `cargo bench --bench initial_copy` (needs the servers: `bash scripts/install-postgres.sh`
//! and the PGDUPLEX_PG15_BIN / PGDUPLEX_PG18_BIN it prints). PGDUPLEX_BENCH_SOURCE and
//! PGDUPLEX_BENCH_TARGET pick the versions (15 or 18; default 15 -> 18, a migration).
//! PGDUPLEX_COPY_ROWS sets the size of the largest table (default 2,000,000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Cluster, ClusterOptions, PgVersion, start_cluster};

/// Name, schema, how to fill it (`{n}` = its row count), its row count (None: PGDUPLEX_COPY_ROWS),
/// and a check aggregate compared between source and target.
struct Table {
    name: &'static str,
    ddl: &'static str,
    fill: &'static str,
    rows: Option<u64>,
    check: &'static str,
}

const TABLES: &[Table] = &[
    Table {
        name: "big",
        ddl: "CREATE TABLE big (id bigint PRIMARY KEY, v text NOT NULL, n int NOT NULL, t timestamptz NOT NULL)",
        fill: "INSERT INTO big SELECT g, md5(g::text), (g * 7) % 100000, '2026-01-01'::timestamptz + g * interval '1 second' \
               FROM generate_series(1, {n}) g",
        rows: None,
        check: "SELECT count(*)::text || ':' || coalesce(sum(id), 0)::text || ':' || coalesce(sum(n), 0)::text FROM big",
    },
    Table {
        name: "wide",
        ddl: "CREATE TABLE wide (id int PRIMARY KEY, doc jsonb NOT NULL, body text NOT NULL, amount numeric(14, 4) NOT NULL, \
              tags text[] NOT NULL, created timestamptz NOT NULL, note text)",
        fill: "INSERT INTO wide SELECT g, \
               jsonb_build_object('id', g, 'name', 'customer ' || g, 'score', g * 0.37, 'active', g % 3 = 0, \
                                  'address', jsonb_build_object('city', 'city ' || (g % 500), 'zip', lpad((g % 99999)::text, 5, '0')), \
                                  'tags', jsonb_build_array('a', 'b', g % 10)), \
               repeat(md5(g::text), 6), g * 1.2345, ARRAY['x' || (g % 7), 'y' || (g % 11)], \
               '2025-06-01'::timestamptz + g * interval '17 seconds', CASE WHEN g % 5 = 0 THEN NULL ELSE 'note ' || g END \
               FROM generate_series(1, {n}) g",
        rows: Some(300_000),
        check: "SELECT count(*)::text || ':' || coalesce(sum(id), 0)::text || ':' || coalesce(sum(amount), 0)::text FROM wide",
    },
    Table {
        name: "events",
        ddl: "CREATE TABLE events (id bigint PRIMARY KEY, kind smallint NOT NULL, payload bytea NOT NULL, at timestamptz NOT NULL)",
        fill: "INSERT INTO events SELECT g, g % 12, decode(md5(g::text) || md5((g + 1)::text), 'hex'), \
               '2026-02-01'::timestamptz + g * interval '250 milliseconds' FROM generate_series(1, {n}) g",
        rows: Some(100_000),
        check: "SELECT count(*)::text || ':' || coalesce(sum(id), 0)::text || ':' || coalesce(sum(kind), 0)::text FROM events",
    },
    Table {
        name: "lines",
        ddl: "CREATE TABLE lines (order_id int NOT NULL, line int NOT NULL, sku text NOT NULL, qty int NOT NULL, \
              price numeric(10, 2) NOT NULL, PRIMARY KEY (order_id, line))",
        fill: "INSERT INTO lines SELECT g / 5, g % 5, 'SKU-' || lpad((g % 7919)::text, 6, '0'), 1 + g % 9, (g % 10000) / 100.0 \
               FROM generate_series(1, {n}) g",
        rows: Some(50_000),
        check: "SELECT count(*)::text || ':' || coalesce(sum(order_id), 0)::text || ':' || coalesce(sum(price), 0)::text FROM lines",
    },
    Table {
        name: "ref",
        ddl: "CREATE TABLE ref (code text PRIMARY KEY, label text NOT NULL, active boolean NOT NULL)",
        fill: "INSERT INTO ref SELECT 'R' || lpad(g::text, 6, '0'), 'reference value ' || g, g % 4 <> 0 FROM generate_series(1, {n}) g",
        rows: Some(10_000),
        check: "SELECT count(*)::text || ':' || count(*) FILTER (WHERE active)::text FROM ref",
    },
];

fn version(var: &str, default: PgVersion) -> PgVersion {
    match std::env::var(var).as_deref() {
        Ok("15") => PgVersion::V15,
        Ok("18") => PgVersion::V18,
        _ => default,
    }
}

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|s| s.replace(['_', ','], "").parse().ok()).unwrap_or(default)
}

fn sql(cluster: &Cluster, db: &str, q: &str) -> String {
    cluster.psql(db, q).trim().to_string()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One timed run: wall time, CPU seconds of the client side (pg_dump + psql, or pgduplex: the
/// waited-for children of this process) and how busy the whole machine was (all cores, the
/// servers included; 100% = every core busy).
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    client_cpu: f64,
    machine_busy: f64,
}

struct Meter {
    t0: Instant,
    children: f64,
    stat: (u64, u64),
}

impl Meter {
    fn start() -> Meter {
        Meter { t0: Instant::now(), children: children_cpu(), stat: cpu_stat() }
    }

    fn stop(self) -> Sample {
        let wall = self.t0.elapsed();
        let (busy, total) = cpu_stat();
        let (db, dt) = (busy.saturating_sub(self.stat.0), total.saturating_sub(self.stat.1));
        Sample {
            wall,
            client_cpu: children_cpu() - self.children,
            machine_busy: if dt == 0 { 0.0 } else { 100.0 * db as f64 / dt as f64 },
        }
    }
}

/// User + system CPU seconds of every child this process has waited for.
fn children_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// (busy, total) jiffies of all cores, from the first line of /proc/stat ((0, 0) if unreadable).
fn cpu_stat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs benches in test mode: nothing to do there.
        println!("initial copy benchmark: run it with `cargo bench --bench initial_copy`");
        return;
    }
    let samples = env_u64("PGDUPLEX_BENCH_SAMPLES", 3).max(1) as usize;
    let big_rows = env_u64("PGDUPLEX_COPY_ROWS", 2_000_000).max(1);
    let sv = version("PGDUPLEX_BENCH_SOURCE", PgVersion::V15);
    let tv = version("PGDUPLEX_BENCH_TARGET", PgVersion::V18);
    let opts = ClusterOptions::default().with_conf("max_wal_size", "4GB").with_conf("checkpoint_timeout", "30min");
    let source = start_cluster(sv, opts.clone());
    let target = start_cluster(tv, opts);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);

    let src_db = "copy_src";
    sql(&source, "postgres", &format!("CREATE DATABASE {src_db}"));
    let schema: String = TABLES.iter().map(|t| format!("{};\n", t.ddl)).collect();
    source.psql(src_db, &schema);
    let t0 = Instant::now();
    let mut total_rows = 0;
    for t in TABLES {
        let n = t.rows.unwrap_or(big_rows);
        total_rows += n;
        source.psql(src_db, &t.fill.replace("{n}", &n.to_string()));
    }
    // Hint bits set and visibility map filled now, so the first sample does not pay for them.
    source.psql(src_db, "VACUUM (FREEZE, ANALYZE)");
    sql(&source, src_db, "CHECKPOINT");
    let names: Vec<String> = TABLES.iter().map(|t| format!("'{}'", t.name)).collect();
    let table_bytes: u64 = sql(
        &source,
        src_db,
        &format!("SELECT sum(pg_table_size(c.oid)) FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relname IN ({})", names.join(", ")),
    )
    .parse()
    .expect("pg_table_size sum");
    let expected: Vec<String> = TABLES.iter().map(|t| sql(&source, src_db, t.check)).collect();
    eprintln!(
        "source ready in {:.1?}: {} tables, {total_rows} rows, {:.1} MB (pg_table_size)",
        t0.elapsed(),
        TABLES.len(),
        table_bytes as f64 / 1e6
    );

    let dir = std::env::temp_dir().join(format!("pgduplex-bench-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let bench = Bench { source: &source, target: &target, src_db, schema: &schema, expected: &expected, dir: &dir };

    let (mut dump_times, mut ours_times, mut ours_copy_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        // Alternate which one goes first, so drift (caches, checkpoints) hits both alike.
        for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if which == 0 {
                let d = bench.pg_dump(&format!("dump{i}"));
                eprintln!("sample {i}: pg_dump | psql     {}", describe(&d));
                dump_times.push(d);
            } else {
                let (d, line) = bench.pgduplex(&format!("dup{i}"), 2);
                eprintln!("sample {i}: pgduplex --jobs 2 {}  [{line}]", describe(&d));
                if let Some(b) = copied_bytes(&line) {
                    ours_copy_bytes.push(b);
                }
                ours_times.push(d);
            }
        }
    }
    let (jobs1, line) = bench.pgduplex("dupj1", 1);
    eprintln!("reference: pgduplex --jobs 1 {}  [{line}]", describe(&jobs1));

    sql(&source, "postgres", &format!("DROP DATABASE {src_db}"));
    let _ = std::fs::remove_dir_all(&dir);

    let (dump, ours) = (median_sample(&dump_times), median_sample(&ours_times));
    let rows_s = |d: Duration| total_rows as f64 / d.as_secs_f64();
    let mb_s = |d: Duration| table_bytes as f64 / 1e6 / d.as_secs_f64();
    let list = |v: &[Sample]| v.iter().map(|s| format!("{:.2}", s.wall.as_secs_f64())).collect::<Vec<_>>().join(", ");
    println!();
    println!(
        "Initial copy: source PG {} -> target PG {}; {} tables, {total_rows} rows, {:.1} MB (sum of pg_table_size on the source: heap + TOAST, no indexes){}; \
         {samples} sample(s) each, medians; {cores} cores shared by both servers, the client programs and pgduplex",
        sv.major(),
        tv.major(),
        TABLES.len(),
        table_bytes as f64 / 1e6,
        ours_copy_bytes.first().map(|b| format!(", {:.1} MB as COPY text", b / 1e6)).unwrap_or_default(),
    );
    println!();
    println!("| method | time (s) | rows/s | MB/s | vs pg_dump \\| psql | client CPU (s) | machine busy | samples (s) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let row = |name: &str, s: Sample, all: &[Sample]| {
        let d = s.wall;
        println!(
            "| {name} | {:.2} | {:.0} | {:.1} | {:.2}x | {:.2} | {:.0}% | {} |",
            d.as_secs_f64(),
            rows_s(d),
            mb_s(d),
            dump.wall.as_secs_f64() / d.as_secs_f64(),
            s.client_cpu,
            s.machine_busy,
            list(all)
        );
    };
    row("pg_dump --data-only \\| psql", dump, &dump_times);
    row("pgduplex init --copy-from --jobs 2", ours, &ours_times);
    row("pgduplex init --copy-from --jobs 1 (reference)", jobs1, &[jobs1]);
    println!();
    println!(
        "ratio pgduplex (--jobs 2) / pg_dump | psql, throughput: {:.2}x (target >= 1.5x)",
        dump.wall.as_secs_f64() / ours.wall.as_secs_f64()
    );
    println!(
        "client CPU: user + system seconds of pg_dump + psql (and the shell), or of pgduplex; machine busy: all {cores} cores \
         over the run, servers included (100% = no idle core). Values of the median-time sample."
    );
}

/// The sample with the median wall time (its CPU figures come with it).
fn median_sample(v: &[Sample]) -> Sample {
    let wall = median(v.iter().map(|s| s.wall).collect());
    *v.iter().find(|s| s.wall == wall).expect("median is one of the samples")
}

fn describe(s: &Sample) -> String {
    format!("{:.2?} (client CPU {:.2}s, machine busy {:.0}%)", s.wall, s.client_cpu, s.machine_busy)
}

struct Bench<'a> {
    source: &'a Cluster,
    target: &'a Cluster,
    src_db: &'a str,
    schema: &'a str,
    expected: &'a [String],
    dir: &'a Path,
}

impl Bench<'_> {
    /// A fresh target database with the empty schema; the target checkpointed so that the
    /// dirty pages of the previous sample are not written during this one.
    fn fresh_target(&self, db: &str) {
        sql(self.target, "postgres", &format!("DROP DATABASE IF EXISTS {db}"));
        sql(self.target, "postgres", &format!("CREATE DATABASE {db}"));
        self.target.psql(db, self.schema);
        sql(self.target, "postgres", "CHECKPOINT");
    }

    /// Checks every table of `db` against the source, then drops it.
    fn check_and_drop(&self, db: &str, what: &str) {
        for (t, want) in TABLES.iter().zip(self.expected) {
            let got = sql(self.target, db, t.check);
            assert_eq!(&got, want, "{what}: table {} on the target differs from the source", t.name);
        }
        sql(self.target, "postgres", &format!("DROP DATABASE {db}"));
    }

    /// `pg_dump --data-only | psql` into a fresh database; the pipeline's wall time.
    fn pg_dump(&self, db: &str) -> Sample {
        self.fresh_target(db);
        let script = "set -o pipefail; \"$1\" --data-only --no-sync -h 127.0.0.1 -p \"$2\" -U postgres \"$3\" \
                      | \"$4\" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p \"$5\" -U postgres -d \"$6\" >/dev/null";
        let mut cmd = Command::new("bash");
        cmd.args(["-c", script, "pg_dump-psql"])
            .arg(PgVersion::V18.bin("pg_dump"))
            .arg(self.source.port.to_string())
            .arg(self.src_db)
            .arg(PgVersion::V18.bin("psql"))
            .arg(self.target.port.to_string())
            .arg(db);
        for var in ["PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGOPTIONS", "PGSERVICE"] {
            cmd.env_remove(var);
        }
        let meter = Meter::start();
        let out = cmd.output().expect("run pg_dump | psql");
        let elapsed = meter.stop();
        assert!(out.status.success(), "pg_dump | psql failed: {}", String::from_utf8_lossy(&out.stderr));
        self.check_and_drop(db, "pg_dump | psql");
        elapsed
    }

    /// `pgduplex init --copy-from src --jobs N` into a fresh database, then teardown; the wall
    /// time of init and the line it printed about the copy.
    fn pgduplex(&self, db: &str, jobs: usize) -> (Sample, String) {
        self.fresh_target(db);
        let config = self.dir.join(format!("{db}.toml"));
        std::fs::write(
            &config,
            format!(
                "[nodes.src]\nurl = {:?}\n[nodes.dst]\nurl = {:?}\n[replication]\ndirection = \"src-to-dst\"\ntables = [\"public.*\"]\n\
                 [metrics]\nlisten = \"off\"\n",
                self.source.url(self.src_db),
                self.target.url(db)
            ),
        )
        .expect("write config");
        let meter = Meter::start();
        let out = pgduplex(&["init", "--copy-from", "src", "--jobs", &jobs.to_string()], &config);
        let elapsed = meter.stop();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "pgduplex init failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let line = stdout.lines().find(|l| l.contains("copied")).unwrap_or("").trim().to_string();
        let down = pgduplex(&["teardown"], &config);
        assert!(down.status.success(), "pgduplex teardown failed:\n{}", String::from_utf8_lossy(&down.stderr));
        self.check_and_drop(db, &format!("pgduplex --jobs {jobs}"));
        (elapsed, line)
    }
}

fn pgduplex(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgduplex"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("PGDUPLEX_LOG", std::env::var("PGDUPLEX_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .output()
        .expect("run pgduplex")
}

/// The bytes in "copied 5 table(s), N rows, 12.3 MB in ..." (COPY text, as pgduplex counts it).
fn copied_bytes(line: &str) -> Option<f64> {
    let (_, rest) = line.split_once(" rows, ")?;
    let mb: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(mb * 1e6)
}

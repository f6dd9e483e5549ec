//! Catch-up throughput of pgduplex against PostgreSQL's native logical replication
//! (CREATE SUBSCRIPTION), on the same two clusters, from the same source WAL.
//!
//! For each workload a source database gets the workload while no consumer runs; the slots of
//! several native subscriptions and several pgduplex targets hold the same WAL. Then, taking
//! turns, a native subscription is enabled, or `pgduplex run` started, and timed until a marker
//! row committed after the workload appears on its target database; contents are checked after
//! each. Each system's median over PGDUPLEX_BENCH_SAMPLES (default 3) samples is reported.
//!
//!   W1  100,000 single-row INSERT transactions
//!   W2  one transaction inserting 1,000,000 rows
//!   W3  100,000 single-row UPDATE transactions on a 1,000,000-row table
//!
//! Run: `cargo bench --bench replication` (needs the servers: `bash scripts/install-postgres.sh`
//! and the PGDUPLEX_PG15_BIN / PGDUPLEX_PG18_BIN it prints). PGDUPLEX_BENCH_SOURCE and
//! PGDUPLEX_BENCH_TARGET pick the versions (15 or 18; default 15 -> 18, a migration).
//! PGDUPLEX_BENCH_SCALE divides the workload sizes (default 1) for a quick look.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Cluster, ClusterOptions, PgVersion, start_cluster};

struct Workload {
    name: &'static str,
    what: String,
    rows: u64,
    transactions: u64,
    /// Runs on source and both targets before replication starts.
    schema: String,
    /// Run on the source while no consumer runs.
    generate: Generate,
    /// SQL returning one text value that must match between source and target afterwards.
    check: &'static str,
}

enum Generate {
    Sql(String),
    Pgbench { script: String, transactions: u64 },
}

fn version(var: &str, default: PgVersion) -> PgVersion {
    match std::env::var(var).as_deref() {
        Ok("15") => PgVersion::V15,
        Ok("18") => PgVersion::V18,
        _ => default,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs benches in test mode: nothing to do there.
        println!("replication benchmark: run it with `cargo bench --bench replication`");
        return;
    }
    let scale: u64 = std::env::var("PGDUPLEX_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let sv = version("PGDUPLEX_BENCH_SOURCE", PgVersion::V15);
    let tv = version("PGDUPLEX_BENCH_TARGET", PgVersion::V18);
    let opts = ClusterOptions::default().with_conf("max_wal_size", "4GB").with_conf("checkpoint_timeout", "30min");
    let source = start_cluster(sv, opts.clone());
    let target = start_cluster(tv, opts);
    let (n_small, n_big) = (100_000 / scale, 1_000_000 / scale);

    let workloads = [Workload {
            name: "W1",
            what: format!("{n_small} single-row INSERT transactions"),
            rows: n_small,
            transactions: n_small,
            schema: "CREATE TABLE w (id bigserial PRIMARY KEY, client int NOT NULL, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now())".into(),
            generate: Generate::Pgbench {
                script: "INSERT INTO w (client, payload) VALUES (:client_id, md5(random()::text));\n".into(),
                transactions: n_small,
            },
            check: "SELECT count(*)::text || ':' || md5(string_agg(w::text, ',' ORDER BY id)) FROM w",
        },
        Workload {
            name: "W2",
            what: format!("one transaction inserting {n_big} rows"),
            rows: n_big,
            transactions: 1,
            schema: "CREATE TABLE w (id int PRIMARY KEY, h text NOT NULL, n numeric NOT NULL, at timestamptz NOT NULL)".into(),
            generate: Generate::Sql(format!(
                "INSERT INTO w SELECT g, md5(g::text), g * 1.5, '2026-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, {n_big}) g"
            )),
            check: "SELECT count(*)::text || ':' || md5(string_agg(w::text, ',' ORDER BY id)) FROM w",
        },
        Workload {
            name: "W3",
            what: format!("{n_small} single-row UPDATE transactions on a {n_big}-row table"),
            rows: n_small,
            transactions: n_small,
            schema: format!(
                "CREATE TABLE w (id int PRIMARY KEY, v bigint NOT NULL, h text NOT NULL); \
                 INSERT INTO w SELECT g, 0, md5(g::text) FROM generate_series(1, {n_big}) g; VACUUM ANALYZE w"
            ),
            generate: Generate::Pgbench {
                script: format!("\\set id random(1, {n_big})\nUPDATE w SET v = v + 1 WHERE id = :id;\n"),
                transactions: n_small,
            },
            check: "SELECT sum(v)::text || ':' || md5(string_agg(w::text, ',' ORDER BY id)) FROM w",
        }];

    println!(
        "pgduplex vs native logical replication, catch-up from retained WAL; source PG {} -> target PG {}; {} cores; scale 1/{scale}",
        sv.major(),
        tv.major(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let only = std::env::var("PGDUPLEX_BENCH_ONLY").ok();
    let mut results = Vec::new();
    for w in workloads.iter().filter(|w| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == w.name))) {
        let r = run_workload(&source, &target, w);
        println!(
            "{}: native {:.2}s, pgduplex {:.2}s (medians), ratio {:.2}",
            w.name,
            r.0.as_secs_f64(),
            r.1.as_secs_f64(),
            r.0.as_secs_f64() / r.1.as_secs_f64()
        );
        results.push((w, r));
    }
    println!();
    println!("| workload | native rows/s | native txns/s | pgduplex rows/s | pgduplex txns/s | pgduplex/native |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (w, (native, ours)) in results {
        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "| {} {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2} |",
            w.name,
            w.what,
            rate(w.rows, native),
            rate(w.transactions, native),
            rate(w.rows, ours),
            rate(w.transactions, ours),
            native.as_secs_f64() / ours.as_secs_f64()
        );
    }
}

fn sql(cluster: &Cluster, db: &str, q: &str) -> String {
    cluster.psql(db, q).trim().to_string()
}

/// Samples per system and workload: each consumes the same source WAL through its own slot;
/// the median is reported. Native and pgduplex samples alternate, so drift hits both alike.
fn samples() -> usize {
    std::env::var("PGDUPLEX_BENCH_SAMPLES").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run_workload(source: &Cluster, target: &Cluster, w: &Workload) -> (Duration, Duration) {
    let tag = w.name.to_lowercase();
    let n = samples();
    let src_db = format!("{tag}_src");
    sql(source, "postgres", &format!("CREATE DATABASE {src_db}"));
    let schema = format!("{}; CREATE TABLE marker (id int PRIMARY KEY)", w.schema);
    source.psql(&src_db, &schema);
    sql(source, &src_db, "CREATE PUBLICATION native_pub FOR TABLE w, marker");
    let dir = std::env::temp_dir().join(format!("pgduplex-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let bin = env!("CARGO_BIN_EXE_pgduplex");

    // Every consumer exists (its slot holds the WAL) before the workload runs.
    let mut natives = Vec::new();
    let mut ours = Vec::new();
    for i in 0..n {
        let native_db = format!("{tag}_native{i}");
        sql(target, "postgres", &format!("CREATE DATABASE {native_db}"));
        target.psql(&native_db, &schema);
        sql(
            target,
            &native_db,
            &format!(
                "CREATE SUBSCRIPTION native_sub{i} CONNECTION 'host=127.0.0.1 port={} dbname={src_db} user=postgres' \
                 PUBLICATION native_pub WITH (copy_data = false, enabled = false)",
                source.port
            ),
        );
        natives.push(native_db);

        let ours_db = format!("{tag}_pgduplex{i}");
        sql(target, "postgres", &format!("CREATE DATABASE {ours_db}"));
        target.psql(&ours_db, &schema);
        let config = dir.join(format!("pgduplex{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[nodes.src{i}]\nurl = \"postgresql://postgres@127.0.0.1:{}/{src_db}\"\n[nodes.dst{i}]\nurl = \"postgresql://postgres@127.0.0.1:{}/{ours_db}\"\n\
                 [replication]\ndirection = \"src{i}-to-dst{i}\"\ntables = [\"public.w\", \"public.marker\"]\n[metrics]\nlisten = \"off\"\n",
                source.port, target.port
            ),
        )
        .expect("write config");
        let status = Command::new(bin).args(["init", "--config"]).arg(&config).stdout(Stdio::null()).status().expect("pgduplex init");
        assert!(status.success(), "pgduplex init failed");
        ours.push((ours_db, config));
    }

    let started = Instant::now();
    match &w.generate {
        Generate::Sql(q) => {
            source.psql(&src_db, q);
        }
        Generate::Pgbench { script, transactions } => {
            let path = dir.join("script.sql");
            std::fs::write(&path, script).expect("write pgbench script");
            let per_client = transactions / 2;
            let out = Command::new(source.version.bin("pgbench"))
                .args(["-n", "-c", "2", "-j", "2", "-h", "127.0.0.1", "-U", "postgres"])
                .args(["-p", &source.port.to_string(), "-t", &per_client.to_string(), "-f"])
                .arg(&path)
                .arg(&src_db)
                .env("PGOPTIONS", "-c synchronous_commit=off")
                .output()
                .expect("run pgbench");
            assert!(out.status.success(), "pgbench: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    sql(source, &src_db, "INSERT INTO marker VALUES (1)");
    sql(source, &src_db, "CHECKPOINT");
    eprintln!("{}: generated in {:.1?}", w.name, started.elapsed());
    let expected = sql(source, &src_db, w.check);

    let (mut native_times, mut our_times) = (Vec::new(), Vec::new());
    for i in 0..n {
        let native_db = &natives[i];
        let t0 = Instant::now();
        sql(target, native_db, &format!("ALTER SUBSCRIPTION native_sub{i} ENABLE"));
        wait_marker(target, native_db);
        native_times.push(t0.elapsed());
        assert_eq!(sql(target, native_db, w.check), expected, "{}: native target differs", w.name);
        sql(target, native_db, &format!("DROP SUBSCRIPTION native_sub{i}"));

        let (ours_db, config) = &ours[i];
        let t0 = Instant::now();
        let mut child: Child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("PGDUPLEX_LOG", std::env::var("PGDUPLEX_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .spawn()
            .expect("pgduplex run");
        // PGDUPLEX_BENCH_PERF=<file>: profile pgduplex with `perf record` while it catches up.
        let perf = std::env::var("PGDUPLEX_BENCH_PERF").ok().map(|out| {
            Command::new("perf")
                .args(["record", "-F", "4000", "-g", "-o", &format!("{out}.{tag}{i}"), "-p", &child.id().to_string()])
                .stderr(Stdio::null())
                .spawn()
                .expect("perf record")
        });
        wait_marker(target, ours_db);
        our_times.push(t0.elapsed());
        eprintln!(
            "{} sample {i}: native {:.2?}, pgduplex {:.2?} ({:.2}s of CPU)",
            w.name,
            native_times[i],
            our_times[i],
            cpu_seconds(child.id())
        );
        for pid in perf.iter().map(|p| p.id()).chain([child.id()]) {
            unsafe {
                libc::kill(pid as i32, if pid == child.id() { libc::SIGTERM } else { libc::SIGINT });
            }
        }
        if let Some(p) = perf {
            let _ = p.wait_with_output();
        }
        let _ = child.wait();
        assert_eq!(sql(target, ours_db, w.check), expected, "{}: pgduplex target differs", w.name);
    }
    for (_, config) in &ours {
        let status = Command::new(bin).args(["teardown", "--config"]).arg(config).stdout(Stdio::null()).status().expect("teardown");
        assert!(status.success(), "pgduplex teardown failed");
    }
    sql(source, "postgres", &format!("DROP DATABASE {src_db}"));
    for db in natives.iter().chain(ours.iter().map(|(d, _)| d)) {
        sql(target, "postgres", &format!("DROP DATABASE {db}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    (median(native_times), median(our_times))
}

/// User + system CPU time of a process so far, from /proc (0 when unreadable).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Polls (every 50 ms, 30 minutes at most) until the marker row is on the target.
fn wait_marker(target: &Cluster, db: &str) {
    support::wait_until_blocking(&format!("marker row on {db}"), Duration::from_secs(1800), || {
        target.try_psql(db, "SELECT count(*) FROM marker").map(|s| s.trim() == "1").unwrap_or(false)
    });
}

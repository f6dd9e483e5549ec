//! `pgduplex demo`: two throwaway local clusters, replicated both ways while both take writes,
//! with a live summary; everything is stopped and removed at the end (Ctrl-C, or `--seconds`).
//!
//! It uses the library exactly as `init --copy-from` and `run` do: the seed node's table is
//! copied into the empty one, both directions stream in this process, and a `verify` at the end
//! shows the two nodes identical.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::setup::{self, InitOptions};
use crate::{db, pipeline};

/// Why the demo could not run; each names the command or node at fault.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("no PostgreSQL server binaries found (looked at PGDUPLEX_PG_BIN, pg_config --bindir, PATH and /usr/lib/postgresql/*/bin): install PostgreSQL, or set PGDUPLEX_PG_BIN to the directory holding initdb and pg_ctl")]
    NoServer,
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("{0}")]
    Other(String),
}

/// Where initdb and pg_ctl are.
fn server_bin_dir() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(d) = std::env::var("PGDUPLEX_PG_BIN") {
        return Some(PathBuf::from(d)).filter(|d| has(d));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&d) {
            return Some(d);
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let d = PathBuf::from(dir);
        if has(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().map(|e| e.path().join("bin")).filter(|d| has(d)).collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server tool, as the `postgres` user when we are root (PostgreSQL refuses root).
fn run_tool(bin: &Path, tool: &str, args: &[&str]) -> Result<(), DemoError> {
    let path = bin.join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    let out = cmd.args(args).output().map_err(|e| DemoError::Command { what: format!("cannot run {}", path.display()), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(DemoError::Command {
            what: format!("{tool} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Other(format!("cannot find a free port: {e}")))
}

/// The two clusters; stopped and removed on drop, whatever happened.
struct Clusters {
    bin: PathBuf,
    dir: PathBuf,
    started: Vec<PathBuf>,
}

impl Drop for Clusters {
    fn drop(&mut self) {
        for data in &self.started {
            let _ = run_tool(&self.bin, "pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Clusters {
    fn start(&mut self, name: &str, port: u16) -> Result<(), DemoError> {
        let data = self.dir.join(name);
        let data_s = data.to_string_lossy().to_string();
        run_tool(&self.bin, "initdb", &["-D", &data_s, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c fsync=off -c max_wal_senders=4 -c max_replication_slots=4",
            self.dir.display()
        );
        let log = self.dir.join(format!("{name}.log")).to_string_lossy().to_string();
        run_tool(&self.bin, "pg_ctl", &["-D", &data_s, "-l", &log, "-o", &opts, "-w", "start"])?;
        self.started.push(data);
        Ok(())
    }
}

const SCHEMA: &str = "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL, note text)";

/// Runs the demo until Ctrl-C, or for `seconds`.
pub async fn demo(seconds: Option<u64>) -> Result<(), DemoError> {
    let bin = server_bin_dir().ok_or(DemoError::NoServer)?;
    let dir = std::env::temp_dir().join(format!("pgduplex-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Other(format!("cannot create {}: {e}", dir.display())))?;
    println!("pgduplex demo: PostgreSQL from {}, clusters in {}", bin.display(), dir.display());
    if is_root() {
        let out = Command::new("chown").arg("postgres").arg(&dir).output();
        if !out.is_ok_and(|o| o.status.success()) {
            return Err(DemoError::Other(format!("running as root: cannot hand {} to the postgres user (does it exist?)", dir.display())));
        }
    }
    let mut clusters = Clusters { bin, dir, started: Vec::new() };
    let (pa, pb) = (free_port()?, free_port()?);
    clusters.start("a", pa)?;
    clusters.start("b", pb)?;
    println!("started node a on 127.0.0.1:{pa} and node b on 127.0.0.1:{pb}");

    let url = |port: u16, db: &str| format!("postgresql://postgres@127.0.0.1:{port}/{db}");
    for port in [pa, pb] {
        let (c, conn) = tokio_postgres::connect(&url(port, "postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|e| DemoError::Other(format!("cannot connect to 127.0.0.1:{port}: {e}")))?;
        tokio::spawn(conn);
        c.batch_execute("CREATE DATABASE demo").await.map_err(|e| DemoError::Other(format!("CREATE DATABASE: {e}")))?;
        let (c, conn) = tokio_postgres::connect(&url(port, "demo"), tokio_postgres::NoTls)
            .await
            .map_err(|e| DemoError::Other(format!("cannot connect to 127.0.0.1:{port}: {e}")))?;
        tokio::spawn(conn);
        c.batch_execute(SCHEMA).await.map_err(|e| DemoError::Other(format!("schema: {e}")))?;
        if port == pa {
            c.batch_execute("INSERT INTO accounts SELECT g, 'owner ' || g, 1000, '' FROM generate_series(1, 10000) g")
                .await
                .map_err(|e| DemoError::Other(format!("seed data: {e}")))?;
        }
    }
    let config = Arc::new(
        Config::parse(&format!(
            "[nodes.a]\nurl = {:?}\n[nodes.b]\nurl = {:?}\n[replication]\ndirection = \"both\"\ntables = [\"public.accounts\"]\n[metrics]\nlisten = \"off\"\n",
            url(pa, "demo"),
            url(pb, "demo")
        ))
        .map_err(|e| DemoError::Other(e.to_string()))?,
    );
    let a = config.nodes.keys().next().cloned().ok_or_else(|| DemoError::Other("no node".into()))?;
    let report = setup::init(&config, &InitOptions { dry_run: false, copy_from: Some(a), jobs: 2 }).await?;
    for line in report.lines.iter().filter(|l| l.contains("copied")) {
        println!("{line}");
    }

    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for d in config.directions.clone() {
        let (config, metrics, stop) = (config.clone(), metrics.clone(), stop_rx.clone());
        tasks.spawn(async move { pipeline::run_direction(config, d, metrics, stop).await.map_err(|e| e.to_string()) });
    }
    let (writers_stop, writers_stop_rx) = watch::channel(false);
    let mut writers = tokio::task::JoinSet::new();
    for (node, port, base) in [("a", pa, 100_000), ("b", pb, 200_000)] {
        let (stop, url) = (writers_stop_rx.clone(), url(port, "demo"));
        writers.spawn(async move { write_load(node, &url, base, stop).await });
    }

    let started = Instant::now();
    let interactive = std::io::stdout().is_terminal();
    let labels: Vec<String> = config.directions.iter().map(|d| d.label()).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = vec![0u64; labels.len()];
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    println!("writing on both nodes and replicating both ways; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {
                let mut parts = Vec::new();
                for (i, l) in labels.iter().enumerate() {
                    let applied = metrics.applied_transactions.with_label_values(&[l]).get();
                    let lag = metrics.lag_seconds.with_label_values(&[l]).get();
                    parts.push(format!("{l}: {} txn/s, lag {lag:.1} s", applied - last[i]));
                    last[i] = applied;
                }
                let conflicts = Metrics::sum_samples(&metrics.render(), crate::metrics::CONFLICTS);
                let line = format!("[{:>3} s] {} | conflicts resolved: {}", started.elapsed().as_secs(), parts.join(" | "), conflicts as u64);
                if interactive {
                    print!("\r\x1b[2K{line}");
                    let _ = std::io::stdout().flush();
                } else {
                    println!("{line}");
                }
                if seconds.is_some_and(|s| started.elapsed() >= Duration::from_secs(s)) {
                    break;
                }
            }
            Some(done) = tasks.join_next() => {
                let msg = match done { Ok(Ok(())) => "stopped".to_string(), Ok(Err(e)) => e, Err(e) => e.to_string() };
                return Err(DemoError::Other(format!("a replication direction ended: {msg}")));
            }
        }
    }
    if interactive {
        println!();
    }
    // Writers first; replication keeps running while verify compares (chunks still in flight
    // are compared again).
    let _ = writers_stop.send(true);
    while writers.join_next().await.is_some() {}
    println!("writes stopped; comparing the nodes while the last changes arrive");
    let opts = setup::verify::VerifyOptions { attempts: 10, ..Default::default() };
    let reports = setup::verify::verify(&config, &opts, |line| println!("  {line}")).await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let reports = reports?;
    let _ = setup::teardown(&config).await;
    drop(clusters);
    if reports.iter().all(|r| r.identical()) {
        println!("both nodes identical; clusters stopped and removed");
        Ok(())
    } else {
        Err(DemoError::Other("the nodes still differ (see above); clusters stopped and removed".into()))
    }
}

/// Transactions on one node until `stop`: balance transfers between accounts both nodes share
/// (so conflicts happen), renames, and new accounts in this node's own key range.
async fn write_load(node: &str, url: &str, base: i64, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut i: i64 = 0;
    let mut seed: u64 = if node == "a" { 0x9E37_79B9_7F4A_7C15 } else { 0xD1B5_4A32_D192_ED03 };
    let mut next = move |n: i64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as i64 + 1
    };
    while !*stop.borrow() {
        i += 1;
        let (from, to, amount) = (next(10_000), next(10_000), next(50));
        let sql = match i % 10 {
            0 => format!("INSERT INTO accounts VALUES ({}, 'new on {node}', 0, '')", base + i),
            1 => format!("UPDATE accounts SET note = 'touched on {node} #{i}' WHERE id = {from}"),
            _ => format!(
                "BEGIN; UPDATE accounts SET balance = balance - {amount} WHERE id = {from}; \
                 UPDATE accounts SET balance = balance + {amount} WHERE id = {to}; COMMIT"
            ),
        };
        if c.batch_execute(&sql).await.is_err() {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(())
}

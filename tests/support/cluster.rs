//! One PostgreSQL cluster (data dir + postmaster) started for the tests.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::cleanup::run_dir;
use super::process::{
    chown_to_server_user, client_command, is_postmaster_of, postmaster_alive, read_postmaster_pid,
    run, server_command, stop_postmasters,
};
use super::template::copy_template;
use super::{Auth, ClusterOptions, PgVersion, unique_db_name};

/// A running (or deliberately stopped) PostgreSQL cluster on 127.0.0.1:`port`.
///
/// The superuser `postgres` connects over loopback without a password whatever the
/// [`Auth`] method, so setup code never handles secrets. Dropping a dedicated cluster stops its
/// postmaster by PID and deletes its directory (set `PGDUPLEX_KEEP_CLUSTERS=1` to keep the
/// directory for a post-mortem; the server is stopped regardless).
pub struct Cluster {
    pub version: PgVersion,
    pub port: u16,
    pub data_dir: PathBuf,
    /// The postmaster's PID, from `postmaster.pid`; the last one after [`Cluster::stop_immediate`].
    pub pid: u32,
    pub auth: Auth,
    /// `<run dir>/<name>`: holds `data/` and `sock/`; deleted on drop.
    root_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    running: bool,
}

/// How many times to pick a new port when the one we chose was taken before the server bound it.
const PORT_ATTEMPTS: usize = 8;
/// `pg_ctl -w -t`: generous, because a crash-restart replays WAL on a busy 2-core machine.
const START_TIMEOUT_SECS: u32 = 120;

/// Starts a dedicated cluster owned by the caller (stopped and deleted on drop). fsync stays on
/// unless `opts` turns it off, so [`Cluster::stop_immediate`] + [`Cluster::start`] exercises real
/// crash recovery.
pub fn start_cluster(version: PgVersion, opts: ClusterOptions) -> Cluster {
    Cluster::create(version, &opts)
}

/// The trust-auth, fsync-off cluster of `version` shared by all tests of this test binary,
/// started on first use and stopped when the process exits. Tests isolate themselves with
/// [`Cluster::fresh_db`] and [`super::unique_name`]; a test that restarts, crashes or
/// reconfigures a server needs [`start_cluster`] instead.
pub fn shared_cluster(version: PgVersion) -> &'static Cluster {
    static SHARED: [OnceLock<Cluster>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = match version {
        PgVersion::V15 => &SHARED[0],
        PgVersion::V18 => &SHARED[1],
    };
    slot.get_or_init(|| Cluster::create(version, &ClusterOptions::default().without_fsync()))
}

impl Cluster {
    fn create(version: PgVersion, opts: &ClusterOptions) -> Cluster {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "v{}-{}",
            version.major(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root_dir = run_dir().join(&name);
        let data_dir = root_dir.join("data");
        let socket_dir = root_dir.join("sock");
        let log_file = data_dir.join("server.log");
        let mut cluster = Cluster {
            version,
            port: 0,
            data_dir,
            pid: 0,
            auth: opts.auth,
            root_dir,
            socket_dir,
            log_file,
            running: false,
        };
        // From here on, a panic drops `cluster`, which removes whatever was made.
        for dir in [&cluster.root_dir, &cluster.socket_dir] {
            std::fs::create_dir(dir)
                .and_then(|()| chown_to_server_user(dir))
                .unwrap_or_else(|e| cluster.fail(format_args!("creating {}: {e}", dir.display())));
        }
        copy_template(version, &cluster.data_dir)
            .unwrap_or_else(|e| cluster.fail(format_args!("copying the initdb template: {e}")));
        let base_conf = std::fs::read_to_string(cluster.data_dir.join("postgresql.conf"))
            .unwrap_or_else(|e| cluster.fail(format_args!("reading postgresql.conf: {e}")));
        cluster.write_hba();

        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            release_port(cluster.port);
            cluster.port = reserve_free_port();
            cluster.write_conf(&base_conf, opts);
            // A fresh log per attempt, so port_was_taken reads only this attempt's lines.
            let _ = std::fs::remove_file(&cluster.log_file);
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(e) if cluster.port_was_taken() => last_error = e,
                Err(e) => cluster.fail(format_args!("starting the server: {e}")),
            }
        }
        cluster.fail(format_args!(
            "starting the server: the port was taken {PORT_ATTEMPTS} times in a row; last: {last_error}"
        ))
    }

    /// Writes pg_hba.conf: local trust; on 127.0.0.1 the superuser `postgres` trusted, everyone
    /// else by the chosen method, for normal and replication connections alike.
    fn write_hba(&self) {
        let method = self.auth.hba_method();
        let hba = format!(
            "# written by the pgduplex test harness (tests/support)\n\
             local all         all                   trust\n\
             host  all         postgres 127.0.0.1/32 trust\n\
             host  replication postgres 127.0.0.1/32 trust\n\
             host  all         all      127.0.0.1/32 {method}\n\
             host  replication all      127.0.0.1/32 {method}\n"
        );
        std::fs::write(self.data_dir.join("pg_hba.conf"), hba)
            .unwrap_or_else(|e| self.fail(format_args!("writing pg_hba.conf: {e}")));
    }

    /// Writes postgresql.conf: initdb's file plus our settings (later lines win), then the
    /// test's `extra_conf`. Everything lives in the file, not on pg_ctl's command line, so a
    /// restart comes back with the same port and settings.
    fn write_conf(&self, base_conf: &str, opts: &ClusterOptions) {
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("port", self.port.to_string()),
            (
                "unix_socket_directories",
                self.socket_dir.display().to_string(),
            ),
            ("wal_level", "logical".into()),
            ("max_replication_slots", "40".into()),
            ("max_wal_senders", "40".into()),
            ("max_logical_replication_workers", "8".into()),
            ("max_worker_processes", "16".into()),
            // Several pipelines and helper sessions per test, two tests at a time.
            ("max_connections", "200".into()),
            ("shared_buffers", "128MB".into()),
            ("fsync", "on".into()),
            (
                "password_encryption",
                self.auth.password_encryption().into(),
            ),
            ("logging_collector", "off".into()),
            ("log_min_messages", "warning".into()),
            ("lc_messages", "C".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if self.version == PgVersion::V18 {
            // 18 split origins from slots (default 10); apply sessions each hold one.
            settings.push(("max_active_replication_origins".into(), "40".into()));
            if self.auth == Auth::Md5 {
                settings.push(("md5_password_warnings".into(), "off".into()));
            }
        }
        settings.extend(opts.extra_conf.iter().cloned());

        let mut conf = base_conf.to_string();
        conf.push_str("\n# ---- pgduplex test harness (tests/support) ----\n");
        for (name, value) in &settings {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                self.fail(format_args!(
                    "invalid setting name {name:?} in ClusterOptions::extra_conf"
                ));
            }
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        std::fs::write(self.data_dir.join("postgresql.conf"), conf)
            .unwrap_or_else(|e| self.fail(format_args!("writing postgresql.conf: {e}")));
    }

    /// `pg_ctl start -w`, then the PID from postmaster.pid. `Err` has pg_ctl's output.
    fn pg_ctl_start(&mut self) -> Result<(), String> {
        run(server_command(&self.version.bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", &START_TIMEOUT_SECS.to_string(), "start"]))?;
        let pid = read_postmaster_pid(&self.data_dir)
            .ok_or_else(|| "pg_ctl reported success but postmaster.pid has no PID".to_string())?;
        self.pid = pid;
        self.running = true;
        Ok(())
    }

    fn port_was_taken(&self) -> bool {
        let log = self.log_tail(20);
        log.contains("Address already in use")
            || log.contains("could not create any TCP/IP sockets")
    }

    /// A URL for the superuser `postgres` (trusted on loopback): `postgresql://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(db)
        )
    }

    /// A URL for another user, authenticating with the cluster's [`Auth`] method.
    pub fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// Connects as the superuser, with the connection task spawned on the current runtime.
    /// Panics naming the cluster, with the server log's tail, when that fails.
    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        self.connect_url(&self.url(db)).await.unwrap_or_else(|e| {
            self.fail(format_args!(
                "connecting to database {db:?} as postgres: {e}"
            ))
        })
    }

    /// Connects with any URL (e.g. [`Cluster::url_for`]); for tests that expect a failure.
    pub async fn connect_url(
        &self,
        url: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config: tokio_postgres::Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        // Errors surface through the client's next call ("connection closed"); a test that
        // crashes the server on purpose should not get log noise from here.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Creates a database with a unique name starting with `prefix` and returns the name.
    pub async fn fresh_db(&self, prefix: &str) -> String {
        let name = unique_db_name(prefix);
        self.connect("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| self.fail(format_args!("CREATE DATABASE {name}: {e}")));
        name
    }

    /// Runs `sql` (any number of statements, as a script) with this version's
    /// `psql -X -A -t -q -v ON_ERROR_STOP=1` as the superuser; returns stdout without its final
    /// newline (rows one per line, columns `|`-separated). Panics with psql's stderr on error.
    /// Blocks the thread: don't run it while this thread's runtime must serve a lock it waits on.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|e| {
            self.fail(format_args!(
                "psql on database {db:?} failed:\n{e}\n--- sql ---\n{sql}"
            ))
        })
    }

    /// [`Cluster::psql`] that returns psql's stderr instead of panicking.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut child = client_command(&self.version.bin("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("could not start psql: {e}"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let script = sql.to_string();
        // A writer thread, so a big script and a big result cannot deadlock on full pipes.
        let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for psql: {e}"))?;
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_string())
        } else {
            Err(format!(
                "psql {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            ))
        }
    }

    /// Stops the server like a crash: SIGQUIT to the postmaster (immediate shutdown, no
    /// checkpoint), waiting until it is gone. [`Cluster::start`] then runs crash recovery.
    pub fn stop_immediate(&mut self) {
        if !self.running {
            self.fail("stop_immediate: the server is not running");
        }
        let survivors = stop_postmasters(&[self.pid], Duration::from_secs(30));
        self.running = false;
        if !survivors.is_empty() {
            self.fail(format_args!(
                "stop_immediate: postmaster {} survived SIGQUIT and SIGKILL",
                self.pid
            ));
        }
    }

    /// Starts the server again on the same data dir and port (after [`Cluster::stop_immediate`]).
    pub fn start(&mut self) {
        if self.running {
            self.fail("start: the server is already running");
        }
        self.pg_ctl_start().unwrap_or_else(|e| {
            self.fail(format_args!(
                "restarting the server on port {}: {e}",
                self.port
            ))
        });
    }

    /// Whether the postmaster is up (it may have died on its own; this checks the process).
    pub fn is_running(&self) -> bool {
        self.running && postmaster_alive(self.pid)
    }

    /// The directory of the server's unix socket (`host=` for a local connection).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's log (`pg_ctl -l`), inside the data dir.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The last `lines` lines of the server log ("" if there is none yet).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Panics with `what`, the cluster's identity, and the tail of its server log: every harness
    /// failure says which server it was about and what the server said.
    #[track_caller]
    pub fn fail(&self, what: impl fmt::Display) -> ! {
        panic!(
            "{what}\n  cluster: {self}\n  --- last lines of {} ---\n{}",
            self.log_file.display(),
            indent(&self.log_tail(30))
        )
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cluster on 127.0.0.1:{} (data dir {}",
            self.version,
            self.port,
            self.data_dir.display()
        )?;
        if self.pid != 0 {
            write!(
                f,
                ", postmaster pid {}{}",
                self.pid,
                if self.running { "" } else { ", stopped" }
            )?;
        }
        write!(f, ")")
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        // postmaster.pid too, not only `running`: a start that failed half-way (pg_ctl timed
        // out) can leave a postmaster we never recorded.
        let candidates = [Some(self.pid), read_postmaster_pid(&self.data_dir)];
        let mut pids: Vec<u32> = candidates
            .into_iter()
            .flatten()
            .filter(|&pid| pid != 0 && is_postmaster_of(pid, &self.data_dir))
            .collect();
        pids.dedup();
        let survivors = stop_postmasters(&pids, Duration::from_secs(30));
        if !survivors.is_empty() {
            problems.push(format!(
                "postmasters {survivors:?} survived SIGQUIT and SIGKILL"
            ));
        }
        self.running = false;
        if survivors.is_empty() {
            release_port(self.port);
        }
        if std::env::var_os("PGDUPLEX_KEEP_CLUSTERS").is_some_and(|v| !v.is_empty()) {
            eprintln!(
                "PGDUPLEX_KEEP_CLUSTERS: keeping {}",
                self.root_dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.root_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("removing {}: {e}", self.root_dir.display()));
        }
        if !problems.is_empty() {
            let message = format!("dropping {self}: {}", problems.join("; "));
            // A second panic while unwinding would abort the whole test binary.
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// Ports of this process's clusters, running or stopped for a restart: the kernel would happily
/// hand a stopped cluster's port to the next new cluster, and the restart would then fail.
static PORTS_IN_USE: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port that was free a moment ago and belongs to none of our clusters, reserved in
/// [`PORTS_IN_USE`] (the caller releases it). The listener is closed before the server binds, so
/// another process can take it in between; `Cluster::create` then retries with a new one.
fn reserve_free_port() -> u16 {
    let mut in_use = PORTS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"));
        if in_use.insert(port) {
            return port;
        }
    }
}

fn release_port(port: u16) {
    if port != 0 {
        PORTS_IN_USE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port);
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL user/password/db parts.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn indent(text: &str) -> String {
    if text.is_empty() {
        return "  (empty)".to_string();
    }
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

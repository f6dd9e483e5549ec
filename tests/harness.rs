//! Self-test of the real-server harness in tests/support: if these fail, every other real-server
//! test's verdict is meaningless, so they check the harness's promises one by one against both
//! server versions.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    Auth, ClusterOptions, PgVersion, process_exists, shared_cluster, start_cluster, unique_name,
    wait_until, wait_until_blocking,
};

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {setting}: {e}"))
        .get(0)
}

#[tokio::test]
async fn shared_clusters_are_the_requested_version_with_logical_wal() {
    for version in PgVersion::all() {
        let cluster = shared_cluster(version);
        assert!(
            std::ptr::eq(cluster, shared_cluster(version)),
            "{version}: one shared cluster per process"
        );
        assert_eq!(cluster.version, version);
        let client = cluster.connect("postgres").await;
        let num: u32 = show(&client, "server_version_num")
            .await
            .parse()
            .expect("numeric version");
        assert_eq!(
            num / 10000,
            version.major(),
            "{cluster}: server_version_num {num}"
        );
        assert_eq!(show(&client, "wal_level").await, "logical", "{cluster}");
        assert_eq!(
            show(&client, "max_replication_slots").await,
            "40",
            "{cluster}"
        );
        assert_eq!(show(&client, "max_wal_senders").await, "40", "{cluster}");
        assert_eq!(
            show(&client, "fsync").await,
            "off",
            "{cluster}: shared clusters trade durability for speed"
        );
        assert_eq!(
            show(&client, "listen_addresses").await,
            "127.0.0.1",
            "{cluster}"
        );
        if version == PgVersion::V18 {
            assert_eq!(
                show(&client, "max_active_replication_origins").await,
                "40",
                "{cluster}"
            );
        }

        let a = cluster.fresh_db("Harness-Test").await;
        let b = cluster.fresh_db("Harness-Test").await;
        assert_ne!(a, b, "fresh_db names must be unique");
        assert!(a.starts_with("harness_test_"), "sanitized prefix kept: {a}");
        let db_client = cluster.connect(&a).await;
        let current: String = db_client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(current, a);

        let out = cluster.psql(&a, "CREATE TABLE t (id int PRIMARY KEY, v text);\nINSERT INTO t VALUES (1, 'a'), (2, 'b');\nSELECT id, v FROM t ORDER BY id;");
        assert_eq!(out, "1|a\n2|b", "{cluster}: psql output");
        let err = cluster
            .try_psql(&a, "SELECT 1; SELECT * FROM no_such_table; SELECT 2;")
            .unwrap_err();
        assert!(
            err.contains("no_such_table"),
            "psql error names the problem: {err}"
        );

        // The superuser gets replication connections too (the protocol tests need them).
        let ident = cluster.psql(
            &format!("dbname={a} replication=database"),
            "IDENTIFY_SYSTEM",
        );
        assert_eq!(
            ident.split('|').nth(3),
            Some(a.as_str()),
            "{cluster}: IDENTIFY_SYSTEM -> {ident}"
        );
    }
}

/// A password-checking cluster must really check: the wrong password is refused and the right
/// one accepted, on normal and replication connections, with the password stored in the
/// method's own format.
async fn check_password_auth(version: PgVersion, auth: Auth, stored_prefix: &str) {
    let cluster = start_cluster(version, ClusterOptions::default().with_auth(auth));
    let role = unique_name("app");
    let password = "right horse battery:staple@/";
    let admin = cluster.connect("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'"
        ))
        .await
        .unwrap_or_else(|e| cluster.fail(format_args!("creating role {role}: {e}")));
    let stored: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        stored.starts_with(stored_prefix),
        "{cluster}: {auth:?} stores {stored_prefix}..., got {stored}"
    );

    let wrong = cluster
        .connect_url(&cluster.url_for(&role, "wrong", "postgres"))
        .await;
    let err = wrong
        .err()
        .unwrap_or_else(|| cluster.fail(format_args!("{auth:?}: a wrong password was accepted")));
    assert!(
        format!("{err:?}").contains("password authentication failed"),
        "{cluster}: wrong password should fail authentication, got {err:?}"
    );
    let client = cluster
        .connect_url(&cluster.url_for(&role, password, "postgres"))
        .await
        .unwrap_or_else(|e| {
            cluster.fail(format_args!(
                "{auth:?}: the right password was refused: {e}"
            ))
        });
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role);

    let replication = |pw: &str| {
        format!(
            "dbname=postgres replication=database user={role} password='{}'",
            pw.replace('\'', "\\'")
        )
    };
    cluster
        .try_psql(&replication("wrong"), "IDENTIFY_SYSTEM")
        .expect_err("a replication connection with a wrong password must be refused");
    cluster.psql(&replication(password), "IDENTIFY_SYSTEM");
}

#[tokio::test]
async fn scram_clusters_check_passwords() {
    for version in PgVersion::all() {
        check_password_auth(version, Auth::Scram, "SCRAM-SHA-256$").await;
    }
}

#[tokio::test]
async fn md5_clusters_check_passwords() {
    for version in PgVersion::all() {
        check_password_auth(version, Auth::Md5, "md5").await;
    }
}

#[tokio::test]
async fn dedicated_cluster_recovers_after_stop_immediate() {
    for version in PgVersion::all() {
        let mut cluster = start_cluster(
            version,
            ClusterOptions::default().with_conf("wal_sender_timeout", "5s"),
        );
        let client = cluster.connect("postgres").await;
        assert_eq!(
            show(&client, "fsync").await,
            "on",
            "{cluster}: dedicated clusters keep fsync on"
        );
        assert_eq!(
            show(&client, "wal_sender_timeout").await,
            "5s",
            "{cluster}: extra_conf applied"
        );
        client
            .batch_execute("CREATE TABLE crash (id int PRIMARY KEY); INSERT INTO crash SELECT generate_series(1, 1000);")
            .await
            .unwrap();
        let (port, old_pid) = (cluster.port, cluster.pid);

        cluster.stop_immediate();
        assert!(
            !process_exists(old_pid),
            "{cluster}: postmaster still exists after stop_immediate"
        );
        assert!(!cluster.is_running());
        assert!(
            cluster.connect_url(&cluster.url("postgres")).await.is_err(),
            "{cluster}: connected to a stopped server"
        );

        cluster.start();
        assert_eq!(cluster.port, port, "restart keeps the port");
        assert_ne!(cluster.pid, old_pid, "a new postmaster");
        assert!(cluster.is_running());
        let client = cluster.connect("postgres").await;
        let count: i64 = client
            .query_one("SELECT count(*) FROM crash", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            count, 1000,
            "{cluster}: committed rows survive an immediate stop"
        );
    }
}

#[test]
fn dropping_a_cluster_stops_the_server_and_removes_its_files() {
    for version in PgVersion::all() {
        for stop_first in [false, true] {
            let mut cluster = start_cluster(version, ClusterOptions::default().without_fsync());
            let (pid, data_dir) = (cluster.pid, cluster.data_dir.clone());
            assert!(data_dir.join("PG_VERSION").is_file());
            if stop_first {
                cluster.stop_immediate();
            }
            drop(cluster);
            // SAFETY: signal 0 only checks whether the PID exists.
            let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert!(
                rc == -1 && errno == Some(libc::ESRCH),
                "{version}: postmaster {pid} still exists after drop (rc {rc}, errno {errno:?})"
            );
            assert!(
                !data_dir.exists(),
                "{version}: {} still exists after drop",
                data_dir.display()
            );
        }
    }
}

#[test]
fn unique_names_are_short_distinct_identifiers() {
    let names: Vec<String> = (0..500)
        .map(|i| {
            unique_name(if i % 2 == 0 {
                "Node-A with a very long prefix"
            } else {
                "9x"
            })
        })
        .collect();
    for name in &names {
        assert!(name.len() <= 20, "{name} is longer than 20");
        assert!(
            name.starts_with(|c: char| c.is_ascii_lowercase()),
            "{name} must start with a letter"
        );
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name} is not a plain identifier"
        );
    }
    let distinct: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "unique_name repeated a name");
    assert!(
        names[0].starts_with("node_a_with"),
        "prefix kept where it fits: {}",
        names[0]
    );
}

#[tokio::test]
async fn wait_until_returns_once_the_condition_holds() {
    let mut polls = 0;
    wait_until("the third poll", Duration::from_secs(5), || {
        polls += 1;
        let done = polls >= 3;
        async move { done }
    })
    .await;
    assert_eq!(polls, 3);
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for something that never happens")]
async fn wait_until_panics_at_its_deadline() {
    wait_until(
        "something that never happens",
        Duration::from_millis(200),
        || async { false },
    )
    .await;
}

#[test]
fn reports_initdb_and_template_copy_times() {
    for version in PgVersion::all() {
        let (initdb, copy) = support::initdb_timings(version);
        let start = std::time::Instant::now();
        let cluster = start_cluster(version, ClusterOptions::default().without_fsync());
        let started = start.elapsed();
        eprintln!(
            "{version}: fresh initdb {initdb:?}, template copy {copy:?}, start_cluster (copy + start) {started:?}"
        );
        drop(cluster);
    }
}

// ---- cleanup when the test process ends ------------------------------------------------------
//
// The parent tests run this binary again as a child (the ignored test below), which starts a
// cluster, writes "<postmaster pid>\n<data dir>" to a file and then either exits normally (the
// atexit handler must stop shared clusters) or waits to be SIGKILLed (the watchdog must).

const CHILD_MODE: &str = "PGDUPLEX_HARNESS_CHILD_MODE";
const CHILD_INFO: &str = "PGDUPLEX_HARNESS_CHILD_INFO";

#[test]
#[ignore = "run by the cleanup tests as a child process"]
fn cleanup_child() {
    let (Ok(mode), Ok(info)) = (std::env::var(CHILD_MODE), std::env::var(CHILD_INFO)) else {
        return; // run by hand with --ignored: nothing to do
    };
    let write_info = |pid: u32, data_dir: &std::path::Path| {
        let tmp = format!("{info}.tmp");
        std::fs::write(&tmp, format!("{pid}\n{}\n", data_dir.display())).unwrap();
        std::fs::rename(&tmp, &info).unwrap();
    };
    match mode.as_str() {
        "shared-exit" => {
            let cluster = shared_cluster(PgVersion::V15);
            write_info(cluster.pid, &cluster.data_dir);
        }
        "dedicated-kill" => {
            let cluster = start_cluster(PgVersion::V18, ClusterOptions::default().without_fsync());
            write_info(cluster.pid, &cluster.data_dir);
            // Wait to be killed; bounded, so a parent that died first doesn't leave us forever.
            std::thread::sleep(Duration::from_secs(120));
            panic!("cleanup_child was not killed within 120s");
        }
        other => panic!("unknown {CHILD_MODE} {other}"),
    }
}

/// Starts `cleanup_child` in `mode`; returns the child and, once it has written them, its
/// postmaster's PID and data dir.
fn spawn_cleanup_child(mode: &str) -> (std::process::Child, u32, PathBuf) {
    let info = std::env::temp_dir().join(format!(
        "pgduplex-harness-{}-{}",
        std::process::id(),
        unique_name(mode)
    ));
    // The child's output goes to a file, shown only if it fails: its own "test result" lines
    // must not mix into this run's output.
    let log_path = info.with_extension("log");
    let log = std::fs::File::create(&log_path).expect("creating the child's log file");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "cleanup_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MODE, mode)
        .env(CHILD_INFO, &info)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning the test binary as a child");
    let mut exited = None;
    wait_until_blocking(
        &format!("the {mode} child to start its cluster"),
        Duration::from_secs(120),
        || {
            if exited.is_none() {
                exited = child.try_wait().unwrap();
            }
            info.exists() || exited.is_some_and(|s: std::process::ExitStatus| !s.success())
        },
    );
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let text = std::fs::read_to_string(&info).unwrap_or_else(|_| {
        panic!("{mode} child exited ({exited:?}) without starting a cluster; its output:\n{output}")
    });
    let _ = std::fs::remove_file(&info);
    let mut lines = text.lines();
    let pid = lines.next().unwrap().parse().unwrap();
    let data_dir = PathBuf::from(lines.next().unwrap());
    (child, pid, data_dir)
}

#[test]
fn shared_clusters_stop_when_the_test_process_exits() {
    let (mut child, pid, data_dir) = spawn_cleanup_child("shared-exit");
    let status = child.wait().unwrap();
    assert!(status.success(), "child test failed: {status}");
    // No waiting: the atexit handler ran before the child's exit completed.
    assert!(
        !process_exists(pid),
        "shared postmaster {pid} outlived its test process"
    );
    assert!(
        !data_dir.exists(),
        "{} outlived its test process",
        data_dir.display()
    );
}

#[test]
fn watchdog_stops_clusters_of_a_killed_test_process() {
    let (mut child, pid, data_dir) = spawn_cleanup_child("dedicated-kill");
    assert!(
        process_exists(pid),
        "child's postmaster {pid} should be running"
    );
    child.kill().unwrap(); // SIGKILL: no Drop, no atexit
    child.wait().unwrap();
    wait_until_blocking(
        "the watchdog to stop the killed child's postmaster",
        Duration::from_secs(30),
        || !process_exists(pid),
    );
    wait_until_blocking(
        "the watchdog to remove the killed child's run dir",
        Duration::from_secs(30),
        || !data_dir.exists(),
    );
}

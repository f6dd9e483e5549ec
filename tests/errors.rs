//! Bad input gets one clear line naming what is at fault and a non-zero exit, never a panic.

mod replicator;
mod support;

use std::process::{Command, Output};

use replicator::{Node, Setup};
use support::{Auth, ClusterOptions, PgVersion, shared_cluster, start_cluster};

fn pgduplex(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgduplex")).args(args).output().expect("run pgduplex")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit code and that stderr holds every needle and no panic or backtrace.
fn assert_clear_error(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic:\n{err}");
}

fn write_config(text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("pgduplex-test-{}", support::unique_name("bad")));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgduplex.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn missing_and_invalid_config() {
    let out = pgduplex(&["init", "--config", "/nonexistent/pgduplex.toml"]);
    assert_clear_error(&out, 2, &["cannot read config file /nonexistent/pgduplex.toml"]);

    let (dir, path) = write_config(
        "[nodes.a]\nurl = \"postgresql://u@127.0.0.1:1/db\"\n[nodes.b]\nurl = \"postgresql://u@127.0.0.1:2/db\"\n\
         [replication]\ndirection = \"a-to-c\"\n",
    );
    let out = pgduplex(&["run", "--config", path.to_str().unwrap()]);
    assert_clear_error(&out, 2, &["replication.direction", "\"a-to-c\""]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreachable_host() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (dir, path) = write_config(&format!(
        "[nodes.a]\nurl = \"postgresql://u@127.0.0.1:{port}/db\"\n[nodes.b]\nurl = \"postgresql://u@127.0.0.1:{port}/db\"\n\
         [replication]\ndirection = \"a-to-b\"\n"
    ));
    let out = pgduplex(&["init", "--config", path.to_str().unwrap()]);
    assert_clear_error(&out, 1, &["node a: cannot connect"]);
    assert_eq!(stderr(&out).lines().count(), 1, "one line:\n{}", stderr(&out));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password() {
    let cluster = start_cluster(PgVersion::V15, ClusterOptions::default().with_auth(Auth::Scram));
    cluster.psql("postgres", "CREATE ROLE app LOGIN SUPERUSER REPLICATION PASSWORD 'right'");
    let good = Node { name: "a".into(), url: cluster.url_for("app", "right", "postgres"), db: "postgres".into(), port: cluster.port };
    let bad = Node { name: "b".into(), url: cluster.url_for("app", "wrong", "postgres"), db: "postgres".into(), port: cluster.port };
    let setup = Setup::new(&good, &bad, &["public.*"], "");
    let out = setup.command(&["init"]);
    assert_clear_error(&out, 1, &["node b", "password authentication failed"]);
    assert!(!stderr(&out).contains("wrong"), "password leaked: {}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical() {
    let cluster = start_cluster(PgVersion::V18, ClusterOptions::default().with_conf("wal_level", "replica"));
    let source = Node::fresh(&cluster, "wsrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V15), "wdst").await;
    for n in [&source, &target] {
        n.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    }
    let setup = Setup::new(&source, &target, &["public.*"], "");
    let out = setup.command(&["init"]);
    assert_clear_error(&out, 1, &[&format!("node {}: wal_level is replica", source.name), "wal_level = logical"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_problems_are_all_reported_and_nothing_is_created() {
    let source = Node::fresh(shared_cluster(PgVersion::V15), "psrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V18), "pdst").await;
    let s = source.client().await;
    s.batch_execute(
        "CREATE TABLE nopk (a int, b text); CREATE TABLE only_source (id int PRIMARY KEY); \
         CREATE TABLE fewer (id int PRIMARY KEY, extra text); CREATE TABLE ok (id int PRIMARY KEY)",
    )
    .await
    .unwrap();
    target
        .client()
        .await
        .batch_execute("CREATE TABLE nopk (a int, b text); CREATE TABLE fewer (id int PRIMARY KEY); CREATE TABLE ok (id int PRIMARY KEY)")
        .await
        .unwrap();
    let setup = Setup::new(&source, &target, &["public.*"], "");
    let out = setup.command(&["init"]);
    assert_clear_error(
        &out,
        1,
        &[
            "3 problem(s)",
            "table public.nopk has no primary key and no REPLICA IDENTITY FULL",
            "ALTER TABLE public.nopk REPLICA IDENTITY FULL",
            &format!("node {}: table public.only_source is missing", target.name),
            "table public.fewer lacks column extra (text)",
        ],
    );
    let slots: i64 = s
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1", &[&format!("pgduplex_{}%", source.name)])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "init created a slot despite problems");

    // `run` before a successful init names the missing slot.
    let out = setup.command(&["run"]);
    assert_clear_error(&out, 1, &["run `pgduplex init`"]);
}

/// Slots and origins are per cluster: a second setup reusing the node names of a first one on
/// the same clusters (another database) is refused, not allowed to share the first one's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_names_reused_across_databases_are_refused() {
    let (sc, tc) = (shared_cluster(PgVersion::V15), shared_cluster(PgVersion::V18));
    let name_src = support::unique_name("rsrc");
    let name_dst = support::unique_name("rdst");
    let mut setups = Vec::new();
    for _ in 0..2 {
        let mut source = Node::fresh(sc, "x").await;
        let mut target = Node::fresh(tc, "y").await;
        source.name = name_src.clone();
        target.name = name_dst.clone();
        for n in [&source, &target] {
            n.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
        }
        setups.push(Setup::new(&source, &target, &["public.*"], ""));
    }
    setups[0].init();
    let out = setups[1].command(&["init"]);
    assert_clear_error(
        &out,
        1,
        &[&format!("replication slot pgduplex_{name_src}_to_{name_dst} already exists for database"), "give the nodes names"],
    );
    setups[0].teardown();
}

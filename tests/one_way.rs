//! One-way replication against real servers: every version pair (15/18), every type class,
//! TOAST, keys, REPLICA IDENTITY FULL, TRUNCATE; idle slot advance; metrics; teardown.

mod replicator;
mod support;

use std::time::{Duration, Instant};

use replicator::{Node, Setup};
use support::{PgVersion, shared_cluster, wait_until};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE alltypes (
    id bigint PRIMARY KEY,
    i2 int2, i4 int4, i8 int8, num numeric(20, 5), txt text, vc varchar(50), bin bytea, flag bool,
    j json, jb jsonb, u uuid, ts timestamp, tstz timestamptz, d date, iv interval,
    arr int[], tarr text[], m mood, p posint, f8 float8, big text
);
CREATE TABLE composite (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE full_ident (a int, b text, j json);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE TABLE truncated (id int PRIMARY KEY, v text);
CREATE TABLE gen (id int PRIMARY KEY, x int, doubled int GENERATED ALWAYS AS (x * 2) STORED,
                  ident int GENERATED ALWAYS AS IDENTITY);
"#;

const TABLES: &[&str] = &["alltypes", "composite", "full_ident", "truncated", "gen"];

const WORKLOAD: &str = r#"
INSERT INTO alltypes VALUES
  (1, 1, 2, 3, 12345.67891, 'plain', 'vc', '\x00ff10', true, '{"a": [1, 2]}', '{"b": {"c": null}}',
   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789+05:30',
   '0001-01-01', '1 year 2 mons 3 days 04:05:06.7', '{1,NULL,3}', '{"a b","c,d","e\"f",NULL}', 'happy', 7, 1.5e300, 'short'),
  (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (3, -32768, -2147483648, -9223372036854775808, -0.00001, E'tab\there\nnewline \\ back''quote', 'ünïcødé ✓', '\x', false,
   '[]', '[]', '00000000-0000-0000-0000-000000000000', 'infinity', '-infinity', '2000-01-01', '-1 day', '{}', '{}', 'sad', 1, 'NaN', '');
INSERT INTO alltypes (id, txt, big) SELECT 10, 'toasted', string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 1000) g;
UPDATE alltypes SET txt = 'toast kept' WHERE id = 10;          -- big is sent as unchanged-TOAST
UPDATE alltypes SET id = 11 WHERE id = 10;                     -- key change: old key sent
UPDATE alltypes SET i4 = i4 + 1, m = 'ok', f8 = 0.1 WHERE id = 1;
BEGIN;
INSERT INTO alltypes (id, txt) SELECT g, 'bulk ' || g FROM generate_series(100, 1099) g;
UPDATE alltypes SET vc = 'in txn' WHERE id BETWEEN 100 AND 199;
DELETE FROM alltypes WHERE id BETWEEN 200 AND 299;
COMMIT;
BEGIN;
INSERT INTO alltypes (id, txt) VALUES (5000, 'rolled back');
ROLLBACK;
DELETE FROM alltypes WHERE id = 2;
INSERT INTO composite VALUES (1, 'x', 'one'), (1, 'y', 'two'), (2, 'x', 'three');
UPDATE composite SET v = 'changed' WHERE a = 1 AND b = 'y';
UPDATE composite SET b = 'z' WHERE a = 2;
DELETE FROM composite WHERE a = 1 AND b = 'x';
INSERT INTO full_ident VALUES (1, 'dup', '{"k": 1}'), (1, 'dup', '{"k": 1}'), (2, NULL, NULL), (3, 'c', '[1]');
DELETE FROM full_ident WHERE a = 1 AND ctid = (SELECT min(ctid) FROM full_ident WHERE a = 1);
UPDATE full_ident SET b = 'was null' WHERE a = 2;
UPDATE full_ident SET j = '{"k": 2}' WHERE a = 3;
INSERT INTO truncated SELECT g, 'x' FROM generate_series(1, 100) g;
TRUNCATE truncated;
INSERT INTO truncated VALUES (1, 'after truncate');
INSERT INTO gen (id, x) VALUES (1, 10), (2, 20);
UPDATE gen SET x = 11 WHERE id = 1;
"#;

async fn one_way(source_version: PgVersion, target_version: PgVersion) {
    let source = Node::fresh(shared_cluster(source_version), "src").await;
    let target = Node::fresh(shared_cluster(target_version), "dst").await;
    source.client().await.batch_execute(SCHEMA).await.expect("schema on source");
    target.client().await.batch_execute(SCHEMA).await.expect("schema on target");
    // Another tool's replication origin on the source is reported, not treated as ours.
    let other_origin = format!("other_tool_{}", source.name);
    source.client().await.execute("SELECT pg_replication_origin_create($1)", &[&other_origin]).await.unwrap();
    let setup = Setup::new(&source, &target, &["public.*"], "");
    let out = setup.command(&["init"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(&format!("replication origin {other_origin} is not pgduplex's")),
        "init does not report the other origin:\n{stdout}"
    );
    let mut run = setup.run();

    let src = source.client().await;
    src.batch_execute(WORKLOAD).await.expect("workload");
    setup.wait_converged(TABLES, Duration::from_secs(60)).await;

    // The TOAST value survived the update that did not send it.
    let dst = target.client().await;
    let big: String = dst.query_one("SELECT big FROM alltypes WHERE id = 11", &[]).await.unwrap().get(0);
    assert_eq!(big.len(), 32_000);
    let rolled_back: i64 = dst.query_one("SELECT count(*) FROM alltypes WHERE id = 5000", &[]).await.unwrap().get(0);
    assert_eq!(rolled_back, 0, "rolled back transaction applied");

    // Metrics and health.
    // Commits are pipelined: the counter moves when their completion is collected (<= 1 s).
    let sample = format!("pgduplex_applied_transactions_total{{direction=\"{}-to-{}\"}}", source.name, target.name);
    assert!(run.metric(&sample).is_some(), "{sample} is exported from the start");
    wait_until("applied transactions counted", Duration::from_secs(5), || {
        let v = run.metric(&sample).unwrap_or(0.0);
        async move { v >= 2.0 }
    })
    .await;
    assert_eq!(run.http_get("/healthz").map(|(s, _)| s), Some(200));

    // An idle source: the slot's confirmed position reaches the current WAL position within 10 s.
    let slot = format!("pgduplex_{}_to_{}", source.name, target.name);
    let current: String = src.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let started = Instant::now();
    wait_until("slot confirmed_flush_lsn to reach the idle source's WAL position", Duration::from_secs(10), || {
        let src = &src;
        let (slot, current) = (slot.clone(), current.clone());
        async move {
            src.query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &current],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        }
    })
    .await;
    eprintln!("idle slot caught up in {:?}", started.elapsed());

    let status = run.stop();
    assert!(status.success(), "pgduplex run exited with {status}: {}", run.log_text());
    setup.teardown();
    let leftover: i64 = src
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1) + \
                    (SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgduplex%')",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftover, 0, "teardown left a slot or publication on the source");
    let leftover: i64 = dst
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_origin WHERE roname = $1) + \
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'pgduplex')",
            &[&format!("pgduplex_from_{}", source.name)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftover, 0, "teardown left an origin or the pgduplex schema on the target");
    src.execute("SELECT pg_replication_origin_drop($1)", &[&other_origin]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_to_pg15() {
    one_way(PgVersion::V15, PgVersion::V15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_to_pg18() {
    one_way(PgVersion::V18, PgVersion::V18).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_to_pg18() {
    one_way(PgVersion::V15, PgVersion::V18).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_to_pg15() {
    one_way(PgVersion::V18, PgVersion::V15).await;
}

//! Apply edge cases found in review, each once broken: typmod'd types in multi-row statements,
//! REPLICA IDENTITY FULL compared across settings and types, partitioned tables, key chains and
//! shifts, and a COMMIT that fails on the target (it must stop the stream, not be skipped).

mod replicator;
mod support;

use std::time::Duration;

use replicator::{Node, Setup};
use support::{PgVersion, shared_cluster, wait_until};

const SCHEMA: &str = r#"
CREATE TABLE edge (k char(4) PRIMARY KEY, c char(5), b bit(3), flag bool, ip inet, arr char(2)[]);
CREATE TABLE fi (flag bool, c char(3), ip inet, ts timestamptz, n numeric);
ALTER TABLE fi REPLICA IDENTITY FULL;
CREATE TABLE parted (id int, m int, v text) PARTITION BY LIST (m);
CREATE TABLE parted_jan PARTITION OF parted FOR VALUES IN (1);
CREATE TABLE parted_feb PARTITION OF parted FOR VALUES IN (2);
ALTER TABLE parted REPLICA IDENTITY FULL;
ALTER TABLE parted_jan REPLICA IDENTITY FULL;
ALTER TABLE parted_feb REPLICA IDENTITY FULL;
CREATE TABLE chain (id int PRIMARY KEY, v text, u int UNIQUE);
"#;

const TABLES: &[&str] = &["edge", "fi", "parted", "chain"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typmods_full_identity_partitions_and_key_chains() {
    let source = Node::fresh(shared_cluster(PgVersion::V15), "esrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V18), "edst").await;
    let s = source.client().await;
    let t = target.client().await;
    s.batch_execute(SCHEMA).await.expect("schema on source");
    t.batch_execute(SCHEMA).await.expect("schema on target");
    // The target renders timestamptz in another zone than the source: FULL identity must
    // still find its rows.
    t.batch_execute(&format!("ALTER DATABASE {} SET TimeZone = 'Asia/Kolkata'", target.db)).await.unwrap();
    let initial = 
        "INSERT INTO edge VALUES ('abcd', 'aaaaa', '000', true, '10.0.0.1', '{ab,cd}'), ('efgh', 'bbbbb', '001', false, '10.0.0.2', NULL), \
                                ('a', 'c', '111', NULL, '::1', '{x}');
         INSERT INTO fi VALUES (true, 'ab', '192.168.0.1', '2024-01-01 10:00+00', 1.50), (false, 'x', '10.1.1.1', '2024-06-01 00:00+02', 2);
         INSERT INTO parted VALUES (1, 1, 'jan-a'), (2, 2, 'feb-a'), (3, 1, 'jan-b'), (4, 2, 'feb-b');
         INSERT INTO chain SELECT g, 'v' || g, g FROM generate_series(1, 10) g;";
    // The target starts with the same rows (no initial copy yet).
    s.batch_execute(initial).await.unwrap();
    t.batch_execute(initial).await.unwrap();
    let setup = Setup::new(&source, &target, &["public.*"], "");
    setup.init();
    let _run = setup.run();
    s.batch_execute(
        "BEGIN; UPDATE edge SET c = 'zzzzz', b = '101', arr = '{zz,yy}'; COMMIT;
         BEGIN; DELETE FROM edge WHERE k IN ('abcd', 'efgh'); COMMIT;
         UPDATE fi SET n = 3 WHERE flag;
         DELETE FROM fi WHERE NOT flag;
         DELETE FROM parted WHERE v = 'jan-a';
         UPDATE parted SET v = 'jan-b2' WHERE v = 'jan-b';
         BEGIN; UPDATE chain SET id = 101 WHERE id = 1; UPDATE chain SET id = 201 WHERE id = 101; COMMIT;
         DO $$ BEGIN FOR i IN REVERSE 10..2 LOOP UPDATE chain SET id = id + 1000, u = u + 1 WHERE id = i; END LOOP; END $$;
         BEGIN; UPDATE chain SET u = 100 WHERE id = 201; UPDATE chain SET u = 1 WHERE id = 1010; COMMIT;",
    )
    .await
    .expect("workload");
    setup.wait_converged(TABLES, Duration::from_secs(60)).await;

    // After TRUNCATE of a partitioned table (no ONLY there), new rows still flow.
    s.batch_execute("TRUNCATE parted; INSERT INTO parted VALUES (9, 2, 'after truncate')").await.unwrap();
    setup.wait_converged(TABLES, Duration::from_secs(60)).await;
    let n: i64 = t.query_one("SELECT count(*) FROM parted", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

/// A batch that fails on the target at its end (here a deferred constraint trigger, which
/// pgduplex fires with SET CONSTRAINTS ALL IMMEDIATE before recording the origin) must hold the
/// stream at that transaction: later transactions, pipelined behind it, may not be applied past
/// it. (Before the fix, PostgreSQL's advance of the origin on ABORT let the next batch skip it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_commit_holds_the_stream() {
    let source = Node::fresh(shared_cluster(PgVersion::V15), "fsrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V18), "fdst").await;
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text)";
    let s = source.client().await;
    let t = target.client().await;
    s.batch_execute(schema).await.unwrap();
    t.batch_execute(schema).await.unwrap();
    s.batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g").await.unwrap();
    t.batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g").await.unwrap();
    t.batch_execute(
        "CREATE FUNCTION no_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.v = 'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER no_boom AFTER UPDATE ON t DEFERRABLE INITIALLY DEFERRED \
           FOR EACH ROW EXECUTE FUNCTION no_boom(); \
         ALTER TABLE t ENABLE ALWAYS TRIGGER no_boom;",
    )
    .await
    .unwrap();
    // Every source transaction its own batch, so the failing one is followed by another batch
    // pipelined behind its COMMIT.
    let setup = Setup::new(&source, &target, &["public.t"], "[apply]\nbatch_max_delay_ms = 0");
    setup.init();
    let run = setup.run();
    s.batch_execute("UPDATE t SET v = 'boom' WHERE id = 3").await.unwrap();
    s.batch_execute("UPDATE t SET v = 'after' WHERE id = 4").await.unwrap();
    let errors = format!("pgduplex_errors_total{{direction=\"{}-to-{}\",kind=\"apply\"}}", source.name, target.name);
    wait_until("the failing COMMIT to be retried at least twice", Duration::from_secs(30), || {
        let v = run.metric(&errors).unwrap_or(0.0);
        async move { v >= 2.0 }
    })
    .await;
    let v4: String = t.query_one("SELECT v FROM t WHERE id = 4", &[]).await.unwrap().get(0);
    assert_eq!(v4, "x", "a transaction after the failed one was applied past it");

    // Once the target accepts it, both transactions arrive, in order.
    t.batch_execute("DROP TRIGGER no_boom ON t").await.unwrap();
    setup.wait_converged(&["t"], Duration::from_secs(60)).await;
}

/// DDL is not replicated, but the documented order works without a restart: a column added on
/// the target first and then on the source replicates (the Relation message is re-matched), and
/// a column dropped on the source only leaves the target's column to its default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_and_dropped_while_running() {
    let source = Node::fresh(shared_cluster(PgVersion::V18), "dsrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V15), "ddst").await;
    let schema = "CREATE TABLE t (id int PRIMARY KEY, a text, gone text)";
    let s = source.client().await;
    let t = target.client().await;
    s.batch_execute(schema).await.unwrap();
    t.batch_execute(schema).await.unwrap();
    let setup = Setup::new(&source, &target, &["public.t"], "");
    setup.init();
    let _run = setup.run();
    s.batch_execute("INSERT INTO t VALUES (1, 'before', 'x')").await.unwrap();
    setup.wait_converged(&["t"], Duration::from_secs(30)).await;

    t.batch_execute("ALTER TABLE t ADD COLUMN added int").await.unwrap();
    s.batch_execute("ALTER TABLE t ADD COLUMN added int").await.unwrap();
    s.batch_execute("INSERT INTO t VALUES (2, 'after add', 'y', 42); UPDATE t SET added = 7 WHERE id = 1").await.unwrap();
    setup.wait_converged(&["t"], Duration::from_secs(30)).await;

    s.batch_execute("ALTER TABLE t DROP COLUMN gone").await.unwrap();
    s.batch_execute("INSERT INTO t VALUES (3, 'after drop', 3)").await.unwrap();
    let dst = &t;
    wait_until("row 3 on the target with the dropped column NULL", Duration::from_secs(30), || async move {
        dst.query_opt("SELECT 1 FROM t WHERE id = 3 AND a = 'after drop' AND added = 3 AND gone IS NULL", &[])
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
}

/// A row locked by an application on the target makes the batch time out; pgduplex retries with
/// one source transaction per batch, so the transactions before the contested one get through
/// meanwhile, and the contested one follows once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_conflict_retries_with_smaller_batches() {
    let source = Node::fresh(shared_cluster(PgVersion::V15), "lsrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V18), "ldst").await;
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')";
    let s = source.client().await;
    let t = target.client().await;
    s.batch_execute(schema).await.unwrap();
    t.batch_execute(schema).await.unwrap();
    // Both source transactions land in one batch unless pgduplex splits it.
    let setup = Setup::new(&source, &target, &["public.t"], "[apply]\nlock_timeout_ms = 200\nbatch_max_delay_ms = 2000");
    setup.init();
    let run = setup.run();
    let holder = target.client().await;
    holder.batch_execute("BEGIN; UPDATE t SET v = 'held' WHERE id = 2").await.unwrap();
    s.batch_execute("UPDATE t SET v = 'first' WHERE id = 1").await.unwrap();
    s.batch_execute("UPDATE t SET v = 'second' WHERE id = 2").await.unwrap();
    let dst = &t;
    wait_until("the transaction before the locked row to be applied", Duration::from_secs(30), || async move {
        dst.query_one("SELECT v FROM t WHERE id = 1", &[]).await.map(|r| r.get::<_, String>(0) == "first").unwrap_or(false)
    })
    .await;
    assert!(run.log_text().contains("lock conflict on the target"), "{}", run.log_text());
    holder.batch_execute("ROLLBACK").await.unwrap();
    setup.wait_converged(&["t"], Duration::from_secs(60)).await;
}

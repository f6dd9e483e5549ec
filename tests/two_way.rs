//! Two-way replication against real servers (DESIGN §6): both nodes take writes while
//! replicating; echoes are dropped; concurrent changes are merged per column and both sides end
//! identical, tables and versions tables alike.

mod replicator;
mod support;

use std::time::Duration;

use replicator::{Node, Running, Setup, rows};
use support::{PgVersion, shared_cluster};

// `pair`'s key lists its columns out of table order; `kv.j` is json, which has no "=".
const SCHEMA: &str = "CREATE TABLE kv (id int PRIMARY KEY, x int, y text, z int NOT NULL DEFAULT 0, j json);
                      CREATE TABLE pair (a int, b text, v text, PRIMARY KEY (b, a));";
const TABLES: &[&str] = &["public.kv", "public.pair"];
const COMPARED: &[&str] = &["kv", "pair", "pgduplex.\"public.kv\"", "pgduplex.\"public.pair\""];

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Two fresh databases with the schema, replicated both ways (not started).
async fn pair_of_nodes(va: PgVersion, vb: PgVersion, extra: &str) -> (Setup, Node, Node) {
    let a = Node::fresh(shared_cluster(va), "tw_a").await;
    let b = Node::fresh(shared_cluster(vb), "tw_b").await;
    for n in [&a, &b] {
        n.client().await.batch_execute(SCHEMA).await.expect("schema");
    }
    let setup = Setup::both(&a, &b, TABLES, extra);
    setup.init();
    (setup, a, b)
}

/// One random statement on a small key space, so the two nodes really collide.
fn random_statement(rng: &mut Rng, tag: &str) -> String {
    let id = rng.below(12);
    let v = rng.below(1000);
    match rng.below(11) {
        0 | 1 => format!("INSERT INTO kv (id, x, y) VALUES ({id}, {v}, '{tag}{v}') ON CONFLICT DO NOTHING"),
        2 | 3 => format!("UPDATE kv SET x = {v} WHERE id = {id}"),
        4 => format!("UPDATE kv SET y = '{tag}{v}' WHERE id = {id}"),
        5 => format!("UPDATE kv SET x = {v}, y = '{tag}{v}', z = z + 1, j = '{{\"v\": {v}}}' WHERE id = {id}"),
        6 => format!("DELETE FROM kv WHERE id = {id}"),
        7 => format!("UPDATE kv SET id = {} WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM kv WHERE id = {})", id + 12, id + 12),
        8 => format!("UPDATE kv SET z = z + 1 WHERE id < {}", rng.below(6)),
        9 => format!(
            "INSERT INTO pair VALUES ({}, '{}', '{tag}{v}') ON CONFLICT (a, b) DO UPDATE SET v = excluded.v",
            id % 4,
            ["p", "q"][rng.below(2) as usize]
        ),
        _ => format!("DELETE FROM pair WHERE a = {}", id % 4),
    }
}

/// Runs `steps` random transactions (1-3 statements each) on `node`; with `clock_step_back`,
/// the node's stamp clock jumps an hour back halfway through.
async fn random_writes(node: Node, seed: u64, steps: usize, clock_step_back: bool) {
    let client = node.client().await;
    let mut rng = Rng::new(seed);
    for step in 0..steps {
        if clock_step_back && step == steps / 2 {
            client
                .batch_execute(
                    "UPDATE pgduplex.nodes SET clock_skew_us = -3600000000 WHERE is_self; \
                     SELECT pgduplex.track('public.kv'); SELECT pgduplex.track('public.pair')",
                )
                .await
                .expect("step the clock back");
        }
        let n = 1 + rng.below(3);
        let stmts: Vec<String> = (0..n).map(|_| random_statement(&mut rng, &node.name[..4])).collect();
        let sql = format!("BEGIN; {}; COMMIT", stmts.join("; "));
        if let Err(e) = client.batch_execute(&sql).await {
            // A key change onto a key inserted meanwhile, a lock wait on a row the apply holds:
            // the application's own business. Roll back and go on.
            let _ = client.batch_execute("ROLLBACK").await;
            let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
            assert!(code.starts_with("23") || code.starts_with("40"), "workload statement failed on {}: {e}\n{sql}", node.name);
        }
    }
}

/// Waits until both nodes hold the same rows in every table and versions table.
async fn wait_identical(setup: &Setup, seed: u64) {
    wait_same(setup, COMPARED, seed).await;
}

/// Waits until both nodes hold the same rows in `tables`.
async fn wait_same(setup: &Setup, tables: &[&str], seed: u64) {
    let a = setup.source.client().await;
    let b = setup.target.client().await;
    let timeout = Duration::from_secs(90);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut difference = None;
        for t in tables {
            let (ra, rb) = (rows(&a, t).await, rows(&b, t).await);
            if ra != rb {
                difference = Some(format!("{t}: {} rows vs {} rows\n  a: {ra:?}\n  b: {rb:?}", ra.len(), rb.len()));
                break;
            }
        }
        let Some(difference) = difference else { return };
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: nodes did not converge within {timeout:?}; last difference: {difference}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn applied(run: &Running, setup: &Setup) -> (f64, f64) {
    let (a, b) = (&setup.source.name, &setup.target.name);
    let m = |d: String| run.metric(&format!("pgduplex_applied_transactions_total{{direction=\"{d}\"}}")).unwrap_or(-1.0);
    (m(format!("{a}-to-{b}")), m(format!("{b}-to-{a}")))
}

/// Random concurrent workloads on both nodes while replicating; then: identical tables and
/// versions tables, and no echo loop once idle.
async fn converges(va: PgVersion, vb: PgVersion, seeds: &[u64], clock_step_back: bool) {
    for &seed in seeds {
        let (setup, a, b) = pair_of_nodes(va, vb, "").await;
        let mut run = setup.run();
        // With `clock_step_back`, node b's stamp clock steps an hour back halfway: stamps must
        // still order every write after what it supersedes (Lamport condition), and both sides
        // must still agree.
        tokio::join!(random_writes(a.clone(), seed, 150, false), random_writes(b.clone(), seed ^ 0xABCD, 150, clock_step_back));
        wait_identical(&setup, seed).await;
        let mut conflicts = Vec::new();
        for n in [&a, &b] {
            conflicts.extend(query_strings(n, "SELECT kind || ' ' || count(*) FROM pgduplex.conflicts GROUP BY kind ORDER BY kind").await);
        }
        eprintln!("seed {seed}: conflicts recorded on {} and {}: {conflicts:?}", a.name, b.name);
        // Over 12 keys with both nodes writing, every kind happens (dozens of each in practice);
        // update-missing cannot: every row here was written through pgduplex, so registers
        // always describe the rows.
        for kind in ["insert/insert", "update/update", "update/delete", "delete/update"] {
            assert!(conflicts.iter().any(|c| c.starts_with(kind)), "seed {seed}: no {kind} conflict recorded: {conflicts:?}");
        }
        assert!(!conflicts.iter().any(|c| c.starts_with("update-missing")), "seed {seed}: {conflicts:?}");

        // Idle: nothing is applied in either direction any more (no echo loop).
        // The last no-op merges (writes both sides already hold) finish first: wait for the counts
        // to stand still for two seconds, then hold them to a 5 s window.
        let mut before = applied(&run, &setup);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut still = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = applied(&run, &setup);
            still = if now == before { still + 1 } else { 0 };
            if still == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "seed {seed}: applies did not stop within 30 s: {now:?}");
            before = now;
        }
        let snapshot = {
            let c = a.client().await;
            let mut all = Vec::new();
            for t in COMPARED {
                all.push(rows(&c, t).await);
            }
            all
        };
        tokio::time::sleep(Duration::from_secs(5)).await; // the claim is about a 5 s window
        assert_eq!(applied(&run, &setup), before, "seed {seed}: transactions applied while both nodes were idle (echo loop)");
        let c = a.client().await;
        for (t, rows_before) in COMPARED.iter().zip(snapshot) {
            assert_eq!(rows(&c, t).await, rows_before, "seed {seed}: {t} changed while idle");
        }
        let echoes = run.metric(&format!("pgduplex_echoes_dropped_total{{direction=\"{}-to-{}\"}}", a.name, b.name)).unwrap_or(0.0);
        assert!(echoes > 0.0, "seed {seed}: no echo was dropped, yet every applied transaction comes back as one");
        assert_eq!(run.stop().code(), Some(0), "seed {seed}: pgduplex run did not stop cleanly:\n{}", run.log_text());
        setup.teardown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_15_15() {
    converges(PgVersion::V15, PgVersion::V15, &[1, 2, 3], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_15_18() {
    converges(PgVersion::V15, PgVersion::V18, &[4, 5, 6], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_with_a_clock_stepping_back() {
    converges(PgVersion::V15, PgVersion::V18, &[7], true).await;
}

async fn exec(n: &Node, sql: &str) {
    n.client().await.batch_execute(sql).await.unwrap_or_else(|e| panic!("on {}: {sql}: {e}", n.name));
}

async fn query_strings(n: &Node, sql: &str) -> Vec<String> {
    n.client().await.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// Scripted conflicts of every kind, written while `run` is stopped so they are certainly
/// concurrent: edits to different columns both survive, and each kind is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conflict_kind_is_resolved_and_recorded() {
    let (setup, a, b) = pair_of_nodes(PgVersion::V15, PgVersion::V18, "").await;
    let mut run = setup.run();
    exec(&a, "INSERT INTO kv (id, x, y) SELECT g, g, 'init' FROM generate_series(1, 6) g").await;
    wait_identical(&setup, 0).await;
    run.stop();

    // 1: different columns; 2: same column; 3: update here, delete there; 4: delete here, update
    // there; 10: inserted on both sides.
    exec(&a, "UPDATE kv SET x = 100 WHERE id = 1; UPDATE kv SET y = 'a wins?' WHERE id = 2; UPDATE kv SET x = 300 WHERE id = 3; DELETE FROM kv WHERE id = 4; INSERT INTO kv (id, x, y) VALUES (10, 1, 'from a')").await;
    exec(&b, "UPDATE kv SET y = 'b edit' WHERE id = 1; UPDATE kv SET y = 'b wins?' WHERE id = 2; DELETE FROM kv WHERE id = 3; UPDATE kv SET x = 400 WHERE id = 4; INSERT INTO kv (id, x, y) VALUES (10, 2, 'from b')").await;
    let mut run = setup.run();
    wait_identical(&setup, 0).await;

    let row1 = query_strings(&a, "SELECT x::text || ',' || y FROM kv WHERE id = 1").await;
    assert_eq!(row1, vec!["100,b edit".to_string()], "edits to different columns must both survive");
    // b wrote last to row 2 (later stamp): last-write-wins keeps its value on both nodes.
    assert_eq!(query_strings(&b, "SELECT y FROM kv WHERE id = 2").await, vec!["b wins?".to_string()]);
    // A delete dominates updates made concurrently to the row it deleted.
    assert!(query_strings(&a, "SELECT id::text FROM kv WHERE id IN (3, 4)").await.is_empty());

    let kinds = |n: Node| async move { query_strings(&n, "SELECT DISTINCT kind FROM pgduplex.conflicts ORDER BY 1").await };
    let mut all: Vec<String> = kinds(a.clone()).await;
    all.extend(kinds(b.clone()).await);
    all.sort();
    all.dedup();
    for kind in ["insert/insert", "update/update", "update/delete", "delete/update"] {
        assert!(all.contains(&kind.to_string()), "conflict kind {kind} not recorded; recorded: {all:?}");
    }
    let recorded = query_strings(&a, "SELECT column_name || ':' || winner FROM pgduplex.conflicts WHERE key = '{\"id\": \"2\"}' ORDER BY id").await;
    assert!(recorded.contains(&format!("y:{}", b.name)), "conflict on kv(2).y names the winner: {recorded:?}");
    // Counted when the apply transaction's COMMIT is collected (within a status interval).
    let update_update = || {
        ["remote", "local", "mixed"]
            .iter()
            .map(|r| {
                run.metric(&format!("pgduplex_conflicts_total{{kind=\"update/update\",resolution=\"{r}\",table=\"public.kv\"}}"))
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    support::wait_until("pgduplex_conflicts_total to count the update/update conflicts", Duration::from_secs(10), || async {
        update_update() >= 1.0
    })
    .await;
    run.stop();
    setup.teardown();
}

/// `prefer = "<node>"`: that node's concurrent writes win, whatever the stamps say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_policy_lets_the_owner_win() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "pf_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V15), "pf_b").await;
    for n in [&a, &b] {
        exec(n, SCHEMA).await;
    }
    let setup = Setup::both(&a, &b, TABLES, &format!("[conflicts.tables.\"public.kv\"]\nprefer = \"{}\"", a.name));
    setup.init();
    let mut run = setup.run();
    exec(&a, "INSERT INTO kv (id, x, y) VALUES (1, 0, 'init')").await;
    wait_identical(&setup, 0).await;
    run.stop();
    exec(&a, "UPDATE kv SET x = 1 WHERE id = 1").await;
    exec(&b, "UPDATE kv SET x = 2 WHERE id = 1").await; // later stamp, but a is preferred
    let mut run = setup.run();
    wait_identical(&setup, 0).await;
    assert_eq!(query_strings(&b, "SELECT x::text FROM kv WHERE id = 1").await, vec!["1".to_string()]);
    run.stop();
    setup.teardown();
}

/// ALTER TABLE on both sides while the application writes: writes never break, and the new
/// column replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_and_dropped_on_both_sides() {
    let (setup, a, b) = pair_of_nodes(PgVersion::V15, PgVersion::V18, "").await;
    let mut run = setup.run();
    exec(&a, "INSERT INTO kv (id, x, y) SELECT g, g, 'v' FROM generate_series(1, 5) g").await;
    wait_identical(&setup, 0).await;
    for n in [&a, &b] {
        exec(n, "ALTER TABLE kv ADD COLUMN w text").await;
        // the capture trigger was regenerated: writes keep working and track w
        exec(n, &format!("UPDATE kv SET w = '{}' WHERE id = 1", n.name)).await;
    }
    exec(&a, "UPDATE kv SET w = 'from a' WHERE id = 2").await;
    wait_identical(&setup, 0).await;
    assert_eq!(query_strings(&b, "SELECT w FROM kv WHERE id = 2").await, vec!["from a".to_string()]);
    for n in [&a, &b] {
        exec(n, "ALTER TABLE kv DROP COLUMN y").await;
        exec(n, "UPDATE kv SET x = x + 1 WHERE id = 3; INSERT INTO kv (id, x) VALUES (100 + (SELECT count(*) FROM kv), 1)").await;
    }
    wait_identical(&setup, 0).await;
    let cols = query_strings(&a, "SELECT count(*)::text FROM pg_attribute WHERE attrelid = 'pgduplex.\"public.kv\"'::regclass AND attnum > 0 AND NOT attisdropped AND attname LIKE 'y|%'").await;
    assert_eq!(cols, vec!["0".to_string()], "registers of the dropped column are gone from the versions table");
    run.stop();
    setup.teardown();
}

/// TRUNCATE of a two-way table is refused with a message naming the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_refused() {
    let (setup, a, _b) = pair_of_nodes(PgVersion::V15, PgVersion::V15, "").await;
    let err = a.client().await.batch_execute("TRUNCATE kv").await.expect_err("TRUNCATE must be refused");
    let text = format!("{err:?}");
    assert!(text.contains("public.kv") && text.contains("TRUNCATE"), "{text}");
    setup.teardown();
}

/// init refuses tables two-way replication cannot keep apart, naming table and fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_sequence_keys_and_tables_without_primary_key() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "rf_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V15), "rf_b").await;
    for n in [&a, &b] {
        exec(n, "CREATE TABLE serial_key (id serial PRIMARY KEY, v text); CREATE TABLE no_key (v text); CREATE TABLE ok (id int PRIMARY KEY)").await;
    }
    let setup = Setup::both(&a, &b, &["public.*"], "");
    let out = setup.command(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("serial_key") && err.contains("INCREMENT BY 2"), "{err}");
    assert!(err.contains("no_key") && err.contains("PRIMARY KEY"), "{err}");
    // Interleaved sequences are accepted.
    exec(&a, "ALTER SEQUENCE serial_key_id_seq INCREMENT BY 2 START WITH 1 RESTART WITH 1; DROP TABLE no_key").await;
    exec(&b, "ALTER SEQUENCE serial_key_id_seq INCREMENT BY 2 START WITH 2 RESTART WITH 2; DROP TABLE no_key").await;
    setup.init();
    setup.teardown();
    let left = query_strings(&a, "SELECT count(*)::text FROM pg_namespace WHERE nspname = 'pgduplex'").await;
    assert_eq!(left, vec!["0".to_string()], "teardown removes the pgduplex schema, its triggers and versions tables");
    let triggers = query_strings(&a, "SELECT count(*)::text FROM pg_trigger WHERE tgname LIKE 'pgduplex%'").await;
    assert_eq!(triggers, vec!["0".to_string()]);
}

fn stdout(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Both nodes insert the same value into a UNIQUE (non-key) column under different keys: each
/// side parks the other's insert, replication goes on for other rows, `resolve` lists both, and
/// resolving them (after the operator fixed one email) converges the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_violation_is_parked_then_resolved() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "uq_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "uq_b").await;
    for n in [&a, &b] {
        exec(n, "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, name text)").await;
    }
    let setup = Setup::both(&a, &b, &["public.users"], "");
    setup.init();
    let users: &[&str] = &["users", "pgduplex.\"public.users\""];

    exec(&a, "INSERT INTO users VALUES (1, 'x@example.com', 'from a')").await;
    exec(&b, "INSERT INTO users VALUES (2, 'x@example.com', 'from b')").await;
    let mut run = setup.run();
    // Each side parks the other's insert; later rows still flow both ways.
    exec(&a, "INSERT INTO users VALUES (10, 'p@example.com', 'later a')").await;
    exec(&b, "INSERT INTO users VALUES (20, 'q@example.com', 'later b')").await;
    for (n, id) in [(&a, 20), (&b, 10)] {
        let c = n.client().await;
        support::wait_until(&format!("row {id} replicated to {}", n.name), Duration::from_secs(30), || {
            let c = &c;
            async move { c.query_opt(&format!("SELECT 1 FROM users WHERE id = {id}"), &[]).await.ok().flatten().is_some() }
        })
        .await;
    }
    let parked = |dir: String| run.metric(&format!("pgduplex_parked_changes{{direction=\"{dir}\"}}")).unwrap_or(-1.0);
    assert_eq!(parked(format!("{}-to-{}", a.name, b.name)), 1.0, "a's insert is parked on b");
    assert_eq!(parked(format!("{}-to-{}", b.name, a.name)), 1.0, "b's insert is parked on a");
    let list = stdout(&setup.command(&["resolve", "list"]));
    assert!(list.contains("public.users") && list.contains("{\"id\": \"1\"}") && list.contains("{\"id\": \"2\"}"), "{list}");
    assert!(list.contains("23505") || list.contains("duplicate key"), "the list says why: {list}");

    // The operator gives user 2 another address on b, where user 2 lives: that update is parked
    // on a behind user 2's insert. Then both nodes' parked changes are applied.
    exec(&b, "UPDATE users SET email = 'x2@example.com' WHERE id = 2").await;
    let c = a.client().await;
    support::wait_until("the update of user 2 parked on a behind its insert", Duration::from_secs(30), || {
        let c = &c;
        async move {
            c.query_one("SELECT count(*) FROM pgduplex.parked WHERE key = '{\"id\": \"2\"}'", &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(0) == 2
        }
    })
    .await;
    for n in [&b, &a] {
        let out = setup.command(&["resolve", "apply", "--node", &n.name, "--all"]);
        assert!(out.status.success(), "resolve apply on {}: {}", n.name, stdout(&out));
    }
    wait_same(&setup, users, 0).await;
    let emails = query_strings(&a, "SELECT id || ' ' || email FROM users ORDER BY id").await;
    assert_eq!(emails, vec!["1 x@example.com", "2 x2@example.com", "10 p@example.com", "20 q@example.com"]);
    assert!(stdout(&setup.command(&["resolve", "list"])).contains("no parked changes"));
    support::wait_until("pgduplex_parked_changes back to 0", Duration::from_secs(30), || async {
        parked(format!("{}-to-{}", a.name, b.name)) == 0.0 && parked(format!("{}-to-{}", b.name, a.name)) == 0.0
    })
    .await;
    run.stop();
    setup.teardown();
}

/// A key change of a row whose large value is stored out of line (TOAST): the update does not
/// send the unchanged value, the old row's tombstone supplies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_of_a_row_with_a_toasted_value() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "tk_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "tk_b").await;
    for n in [&a, &b] {
        exec(n, "CREATE TABLE doc (id int PRIMARY KEY, title text, body text)").await;
    }
    let setup = Setup::both(&a, &b, &["public.doc"], "");
    setup.init();
    let mut run = setup.run();
    let docs: &[&str] = &["doc", "pgduplex.\"public.doc\""];
    exec(&a, "INSERT INTO doc SELECT 1, 'big', string_agg(md5(g::text), '') FROM generate_series(1, 2000) g").await;
    wait_same(&setup, docs, 0).await;
    exec(&a, "UPDATE doc SET id = 2 WHERE id = 1").await;
    exec(&b, "UPDATE doc SET title = 'renamed' WHERE id = 1").await; // concurrent, or not: both must agree
    wait_same(&setup, docs, 0).await;
    let body = query_strings(&b, "SELECT id || ':' || length(body) FROM doc ORDER BY id").await;
    assert!(body.contains(&"2:64000".to_string()), "the moved row keeps its body on both nodes: {body:?}");
    assert_eq!(query_strings(&a, "SELECT count(*)::text FROM pgduplex.parked").await, vec!["0".to_string()]);
    run.stop();
    setup.teardown();
}

/// Schema drift, both ways (DESIGN §6b): ADD COLUMN on node a only pauses kv in the direction
/// a -> b (b lacks the column; a's changes of kv are held on b), while b -> a goes on (a keeps
/// its values of the new column) and `pair` replicates both ways. The same ALTER on b replays
/// the held changes and both nodes end identical, tables and versions tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_added_on_one_node_pauses_that_table_until_the_other_has_it() {
    let (setup, a, b) = pair_of_nodes(PgVersion::V15, PgVersion::V18, "").await;
    let mut run = setup.run();
    exec(&a, "INSERT INTO kv (id, x, y) SELECT g, g, 'v' FROM generate_series(1, 6) g").await;
    wait_identical(&setup, 0).await;

    exec(&a, "ALTER TABLE kv ADD COLUMN w text DEFAULT 'none'").await;
    exec(&a, "BEGIN; UPDATE kv SET w = 'a1' WHERE id = 1; INSERT INTO kv (id, x, y, w) VALUES (20, 20, 'a', 'a20'); \
              UPDATE kv SET x = 100 WHERE id = 2; INSERT INTO pair VALUES (1, 'p', 'from a'); COMMIT").await;
    exec(&a, "DELETE FROM kv WHERE id = 4").await;
    exec(&b, "UPDATE kv SET y = 'b3' WHERE id = 3; INSERT INTO kv (id, x, y) VALUES (30, 30, 'b'); INSERT INTO pair VALUES (2, 'q', 'from b')").await;

    // Other tables go on, the same transaction's included; kv flows b -> a.
    wait_same(&setup, &["pair", "pgduplex.\"public.pair\""], 0).await;
    support::wait_until("b's kv changes on a", Duration::from_secs(30), || async {
        query_strings(&a, "SELECT y || ',' || w FROM kv WHERE id IN (3, 30) ORDER BY id").await == ["b3,none", "b,none"]
    })
    .await;
    let a_to_b = format!("pgduplex_table_paused{{direction=\"{}-to-{}\",table=\"public.kv\"}}", a.name, b.name);
    run.wait_metric("kv paused a -> b", &a_to_b, 1.0, Duration::from_secs(30)).await;
    let b_to_a = format!("pgduplex_table_paused{{direction=\"{}-to-{}\",table=\"public.kv\"}}", b.name, a.name);
    assert_ne!(run.metric(&b_to_a), Some(1.0), "b -> a must not pause: a has every column b sends");
    let error = query_strings(&b, "SELECT error FROM pgduplex.paused_tables").await;
    assert!(error.len() == 1 && error[0].contains("public.kv") && error[0].contains(" w "), "stored error names table and column: {error:?}");
    assert_eq!(query_strings(&b, "SELECT count(*)::text FROM kv WHERE id IN (4, 20)").await, ["1"], "a's kv changes are held, not applied");
    assert!(run.log_text().contains("schema drift"), "the pause is logged");

    exec(&b, "ALTER TABLE kv ADD COLUMN w text DEFAULT 'none'").await;
    wait_identical(&setup, 0).await;
    assert_eq!(
        query_strings(&b, "SELECT id || ':' || x || ':' || w FROM kv WHERE id IN (1, 2, 20, 30) ORDER BY id").await,
        ["1:1:a1", "2:100:none", "20:20:a20", "30:30:none"]
    );
    assert_eq!(query_strings(&b, "SELECT count(*)::text FROM pgduplex.paused_changes").await, ["0"]);
    run.wait_metric("kv resumed", &a_to_b, 0.0, Duration::from_secs(30)).await;
    // And it replicates normally again, the new column included.
    exec(&a, "UPDATE kv SET w = 'again' WHERE id = 2").await;
    wait_identical(&setup, 0).await;

    // DROP COLUMN on b first: a's changes of kv still carry w, so they are held on b, while b's
    // (without w) reach a. Then a drops it too and writes nothing more to kv: the pause ends from
    // a's catalog, and the held change is applied without its w.
    exec(&b, "ALTER TABLE kv DROP COLUMN w").await;
    exec(&a, "UPDATE kv SET x = 7 WHERE id = 5").await;
    run.wait_metric("kv paused a -> b after the DROP on b", &a_to_b, 1.0, Duration::from_secs(30)).await;
    exec(&b, "UPDATE kv SET y = 'b6' WHERE id = 6").await;
    support::wait_until("b's change on a", Duration::from_secs(30), || async {
        query_strings(&a, "SELECT y FROM kv WHERE id = 6").await == ["b6"]
    })
    .await;
    exec(&a, "ALTER TABLE kv DROP COLUMN w").await;
    wait_identical(&setup, 0).await;
    assert_eq!(query_strings(&b, "SELECT x::text FROM kv WHERE id = 5").await, ["7"]);
    run.wait_metric("kv resumed after the DROP on a", &a_to_b, 0.0, Duration::from_secs(30)).await;
    run.stop();
    setup.teardown();
}

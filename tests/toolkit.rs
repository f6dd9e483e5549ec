//! The live-migration toolkit against real servers: `init --dry-run`.

mod replicator;
mod support;

use replicator::{Node, Setup};
use support::{PgVersion, shared_cluster};

async fn count(n: &Node, sql: &str) -> i64 {
    n.client().await.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// `init --dry-run` reports every problem, or what init would create, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_dry_run_reports_and_changes_nothing() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "dr_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "dr_b").await;
    a.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE only_a (id int PRIMARY KEY)").await.unwrap();
    b.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int)").await.unwrap();
    let setup = Setup::both(&a, &b, &["public.*"], "");

    let out = setup.command(&["init", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "problems must fail the dry run");
    assert!(text.contains("only_a") && text.contains(&b.name), "missing table named with its node: {text}");
    assert!(text.contains("public.t.v") || (text.contains("t.v") && text.contains("integer")), "type difference named: {text}");

    b.client().await.batch_execute("ALTER TABLE t ALTER COLUMN v TYPE text; CREATE TABLE only_a (id int PRIMARY KEY)").await.unwrap();
    let out = setup.command(&["init", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dry run: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("would") && text.contains(&format!("pgduplex_{}_to_{}", a.name, b.name)), "{text}");
    for n in [&a, &b] {
        for (what, sql) in [
            ("slots", format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%{}%'", a.name)),
            ("publications", format!("SELECT count(*) FROM pg_publication WHERE pubname LIKE '%{}%'", a.name)),
            ("origins", format!("SELECT count(*) FROM pg_replication_origin WHERE roname LIKE '%{}'", a.name)),
            ("pgduplex schema", "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgduplex'".to_string()),
        ] {
            assert_eq!(count(n, &sql).await, 0, "the dry run created {what} on node {}", n.name);
        }
    }
    // The real init then goes through.
    setup.init();
    setup.teardown();
}

fn status_json(setup: &Setup) -> serde_json::Value {
    let out = setup.command(&["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `status` reports each direction from the catalogs and, while `run` is alive, its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_each_direction() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "st_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "st_b").await;
    for n in [&a, &b] {
        n.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
    }
    let setup = Setup::both(&a, &b, &["public.t"], "");
    setup.init();
    let mut run = setup.run();
    a.client().await.batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g").await.unwrap();
    setup.wait_converged(&["t"], std::time::Duration::from_secs(30)).await;
    let a_to_b = format!("{}-to-{}", a.name, b.name);
    let mut last = serde_json::Value::Null;
    // The lag in bytes is measured against the cluster's WAL position, which other tests' databases
    // on the shared clusters move too: an idle direction catches up at its next idle record.
    let lag_ok = |d: &serde_json::Value| d["lag_bytes"].as_i64().is_some_and(|l| (0..64 << 20).contains(&l));
    let ok = support::poll_async(std::time::Duration::from_secs(60), || {
        last = status_json(&setup);
        let ds = last["directions"].as_array().cloned().unwrap_or_default();
        let applied = ds.iter().any(|d| {
            d["direction"] == a_to_b.as_str() && d["applied_transactions"].as_u64().unwrap_or(0) >= 1 && d["slot_active"] == true
        });
        let caught_up = ds.len() == 2 && ds.iter().all(lag_ok);
        async move { applied && caught_up }
    })
    .await;
    assert!(ok, "status never showed the applied transaction and both directions caught up: {last:#}");
    assert_eq!(last["run_alive"], true);
    let ds = last["directions"].as_array().expect("directions");
    assert_eq!(ds.len(), 2);
    for d in ds {
        assert_eq!(d["slot_exists"], true, "{d:#}");
        assert!(lag_ok(d), "lag in bytes: {d:#}");
        assert!(d["retained_wal_bytes"].as_i64().is_some(), "{d:#}");
        assert_eq!(d["parked_changes"], 0, "{d:#}");
        assert_eq!(d["streaming"], true, "{d:#}");
    }
    assert_eq!(last["conflicts_recorded"].as_object().map(|o| o.len()), Some(2));
    let text = String::from_utf8_lossy(&setup.command(&["status"]).stdout).to_string();
    assert!(text.contains("alive") && text.contains(&format!("direction {a_to_b}")), "{text}");

    run.stop();
    let s = status_json(&setup);
    assert_eq!(s["run_alive"], false, "{s:#}");
    assert!(s["directions"][0]["applied_transactions"].is_null());
    setup.teardown();
}

fn command_ok(setup: &Setup, args: &[&str]) -> String {
    let out = setup.command(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgduplex {args:?} failed: {text}");
    text
}

/// After `sequences interleave`, init accepts a serial key for two-way replication and rows
/// inserted on both nodes at once never take the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_interleave_keeps_two_way_inserts_apart() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "sq_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "sq_b").await;
    for n in [&a, &b] {
        n.client()
            .await
            .batch_execute(
                "CREATE TABLE items (id serial PRIMARY KEY, who text); INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 5) g;
                 -- one sequence feeding two tables through their defaults, not owned by either
                 CREATE SEQUENCE shared_seq; CREATE TABLE tags (id bigint PRIMARY KEY DEFAULT nextval('shared_seq'), who text);
                 CREATE TABLE labels (id bigint PRIMARY KEY DEFAULT nextval('shared_seq'), who text);
                 INSERT INTO tags (id, who) VALUES (40, 'seed')",
            )
            .await
            .unwrap();
    }
    let setup = Setup::both(&a, &b, &["public.items", "public.tags", "public.labels"], "");
    let out = setup.command(&["init"]);
    let refusal = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plain serial key must be refused for two-way");
    assert!(refusal.contains("items_id_seq") && refusal.contains("shared_seq"), "a key fed by a nextval default is refused too: {refusal}");
    let text = command_ok(&setup, &["sequences", "interleave"]);
    assert!(text.contains("public.items_id_seq") && text.contains("restarts at"), "{text}");
    assert!(text.contains("public.shared_seq") && text.contains("restarts at 41"), "past the largest key of every table it feeds: {text}");
    setup.init();
    let mut run = setup.run();
    let insert = |n: Node| async move {
        let c = n.client().await;
        for i in 0..100 {
            let table = ["tags", "labels"][i % 2];
            c.batch_execute(&format!("INSERT INTO items (who) VALUES ('{n}'); INSERT INTO {table} (who) VALUES ('{n}')", n = n.name))
                .await
                .expect("insert");
        }
    };
    tokio::join!(insert(a.clone()), insert(b.clone()));
    setup.wait_converged(&["items", "tags", "labels"], std::time::Duration::from_secs(60)).await;
    assert_eq!(count(&a, "SELECT count(*) FROM items").await, 205, "no insert was lost to a key collision");
    assert_eq!(count(&a, "SELECT count(*) FROM tags").await + count(&a, "SELECT count(*) FROM labels").await, 201);
    assert_eq!(count(&a, "SELECT count(*) FROM pgduplex.parked").await + count(&b, "SELECT count(*) FROM pgduplex.parked").await, 0);
    let parities = |n: &Node| format!("SELECT count(DISTINCT id % 2) FROM items WHERE who = '{}'", n.name);
    assert_eq!(count(&a, &parities(&a)).await, 1, "node a's keys share one parity");
    assert_eq!(count(&a, &parities(&b)).await, 1, "node b's keys share one parity");
    run.stop();
    // Running it again changes nothing.
    let again = command_ok(&setup, &["sequences", "interleave"]);
    assert!(again.contains("already interleaved"), "{again}");
    // sync keeps an interleaved sequence on its own node's values.
    let b_parity = count(&b, &format!("SELECT min(id % 2)::bigint FROM items WHERE who = '{}'", b.name)).await;
    command_ok(&setup, &["sequences", "sync", "--from", &a.name]);
    let next = count(&b, "SELECT nextval('items_id_seq')").await;
    assert_eq!(next % 2, b_parity, "still node b's parity after sync");
    assert!(next > count(&a, "SELECT max(id)::bigint FROM items").await, "past every key");
    setup.teardown();
}

/// After `sequences sync`, every target sequence is ahead of the source's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_sync_moves_the_target_ahead() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "sy_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "sy_b").await;
    for n in [&a, &b] {
        n.client()
            .await
            .batch_execute(
                "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text); CREATE TABLE notes (id serial PRIMARY KEY);
                 CREATE SEQUENCE down_seq INCREMENT BY -1 MAXVALUE -1 START WITH -1; CREATE TABLE downs (id int PRIMARY KEY DEFAULT nextval('down_seq'))",
            )
            .await
            .unwrap();
    }
    let setup = Setup::new(&a, &b, &["public.*"], "");
    setup.init();
    let mut run = setup.run();
    a.client().await.batch_execute("INSERT INTO orders (v) SELECT 'x' FROM generate_series(1, 50); INSERT INTO notes SELECT FROM generate_series(1, 7)").await.unwrap();
    setup.wait_converged(&["orders", "notes"], std::time::Duration::from_secs(30)).await;
    run.stop();
    let text = command_ok(&setup, &["sequences", "sync"]);
    assert!(text.contains("orders_id_seq") && text.contains("set to 50"), "{text}");
    assert_eq!(count(&b, "SELECT nextval('orders_id_seq')").await, 51);
    assert_eq!(count(&b, "SELECT nextval('notes_id_seq')").await, 8);
    assert!(text.contains("down_seq counts down: NOT synced"), "a descending sequence is named, not moved the wrong way: {text}");
    let again = command_ok(&setup, &["sequences", "sync"]);
    assert!(again.contains("already at"), "never moves a sequence backwards: {again}");
    setup.teardown();
}

/// `verify` compares chunk by chunk while replication runs, and names the keys of a changed,
/// a missing and an extra row; exit 0 when identical, 3 when not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_changed_missing_and_extra_rows() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "vf_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "vf_b").await;
    let schema = "CREATE TABLE big (id int PRIMARY KEY, v text, n numeric, at timestamptz);
                  CREATE TABLE multi (a text, b int, v text, PRIMARY KEY (b, a))";
    for n in [&a, &b] {
        n.client().await.batch_execute(schema).await.unwrap();
    }
    let setup = Setup::new(&a, &b, &["public.*"], "");
    setup.init();
    let mut run = setup.run();
    a.client()
        .await
        .batch_execute(
            "INSERT INTO big SELECT g, md5(g::text), g / 7.0, '2024-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, 25000) g;
             INSERT INTO multi SELECT chr(97 + g % 3), g, 'm' FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    // Verify while replication is still catching up: chunks in flux are compared again.
    let out = setup.command(&["verify", "--chunk-rows", "1000"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "identical nodes: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("public.big: identical (25000 rows, 26 chunks)"), "{text}");
    run.stop();

    // Behind pgduplex's back, on the target.
    b.client()
        .await
        .batch_execute(
            "UPDATE big SET v = 'tampered' WHERE id = 12345; DELETE FROM big WHERE id = 20000;
             INSERT INTO big VALUES (99999, 'extra', 0, now()); UPDATE multi SET v = 'x' WHERE b = 7",
        )
        .await
        .unwrap();
    let out = setup.command(&["verify", "--chunk-rows", "1000"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(3), "differences exit 3: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("public.big: 1 rows differ: (12345)"), "{text}");
    assert!(text.contains(&format!("public.big: 1 only on {}: (20000)", a.name)), "{text}");
    assert!(text.contains(&format!("public.big: 1 only on {}: (99999)", b.name)), "{text}");
    assert!(text.contains("public.multi: 1 rows differ: (7, b)"), "key in primary-key order: {text}");
    let out = setup.command(&["verify", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    let big = json.as_array().and_then(|t| t.iter().find(|t| t["table"] == "public.big")).expect("big in the report");
    assert_eq!((big["changed_count"].as_u64(), big["only_first_count"].as_u64(), big["only_second_count"].as_u64()), (Some(1), Some(1), Some(1)));
    setup.teardown();
}

const COPY_SCHEMA: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, v text, n int);
CREATE TABLE kinds (id int PRIMARY KEY, j jsonb, a int[], t timestamptz, b bytea, g int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 100);
CREATE TABLE composite (a text, b int, v short_text, PRIMARY KEY (b, a));
CREATE TABLE empty_one (id int PRIMARY KEY);";

const COPY_DATA: &str = "
INSERT INTO big SELECT g, md5(g::text), g % 1000 FROM generate_series(1, 1000000) g;
INSERT INTO kinds (id, j, a, t, b) SELECT g, jsonb_build_object('k', g), ARRAY[g, g + 1], '2024-01-01'::timestamptz + g * interval '1 s', decode(md5(g::text), 'hex') FROM generate_series(1, 2000) g;
INSERT INTO ident (v) SELECT 'v' || g FROM generate_series(1, 3000) g;
INSERT INTO composite SELECT chr(97 + g % 5), g, 'c' FROM generate_series(1, 500) g;";

/// Writes small transactions on `n` until `stop` is set: inserts, updates and deletes.
async fn keep_writing(n: Node, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let c = n.client().await;
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let id = 2_000_000 + i;
        let sql = format!(
            "BEGIN; INSERT INTO big VALUES ({id}, 'new', 1); UPDATE big SET v = 'changed {i}' WHERE id = {}; \
             DELETE FROM big WHERE id = {}; UPDATE kinds SET j = '{{\"w\": {i}}}' WHERE id = {}; COMMIT",
            (i * 7919) % 1_000_000 + 1,
            (i * 104_729) % 1_000_000 + 1,
            i % 2000 + 1
        );
        c.batch_execute(&sql).await.expect("write during the copy");
    }
    i
}

/// Waits until every copied table has the same count and content digest on both nodes (cheap
/// enough for a million rows, unlike comparing every row as text).
async fn wait_same_digest(setup: &Setup, what: &str) {
    let (a, b) = (setup.source.client().await, setup.target.client().await);
    let digest = "SELECT string_agg(x, ' ' ORDER BY x) FROM (\
        SELECT 'big ' || count(*) || ' ' || coalesce(sum(hashtext(t::text)::bigint), 0) AS x FROM big t UNION ALL \
        SELECT 'kinds ' || count(*) || ' ' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM kinds t UNION ALL \
        SELECT 'ident ' || count(*) || ' ' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM ident t UNION ALL \
        SELECT 'composite ' || count(*) || ' ' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM composite t UNION ALL \
        SELECT 'empty_one ' || count(*) FROM empty_one) s";
    support::wait_until(what, std::time::Duration::from_secs(120), || {
        let (a, b) = (&a, &b);
        async move {
            let da: Option<String> = a.query_one(digest, &[]).await.ok().and_then(|r| r.get(0));
            let db: Option<String> = b.query_one(digest, &[]).await.ok().and_then(|r| r.get(0));
            da.is_some() && da == db
        }
    })
    .await;
}

/// `init --copy-from` copies five tables (one of 1,000,000 rows) while the source takes writes
/// throughout; streaming then starts at the snapshot: nothing lost or doubled, `verify` agrees.
/// Then the same into another node with the copy killed halfway and run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_copy_under_writes_and_after_an_interruption() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "cp_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "cp_b").await;
    let b2 = Node::fresh(shared_cluster(PgVersion::V18), "cp_c").await;
    for n in [&a, &b, &b2] {
        n.client().await.batch_execute(COPY_SCHEMA).await.unwrap();
    }
    a.client().await.batch_execute(COPY_DATA).await.unwrap();

    // A target that is not empty is refused, naming the table.
    b.client().await.batch_execute("INSERT INTO empty_one VALUES (1)").await.unwrap();
    let setup = Setup::new(&a, &b, &["public.*"], "");
    let out = setup.command(&["init", "--copy-from", &a.name]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("public.empty_one") && err.contains("must be empty"), "{err}");
    b.client().await.batch_execute("DELETE FROM empty_one").await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(keep_writing(a.clone(), stop.clone()));
    let out = tokio::task::spawn_blocking({
        let config = setup.config.clone();
        let from = a.name.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_pgduplex"))
                .args(["init", "--copy-from", &from, "--jobs", "2", "--config"])
                .arg(config)
                .env("PGDUPLEX_LOG", "info")
                .output()
                .expect("run init")
        }
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "init --copy-from: {text}");
    assert!(text.contains("copied 5 table(s)"), "{text}");
    let mut run = setup.run();
    // More writes while streaming, then stop and compare.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await; // let the writer overlap streaming too
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 10, "the source took writes during the copy ({writes})");
    wait_same_digest(&setup, "the copied and streamed tables to match").await;
    let out = setup.command(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "verify after the copy: {}", String::from_utf8_lossy(&out.stdout));
    run.stop();
    // Origins are per cluster and named after the source: the second target shares b's cluster.
    setup.teardown();

    // Killed halfway, then run again: no duplicates, nothing missing.
    let setup2 = Setup::new(&a, &b2, &["public.*"], "");
    let log = setup2.dir.join("interrupted-init.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgduplex"))
        .args(["init", "--copy-from", &a.name, "--jobs", "1", "--config"])
        .arg(&setup2.config)
        .env("PGDUPLEX_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start init");
    let c2 = b2.client().await;
    let copying = support::poll_async(std::time::Duration::from_secs(30), || {
        let c2 = &c2;
        async move {
            c2.query_opt("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgduplex copy' AND query LIKE 'COPY%'", &[])
                .await
                .ok()
                .flatten()
                .is_some()
        }
    })
    .await;
    assert!(copying, "the copy into the second node never started: {}", std::fs::read_to_string(&log).unwrap_or_default());
    child.kill().expect("kill init");
    let _ = child.wait();
    let out = setup2.command(&["init", "--copy-from", &a.name]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "init after an interrupted copy: {text}");
    assert!(text.contains("interrupted copy"), "{text}");
    let mut run2 = setup2.run();
    wait_same_digest(&setup2, "the tables of the restarted copy to match").await;
    let out = setup2.command(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "verify after the restarted copy: {}", String::from_utf8_lossy(&out.stdout));
    run2.stop();
    setup2.teardown();
}

/// Two-way `init --copy-from`: the empty node is filled (tables and versions tables) from the
/// other, then both take writes and converge; `verify` agrees, versions tables included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_copy_for_two_way_replication() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "cw_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "cw_b").await;
    for n in [&a, &b] {
        n.client().await.batch_execute("CREATE TABLE kv (id int PRIMARY KEY, v text)").await.unwrap();
    }
    a.client().await.batch_execute("INSERT INTO kv SELECT g, 'a' || g FROM generate_series(1, 5000) g").await.unwrap();
    let setup = Setup::both(&a, &b, &["public.kv"], "");
    let text = command_ok(&setup, &["init", "--copy-from", &a.name]);
    assert!(text.contains("copied 2 table(s)"), "the table and its versions table: {text}");
    let mut run = setup.run();
    a.client().await.batch_execute("UPDATE kv SET v = 'from a' WHERE id <= 10; INSERT INTO kv VALUES (6000, 'a')").await.unwrap();
    b.client().await.batch_execute("UPDATE kv SET v = 'from b' WHERE id BETWEEN 5 AND 20; INSERT INTO kv VALUES (7000, 'b')").await.unwrap();
    setup.wait_converged(&["kv", "pgduplex.\"public.kv\""], std::time::Duration::from_secs(60)).await;
    let out = setup.command(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(count(&b, "SELECT count(*) FROM kv").await, 5002);
    run.stop();
    setup.teardown();
}

async fn strings(n: &Node, sql: &str) -> Vec<String> {
    n.client().await.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// Schema drift, one way (DESIGN §6b): ALTER TABLE on the source only pauses that table (the
/// error names table and column, `pgduplex_table_paused` is 1, its changes are held durably,
/// across a restart) while the other tables go on, even in the same transactions; the same
/// ALTER on the target replays the held changes in order and the table resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_pauses_one_table_until_the_target_matches() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "sd_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "sd_b").await;
    for n in [&a, &b] {
        n.client().await.batch_execute("CREATE TABLE drifting (id int PRIMARY KEY, v text); CREATE TABLE steady (id int PRIMARY KEY, v text)").await.unwrap();
    }
    let setup = Setup::new(&a, &b, &["public.*"], "");
    setup.init();
    let mut run = setup.run();
    let src = a.client().await;
    src.batch_execute("INSERT INTO drifting SELECT g, 'v' FROM generate_series(1, 10) g; INSERT INTO steady SELECT g, 'v' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let timeout = std::time::Duration::from_secs(30);
    setup.wait_converged(&["drifting", "steady"], timeout).await;

    src.batch_execute(
        "ALTER TABLE drifting ADD COLUMN w text DEFAULT 'none'; \
         BEGIN; INSERT INTO drifting VALUES (11, 'new', 'w11'); UPDATE drifting SET w = 'w1' WHERE id = 1; \
         INSERT INTO steady VALUES (11, 'same transaction'); COMMIT; \
         DELETE FROM drifting WHERE id = 2; UPDATE steady SET v = 'after' WHERE id = 1",
    )
    .await
    .unwrap();
    setup.wait_converged(&["steady"], timeout).await;
    let gauge = format!("pgduplex_table_paused{{direction=\"{}-to-{}\",table=\"public.drifting\"}}", a.name, b.name);
    run.wait_metric("drifting paused", &gauge, 1.0, timeout).await;
    let error = strings(&b, "SELECT error FROM pgduplex.paused_tables").await;
    assert!(error.len() == 1 && error[0].contains("public.drifting") && error[0].contains(" w "), "error names table and column: {error:?}");
    assert!(run.log_text().contains("schema drift"), "the pause is logged");
    assert_eq!(strings(&b, "SELECT count(*)::text FROM drifting WHERE id IN (2, 11)").await, ["1"], "held, not applied");

    // Held durably: a restart keeps the table paused and goes on holding its changes.
    run.stop();
    let mut run = setup.run();
    src.batch_execute("UPDATE drifting SET v = 'after restart' WHERE id = 3; INSERT INTO steady VALUES (12, 'after restart')").await.unwrap();
    setup.wait_converged(&["steady"], timeout).await;
    run.wait_metric("drifting still paused after the restart", &gauge, 1.0, timeout).await;
    assert_eq!(count(&b, "SELECT count(*) FROM pgduplex.paused_changes").await, 4, "every change of drifting is held");
    let st = status_json(&setup);
    let paused = &st["directions"][0]["paused_tables"];
    assert_eq!(paused[0]["table"], "public.drifting", "status lists the paused table: {st:#}");
    assert_eq!(paused[0]["held_changes"], 4, "{st:#}");

    b.client().await.batch_execute("ALTER TABLE drifting ADD COLUMN w text DEFAULT 'none'").await.unwrap();
    setup.wait_converged(&["drifting", "steady"], timeout).await;
    assert_eq!(
        strings(&b, "SELECT id || ':' || v || ':' || w FROM drifting WHERE id IN (1, 3, 11) ORDER BY id").await,
        ["1:v:w1", "3:after restart:none", "11:new:w11"]
    );
    run.wait_metric("drifting resumed", &gauge, 0.0, timeout).await;
    assert_eq!(count(&b, "SELECT count(*) FROM pgduplex.paused_changes").await + count(&b, "SELECT count(*) FROM pgduplex.paused_tables").await, 0);
    src.batch_execute("UPDATE drifting SET w = 'streaming again' WHERE id = 5").await.unwrap();
    setup.wait_converged(&["drifting"], timeout).await;

    // A second drift; a TRUNCATE naming the paused table and another one, as its transaction's
    // first change: the other table is truncated now, the paused one's part is held and replayed.
    src.batch_execute("ALTER TABLE drifting ADD COLUMN w2 int; INSERT INTO drifting (id, v, w2) VALUES (100, 'x', 1)").await.unwrap();
    run.wait_metric("drifting paused again", &gauge, 1.0, timeout).await;
    src.batch_execute("TRUNCATE drifting, steady; INSERT INTO steady VALUES (1, 'after truncate')").await.unwrap();
    setup.wait_converged(&["steady"], timeout).await;
    assert_eq!(count(&b, "SELECT count(*) FROM drifting").await, 10, "drifting's truncate is held while it is paused");
    b.client().await.batch_execute("ALTER TABLE drifting ADD COLUMN w2 int").await.unwrap();
    setup.wait_converged(&["drifting", "steady"], timeout).await;
    assert_eq!(count(&b, "SELECT count(*) FROM drifting").await, 0);
    run.stop();
    setup.teardown();
}

/// A table added to an established direction (DESIGN §7): `init --copy-from` again copies only
/// the new table, from a snapshot of its own, while `run` streams and the source keeps writing
/// to it; `run` holds its changes during the copy, then skips those the copy has and applies the
/// others, in order. `verify` then finds the nodes identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_later_is_copied_while_replication_runs() {
    let a = Node::fresh(shared_cluster(PgVersion::V15), "ad_a").await;
    let b = Node::fresh(shared_cluster(PgVersion::V18), "ad_b").await;
    for n in [&a, &b] {
        n.client().await.batch_execute("CREATE TABLE first (id int PRIMARY KEY, v text)").await.unwrap();
    }
    a.client().await.batch_execute("INSERT INTO first SELECT g, 'v' FROM generate_series(1, 100) g").await.unwrap();
    let setup = Setup::new(&a, &b, &["public.*"], "");
    command_ok(&setup, &["init", "--copy-from", &a.name]);
    let mut run = setup.run();
    let timeout = std::time::Duration::from_secs(60);
    setup.wait_converged(&["first"], timeout).await;

    for n in [&a, &b] {
        n.client().await.batch_execute("CREATE TABLE late (id int PRIMARY KEY, v text, n int NOT NULL)").await.unwrap();
    }
    a.client().await.batch_execute("INSERT INTO late SELECT g, 'v', 0 FROM generate_series(1, 200000) g").await.unwrap();
    let again = command_ok(&setup, &["init", "--dry-run", "--copy-from", &a.name]);
    assert!(again.contains("would add 1 table(s)") && again.contains("public.late"), "{again}");

    // Writes to the new table (and the old one) before, during and after its copy.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let c = a.client().await;
            let mut i: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 50 {
                c.batch_execute(&format!(
                    "BEGIN; UPDATE late SET n = n + 1 WHERE id = {u}; INSERT INTO late VALUES ({ins}, 'new', 0); \
                     DELETE FROM late WHERE id = {del}; INSERT INTO first VALUES ({f}, 'w'); COMMIT",
                    u = i * 7919 % 200_000 + 1,
                    ins = 300_000 + i,
                    del = i * 13 % 200_000 + 1,
                    f = 1000 + i
                ))
                .await
                .expect("writer");
                i += 1;
            }
            i
        })
    };
    let added = command_ok(&setup, &["init", "--copy-from", &a.name]);
    assert!(added.contains("added 1 table(s)") && added.contains("public.late"), "{added}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.expect("writer task");
    setup.wait_converged(&["late", "first"], timeout).await;
    assert_eq!(count(&b, "SELECT count(*) FROM late WHERE v = 'new'").await, writes, "every insert of the writer, once");
    support::wait_until("the addition of late ends", timeout, || {
        let b = b.clone();
        async move { count(&b, "SELECT count(*) FROM pgduplex.table_sync").await == 0 }
    })
    .await;
    assert_eq!(count(&b, "SELECT count(*) FROM pgduplex.paused_changes").await, 0);
    let log = run.log_text();
    let line = log.lines().find(|l| l.contains("added table copied")).unwrap_or_else(|| panic!("run did not replay the held changes: {log}"));
    eprintln!("{writes} writer transactions; {line}");
    let out = setup.command(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "verify: {}", String::from_utf8_lossy(&out.stdout));
    // Nothing left to add.
    let nothing = command_ok(&setup, &["init", "--copy-from", &a.name]);
    assert!(nothing.contains("nothing to copy"), "{nothing}");
    run.stop();
    setup.teardown();
}

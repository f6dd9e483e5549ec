//! Servers going away under a running `pgduplex run`: the target crashes (immediate stop, so
//! commits made with synchronous_commit = off may be lost) and the source restarts. pgduplex
//! reconnects, resumes from the target's durable origin progress, and every source transaction
//! ends up applied exactly once.

mod replicator;
mod support;

use std::time::Duration;

use replicator::{Node, Setup};
use support::{ClusterOptions, PgVersion, start_cluster, wait_until};

const SCHEMA: &str = "CREATE TABLE ledger (id bigserial PRIMARY KEY, phase int NOT NULL, note text NOT NULL)";

async fn write_phase(source: &Node, phase: i32, transactions: usize) {
    let c = source.client().await;
    for _ in 0..transactions {
        c.execute("INSERT INTO ledger (phase, note) VALUES ($1, md5(random()::text))", &[&phase])
            .await
            .expect("source insert");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_and_source_restart() {
    let mut source_cluster = start_cluster(PgVersion::V15, ClusterOptions::default());
    let mut target_cluster = start_cluster(PgVersion::V18, ClusterOptions::default());
    let source = Node::fresh(&source_cluster, "rsrc").await;
    let target = Node::fresh(&target_cluster, "rdst").await;
    source.client().await.batch_execute(SCHEMA).await.expect("schema");
    target.client().await.batch_execute(SCHEMA).await.expect("schema");
    let setup = Setup::new(&source, &target, &["public.ledger"], "");
    setup.init();
    let run = setup.run();

    write_phase(&source, 1, 1500).await;
    // Crash the target while pgduplex is still applying phase 1.
    target_cluster.stop_immediate();
    write_phase(&source, 2, 500).await;
    target_cluster.start();
    setup.wait_converged(&["ledger"], Duration::from_secs(120)).await;

    source_cluster.stop_immediate();
    source_cluster.start();
    write_phase(&source, 3, 1000).await;
    setup.wait_converged(&["ledger"], Duration::from_secs(120)).await;

    let t = target.client().await;
    let (n, distinct): (i64, i64) = {
        let r = t.query_one("SELECT count(*), count(DISTINCT id) FROM ledger", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((n, distinct), (3000, 3000), "every source transaction applied once");
    let label = format!("pgduplex_reconnects_total{{direction=\"{}-to-{}\"}}", source.name, target.name);
    wait_until("the reconnect counter to show both outages", Duration::from_secs(10), || {
        let v = run.metric(&label).unwrap_or(0.0);
        async move { v >= 2.0 }
    })
    .await;
    assert!(!run.log_text().contains("duplicate key"), "a transaction was applied twice:\n{}", run.log_text());
}

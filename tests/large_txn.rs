//! A single source transaction of 1,000,000 rows replicates with bounded memory: changes are
//! streamed into the open target transaction (COPY), never buffered whole.

mod replicator;
mod support;

use std::time::{Duration, Instant};

use replicator::{Node, Setup};
use support::{PgVersion, shared_cluster, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_row_transaction_peak_rss_under_200mb() {
    let source = Node::fresh(shared_cluster(PgVersion::V15), "lsrc").await;
    let target = Node::fresh(shared_cluster(PgVersion::V18), "ldst").await;
    let schema = "CREATE TABLE big (id int PRIMARY KEY, h text NOT NULL, at timestamptz NOT NULL)";
    source.client().await.batch_execute(schema).await.expect("schema");
    target.client().await.batch_execute(schema).await.expect("schema");
    let setup = Setup::new(&source, &target, &["public.big"], "");
    setup.init();
    let run = setup.run();

    let src = source.client().await;
    src.batch_execute("INSERT INTO big SELECT g, md5(g::text), now() FROM generate_series(1, 1000000) g")
        .await
        .expect("1M-row transaction");
    let digest = "SELECT count(*)::text || ':' || md5(string_agg(b::text, ',' ORDER BY id)) FROM big b";
    let want: String = src.query_one(digest, &[]).await.unwrap().get(0);
    let dst = target.client().await;
    let started = Instant::now();
    wait_until("1M rows on the target", Duration::from_secs(300), || {
        let dst = &dst;
        async move { dst.query_one("SELECT count(*) FROM big", &[]).await.map(|r| r.get::<_, i64>(0) == 1_000_000).unwrap_or(false) }
    })
    .await;
    let elapsed = started.elapsed();
    let got: String = dst.query_one(digest, &[]).await.unwrap().get(0);
    assert_eq!(got, want, "target contents differ from source");
    let peak_kb = run.peak_rss_kb();
    eprintln!("1M-row transaction applied in {elapsed:?}; pgduplex peak RSS {} MB", peak_kb / 1024);
    assert!(peak_kb > 0, "could not read VmHWM of pgduplex");
    assert!(peak_kb < 200 * 1024, "peak RSS {} kB is over 200 MB", peak_kb);
}

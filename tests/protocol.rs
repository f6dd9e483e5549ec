//! Real-server tests of the replication connection (`src/protocol/`), against PostgreSQL 15 and
//! 18: every authentication method, the walsender commands, a pgoutput stream read through a
//! `select!` that keeps cancelling `next()`, status updates moving `confirmed_flush_lsn`, and the
//! errors the pipeline must classify (wrong password, missing slot, terminated walsender).

mod support;

use std::time::Duration;

use pgduplex::protocol::{
    ConnectParams, Lsn, ProtocolError, ReplicationClient, ReplicationMessage, ReplicationStream,
    SnapshotAction,
};
use support::{
    Auth, Cluster, ClusterOptions, PgVersion, shared_cluster, start_cluster, unique_name,
    wait_until,
};

/// Longest any single step may take before the test calls it a hang.
const STEP: Duration = Duration::from_secs(30);

const APP: &str = "pgduplex_protocol_test";

/// Rows in the streamed transaction.
const ROWS: usize = 5000;

/// Runs `fut` with the [`STEP`] deadline, panicking with `what` if it does not finish.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

fn params(url: &str) -> ConnectParams {
    let config: tokio_postgres::Config = url.parse().expect("test URL parses");
    ConnectParams::from_config(&config, APP).expect("test URL is usable")
}

async fn connect(url: &str) -> Result<ReplicationClient, ProtocolError> {
    within(
        "replication connect",
        ReplicationClient::connect(&params(url)),
    )
    .await
}

/// A fresh database with `t(id int primary key, v text)` published as `pub`.
async fn published_db(cluster: &Cluster, prefix: &str) -> (String, String) {
    let db = cluster.fresh_db(prefix).await;
    let publication = unique_name("pub");
    cluster
        .connect(&db)
        .await
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION {publication} FOR TABLE t;"
        ))
        .await
        .unwrap_or_else(|e| cluster.fail(format_args!("creating table and publication: {e}")));
    (db, publication)
}

/// The end LSN of a pgoutput Commit message (`C`, flags, commit LSN, end LSN, timestamp).
fn commit_end_lsn(data: &[u8]) -> Lsn {
    assert_eq!(data.len(), 26, "pgoutput Commit is 26 bytes");
    Lsn(u64::from_be_bytes(
        data[10..18].try_into().expect("8 bytes"),
    ))
}

async fn confirmed_flush_lsn(client: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("reading pg_replication_slots");
    row.get::<_, Option<String>>(0)
        .map(|s| s.parse().expect("an LSN"))
}

/// Reads the stream until a Commit arrives, returning the first bytes of every XLogData payload
/// and the Commit's end LSN. `next()` races a `yield_now()` in a biased `select!`, so it is
/// cancelled over and over in the middle of frames: the cancel-safety claim, against TCP.
async fn read_one_transaction(stream: &mut ReplicationStream) -> (Vec<u8>, Lsn, u32) {
    let mut tags = Vec::new();
    let mut cancellations = 0u32;
    loop {
        let message = tokio::select! {
            biased;
            m = stream.next() => m.expect("stream message").expect("stream still open"),
            _ = tokio::task::yield_now() => { cancellations += 1; continue; }
        };
        if let ReplicationMessage::XLogData { data, .. } = message {
            let tag = *data.first().expect("non-empty pgoutput message");
            tags.push(tag);
            if tag == b'C' {
                return (tags, commit_end_lsn(&data), cancellations);
            }
        }
    }
}

/// The whole stream path on one server: IDENTIFY_SYSTEM, slot, START_REPLICATION, Begin ..
/// Commit, keepalive on request, and confirmed_flush_lsn moving to the reported flush LSN.
async fn stream_and_confirm(version: PgVersion) {
    let cluster = shared_cluster(version);
    let (db, publication) = published_db(cluster, "proto_stream").await;
    let sql = cluster.connect(&db).await;
    let slot = unique_name("slot");

    let mut client = connect(&cluster.url(&db))
        .await
        .expect("connect as postgres (trust)");
    assert_eq!(client.server_version_num() / 10000, version.major());
    let system = within("IDENTIFY_SYSTEM", client.identify_system())
        .await
        .expect("IDENTIFY_SYSTEM");
    assert_eq!(system.dbname.as_deref(), Some(db.as_str()));
    assert!(system.timeline >= 1);
    assert!(
        system.systemid.parse::<u64>().is_ok(),
        "systemid {:?}",
        system.systemid
    );
    let created = within(
        "create slot",
        client.create_logical_slot(&slot, false, SnapshotAction::NoExport),
    )
    .await
    .expect("CREATE_REPLICATION_SLOT");
    assert_eq!(created.slot_name, slot);
    assert_eq!(created.snapshot_name, None);
    assert!(created.consistent_point.0 > 0);

    // Big enough (~1 MB of pgoutput) to span many socket reads, so next() is cancelled while
    // frames are half received.
    sql.batch_execute(&format!(
        "INSERT INTO t SELECT i, repeat('x', 150) FROM generate_series(1, {ROWS}) i"
    ))
    .await
    .expect("insert");

    let options = [
        ("proto_version", "1"),
        ("publication_names", publication.as_str()),
    ];
    let mut stream = within(
        "START_REPLICATION",
        client.start_logical_replication(&slot, created.consistent_point, &options),
    )
    .await
    .expect("START_REPLICATION");

    let (tags, commit_end, cancellations) = within(
        "the inserted transaction",
        read_one_transaction(&mut stream),
    )
    .await;
    assert_eq!(
        tags.first(),
        Some(&b'B'),
        "first payload is Begin: {tags:?}"
    );
    assert_eq!(
        tags.iter().filter(|&&t| t == b'I').count(),
        ROWS,
        "every insert arrives whole"
    );
    assert_eq!(
        tags.iter().position(|&t| t == b'R'),
        Some(1),
        "Relation right after Begin"
    );
    eprintln!("{version}: next() was cancelled {cancellations} times while {ROWS} rows streamed");
    assert!(
        cancellations > 0,
        "next() was cancelled at least once while waiting for data"
    );
    assert!(commit_end > created.consistent_point);

    // Ask for a reply without confirming anything yet, then answer the keepalive with the
    // commit's end LSN: the slot must move exactly there.
    within(
        "status update",
        stream.send_standby_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, true),
    )
    .await
    .expect("send status");
    let keepalive_end = within("a keepalive", async {
        loop {
            match stream
                .next()
                .await
                .expect("stream message")
                .expect("stream still open")
            {
                ReplicationMessage::PrimaryKeepalive { wal_end, .. } => break wal_end,
                // Nothing else writes to this database, but a stray message must not fail the test.
                ReplicationMessage::XLogData { .. } => continue,
            }
        }
    })
    .await;
    assert!(
        keepalive_end >= commit_end,
        "keepalive {keepalive_end} before commit end {commit_end}"
    );
    let before = confirmed_flush_lsn(&sql, &slot)
        .await
        .expect("a logical slot has confirmed_flush_lsn");
    assert!(
        before < commit_end,
        "nothing confirmed yet: {before} vs {commit_end}"
    );
    within(
        "status update",
        stream.send_standby_status(commit_end, commit_end, commit_end, false),
    )
    .await
    .expect("send status");
    wait_until(
        &format!("{version}: confirmed_flush_lsn of {slot} to reach {commit_end}"),
        STEP,
        || async {
            confirmed_flush_lsn(&sql, &slot)
                .await
                .is_some_and(|l| l >= commit_end)
        },
    )
    .await;
    assert_eq!(
        confirmed_flush_lsn(&sql, &slot).await,
        Some(commit_end),
        "never more than reported"
    );

    within("close", stream.close()).await.expect("close");
    wait_until(
        &format!("{version}: slot {slot} to be released"),
        STEP,
        || async {
            let row = sql
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .expect("pg_replication_slots");
            !row.get::<_, bool>(0)
        },
    )
    .await;
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
}

#[tokio::test]
async fn streams_pgoutput_and_confirms_flush_pg15() {
    stream_and_confirm(PgVersion::V15).await;
}

#[tokio::test]
async fn streams_pgoutput_and_confirms_flush_pg18() {
    stream_and_confirm(PgVersion::V18).await;
}

/// One dedicated cluster per method and version: the right password logs in, a wrong one is a
/// prompt, non-retryable 28P01, and a missing one is a client-side Auth error, never a hang.
async fn password_methods(version: PgVersion) {
    for auth in [Auth::Password, Auth::Md5, Auth::Scram] {
        let cluster = start_cluster(
            version,
            ClusterOptions::default().with_auth(auth).without_fsync(),
        );
        let user = "repl_user";
        let password = "s3cret 'quoted' pw";
        cluster
            .connect("postgres")
            .await
            .batch_execute(&format!(
                "CREATE ROLE {user} LOGIN REPLICATION PASSWORD 's3cret ''quoted'' pw'"
            ))
            .await
            .unwrap_or_else(|e| cluster.fail(format_args!("CREATE ROLE: {e}")));

        let mut client = connect(&cluster.url_for(user, password, "postgres"))
            .await
            .unwrap_or_else(|e| {
                cluster.fail(format_args!("{auth:?} login with the right password: {e}"))
            });
        let system = within("IDENTIFY_SYSTEM", client.identify_system())
            .await
            .expect("IDENTIFY_SYSTEM");
        assert_eq!(system.dbname.as_deref(), Some("postgres"));
        let rows = within(
            "simple query",
            client.simple_query("SELECT current_user, 1 AS one, NULL"),
        )
        .await
        .expect("SELECT");
        assert_eq!(
            rows,
            vec![vec![Some(user.to_string()), Some("1".to_string()), None]]
        );
        within("close", client.close()).await.expect("close");

        let err = connect(&cluster.url_for(user, "wrong", "postgres"))
            .await
            .expect_err("wrong password");
        assert_eq!(err.sqlstate(), Some("28P01"), "{version} {auth:?}: {err}");
        assert!(!err.is_retryable(), "a wrong password is not retryable");
        assert!(
            !err.to_string().contains("wrong"),
            "the password is not echoed: {err}"
        );

        let err = connect(&format!(
            "postgresql://{user}@127.0.0.1:{}/postgres",
            cluster.port
        ))
        .await
        .expect_err("no password");
        assert!(
            matches!(err, ProtocolError::Auth(_)),
            "{version} {auth:?}: {err}"
        );
        assert!(!err.is_retryable());
    }
}

#[tokio::test]
async fn password_md5_and_scram_auth_pg15() {
    password_methods(PgVersion::V15).await;
}

#[tokio::test]
async fn password_md5_and_scram_auth_pg18() {
    password_methods(PgVersion::V18).await;
}

/// Trust over TCP and over the Unix socket; server errors keep the connection usable; walsender
/// errors are classified for the pipeline; an exported snapshot is returned.
#[tokio::test]
async fn trust_unix_socket_and_server_errors() {
    for version in PgVersion::all() {
        let cluster = shared_cluster(version);
        let (db, _publication) = published_db(cluster, "proto_errors").await;

        let unix = ConnectParams {
            host: cluster
                .socket_dir()
                .to_str()
                .expect("utf-8 socket dir")
                .to_string(),
            port: cluster.port,
            user: "postgres".into(),
            password: None,
            dbname: db.clone(),
            application_name: APP.into(),
            connect_timeout: STEP,
            tls_mode: pgduplex::tls::TlsMode::Prefer,
            tls_config: None,
        };
        let mut client = ReplicationClient::connect(&unix)
            .await
            .expect("connect over the Unix socket");
        assert!(client.parameter("server_version").is_some());
        assert!(client.backend_pid().is_some());

        let err = within("division by zero", client.simple_query("SELECT 1/0"))
            .await
            .expect_err("1/0");
        assert_eq!(err.sqlstate(), Some("22012"), "{err}");
        let rows = within(
            "query after an error",
            client.simple_query("SELECT 'still usable'"),
        )
        .await
        .expect("usable");
        assert_eq!(rows, vec![vec![Some("still usable".to_string())]]);

        let temp_slot = unique_name("tmp");
        let created = within(
            "temporary slot",
            client.create_logical_slot(&temp_slot, true, SnapshotAction::Export),
        )
        .await
        .expect("temporary slot with exported snapshot");
        assert!(
            created.snapshot_name.is_some(),
            "Export returns the snapshot name"
        );
        let err = within(
            "duplicate slot",
            client.create_logical_slot(&temp_slot, true, SnapshotAction::NoExport),
        )
        .await
        .expect_err("duplicate slot");
        assert_eq!(err.sqlstate(), Some("42710"), "{err}");
        within("close", client.close()).await.expect("close");

        let client = connect(&cluster.url(&db)).await.expect("connect over TCP");
        let err = within(
            "START_REPLICATION of a missing slot",
            client.start_logical_replication(
                "no_such_slot",
                Lsn::ZERO,
                &[("proto_version", "1"), ("publication_names", "p")],
            ),
        )
        .await
        .expect_err("missing slot");
        assert_eq!(err.sqlstate(), Some("42704"), "{version}: {err}");
        assert!(!err.is_retryable());
    }
}

/// A walsender terminated by an administrator ends the stream with a retryable 57P01, never a
/// hang, a panic or a silent end.
#[tokio::test]
async fn terminated_walsender_is_retryable() {
    for version in PgVersion::all() {
        let cluster = shared_cluster(version);
        let (db, publication) = published_db(cluster, "proto_term").await;
        let sql = cluster.connect(&db).await;
        let slot = unique_name("slot");
        let mut client = connect(&cluster.url(&db)).await.expect("connect");
        let pid = client.backend_pid().expect("BackendKeyData");
        let created = within(
            "slot",
            client.create_logical_slot(&slot, true, SnapshotAction::NoExport),
        )
        .await
        .expect("slot");
        let mut stream = within(
            "START_REPLICATION",
            client.start_logical_replication(
                &slot,
                created.consistent_point,
                &[
                    ("proto_version", "1"),
                    ("publication_names", publication.as_str()),
                ],
            ),
        )
        .await
        .expect("START_REPLICATION");
        sql.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("terminate walsender");
        let end = within("the stream to end", async {
            loop {
                match stream.next().await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            }
        })
        .await;
        let err = end.expect_err("the server reports why it ended the stream");
        assert_eq!(err.sqlstate(), Some("57P01"), "{version}: {err}");
        assert!(
            err.is_retryable(),
            "{version}: an administrator shutdown is retryable"
        );
    }
}

/// A server that accepts the TCP connection but never answers the startup message: connect
/// fails with Timeout after connect_timeout instead of hanging.
#[tokio::test]
async fn connect_times_out_on_a_silent_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let silent = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        // Hold the socket open without answering until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    });
    let params = ConnectParams {
        host: "127.0.0.1".into(),
        port,
        user: "u".into(),
        password: Some(b"never logged".to_vec()),
        dbname: "d".into(),
        application_name: APP.into(),
        connect_timeout: Duration::from_millis(300),
        tls_mode: pgduplex::tls::TlsMode::Disable,
        tls_config: None,
    };
    let started = std::time::Instant::now();
    let err = within("connect timeout", ReplicationClient::connect(&params))
        .await
        .expect_err("silent server");
    assert!(matches!(err, ProtocolError::Timeout(_)), "{err}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!err.to_string().contains("never logged"), "{err}");
    silent.abort();
}

/// The first transaction a stream started at `start` delivers: (Begin's final LSN, the first
/// inserted id), decoded with our pgoutput decoder.
async fn first_transaction_from(cluster: &Cluster, db: &str, slot: &str, publication: &str, start: Lsn) -> (Lsn, Lsn, i32) {
    use pgduplex::pgoutput::{self, ColumnValue, DecodeContext, Message};
    let client = connect(&cluster.url(db)).await.expect("connect");
    let options = [("proto_version", "1"), ("publication_names", publication)];
    let mut stream = within("START_REPLICATION", client.start_logical_replication(slot, start, &options))
        .await
        .expect("START_REPLICATION");
    let ctx = DecodeContext { protocol_version: 1, in_streamed_transaction: false };
    let (mut begin, mut first_id) = (None, None);
    loop {
        let msg = within("next message", stream.next()).await.expect("stream").expect("open");
        let ReplicationMessage::XLogData { data, .. } = msg else { continue };
        match pgoutput::decode(&data, &ctx).expect("decodes") {
            Message::Begin(b) => begin = Some(b.final_lsn),
            Message::Insert(i) if first_id.is_none() => {
                if let Some(ColumnValue::Text(v)) = i.new.columns.first() {
                    first_id = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
                }
            }
            Message::Commit(c) => {
                let _ = stream.close().await;
                return (begin.expect("Begin before Commit"), c.end_lsn, first_id.expect("an insert"));
            }
            _ => {}
        }
    }
}

/// DESIGN §5: resuming at a transaction's commit END LSN skips it; resuming at its Begin's
/// final LSN (the commit record's start) sends it again. pgduplex stores and resumes from the
/// end LSN; this pins the server behaviour that choice relies on, on both versions.
#[tokio::test]
async fn resume_at_commit_end_lsn_skips_the_transaction() {
    for version in PgVersion::all() {
        let cluster = shared_cluster(version);
        let (db, publication) = published_db(cluster, "proto_resume").await;
        let sql = cluster.connect(&db).await;
        let slot = unique_name("rslot");
        sql.query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.expect("slot");
        sql.batch_execute("INSERT INTO t VALUES (1, 'first')").await.expect("txn 1");
        sql.batch_execute("INSERT INTO t VALUES (2, 'second')").await.expect("txn 2");

        let (final1, end1, id) = first_transaction_from(cluster, &db, &slot, &publication, Lsn::ZERO).await;
        assert_eq!(id, 1, "{version:?}: the stream starts with the first transaction");
        assert!(end1 > final1);
        let (_, _, id) = first_transaction_from(cluster, &db, &slot, &publication, final1).await;
        assert_eq!(id, 1, "{version:?}: starting at Begin's final LSN re-sends the transaction");
        let (_, _, id) = first_transaction_from(cluster, &db, &slot, &publication, end1).await;
        assert_eq!(id, 2, "{version:?}: starting at the commit end LSN skips the applied transaction");
    }
}

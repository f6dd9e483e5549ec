//! TLS with libpq's sslmode meanings, on the SQL connections and on our own replication
//! connection: verify-full against a test CA replicates over TLS (pg_stat_ssl shows it);
//! verify-full refuses a host name the certificate does not name; verify-ca accepts it;
//! require against a server without TLS is refused.

mod replicator;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use replicator::{Node, Setup};
use support::{ClusterOptions, PgVersion, shared_cluster, start_cluster, wait_until};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for DNS name `localhost` only, readable by the server user.
fn make_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=pgduplex test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"]);
    // The server refuses a key others can read; it runs as `postgres` when we are root.
    let owner = if unsafe { libc::geteuid() } == 0 { "postgres" } else { "" };
    if !owner.is_empty() {
        let st = Command::new("chown").args(["-R", owner]).arg(dir).status().unwrap();
        assert!(st.success());
    }
    let st = Command::new("chmod").args(["600"]).arg(dir.join("server.key")).status().unwrap();
    assert!(st.success());
    let st = Command::new("chmod").args(["755"]).arg(dir).status().unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_on_sql_and_replication_connections() {
    let dir = std::env::temp_dir().join(format!("pgduplex-tls-{}", support::unique_name("c")));
    make_certificates(&dir);
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    let ca = dir.join("ca.pem");
    let cluster = start_cluster(
        PgVersion::V15,
        ClusterOptions::default()
            .without_fsync()
            .with_conf("ssl", "on")
            .with_conf("ssl_cert_file", cert.to_str().unwrap())
            .with_conf("ssl_key_file", key.to_str().unwrap()),
    );
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text)";

    // verify-full against localhost: replicates, and both connections to the source use TLS.
    let mut source = Node::fresh(&cluster, "tsrc").await;
    source.url = format!(
        "postgresql://postgres@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        source.db,
        ca.display()
    );
    let target = Node::fresh(shared_cluster(PgVersion::V18), "tdst").await;
    let plain = cluster.connect(&source.db).await;
    plain.batch_execute(schema).await.unwrap();
    target.client().await.batch_execute(schema).await.unwrap();
    let setup = Setup::new(&source, &target, &["public.*"], "");
    setup.init();
    let run = setup.run();
    plain.batch_execute("INSERT INTO t SELECT g, 'over tls ' || g FROM generate_series(1, 100) g").await.unwrap();
    setup.wait_converged(&["t"], Duration::from_secs(60)).await;
    wait_until("pgduplex's stream and monitor connections to use TLS", Duration::from_secs(10), || {
        let plain = &plain;
        async move {
            plain
                .query_one(
                    "SELECT count(*) FILTER (WHERE a.backend_type = 'walsender'), count(*) \
                     FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE s.ssl AND a.application_name LIKE 'pgduplex%'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1 && r.get::<_, i64>(1) >= 2)
                .unwrap_or(false)
        }
    })
    .await;
    drop(run);

    // verify-full to 127.0.0.1: the certificate names only localhost.
    let mut by_ip = Node::fresh(&cluster, "tip").await;
    cluster.connect(&by_ip.db).await.batch_execute(schema).await.unwrap();
    let target2 = Node::fresh(shared_cluster(PgVersion::V18), "tdst").await;
    target2.client().await.batch_execute(schema).await.unwrap();
    by_ip.url = format!("postgresql://postgres@127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}", cluster.port, by_ip.db, ca.display());
    let out = Setup::new(&by_ip, &target2, &["public.*"], "").command(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("node {}: cannot connect", by_ip.name)) && err.to_lowercase().contains("certificate"), "{err}");

    // verify-ca to 127.0.0.1: the chain is checked, the name is not.
    by_ip.url = by_ip.url.replace("verify-full", "verify-ca");
    let setup_ca = Setup::new(&by_ip, &target2, &["public.*"], "");
    setup_ca.init();
    setup_ca.teardown();

    // require against a server without TLS.
    let mut no_tls = Node::fresh(shared_cluster(PgVersion::V15), "tnotls").await;
    no_tls.url = format!("{}?sslmode=require", no_tls.url);
    let out = Setup::new(&no_tls, &target2, &["public.*"], "").command(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TLS"), "{err}");

    setup.teardown();
    let _ = std::fs::remove_dir_all(&dir);
}

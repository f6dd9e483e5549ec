//! Where and as whom to open a replication connection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::TlsMode;

use tokio_postgres::config::{ChannelBinding, Host, SslMode};

use super::ProtocolError;

/// The default PostgreSQL port, as libpq uses it.
pub const DEFAULT_PORT: u16 = 5432;

/// Time allowed for connect + startup + authentication when the URL sets no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`ReplicationClient::connect`](super::ReplicationClient::connect) needs to reach and
/// log in to one server.
///
/// It exists because tokio-postgres's `Config` cannot open replication connections: the user's
/// libpq URL is parsed into a `tokio_postgres::Config` once (for the normal SQL connections),
/// and [`ConnectParams::from_config`] takes the parts the replication connection uses from it,
/// so both kinds of connection always go to the same server as the same user.
///
/// `Debug` never shows the password.
#[derive(Clone)]
pub struct ConnectParams {
    /// Hostname, IP address, or the directory of the server's Unix socket when it starts with
    /// `/` (the socket is then `<host>/.s.PGSQL.<port>`, as libpq does it).
    pub host: String,
    /// TCP port, or the number in the Unix socket's file name.
    pub port: u16,
    /// The role to log in as.
    pub user: String,
    /// Password for cleartext, md5 and SCRAM-SHA-256 authentication; `None` for trust/peer.
    pub password: Option<Vec<u8>>,
    /// The database whose changes are decoded (logical slots belong to one database).
    pub dbname: String,
    /// Shown in `pg_stat_replication.application_name` and the server's logs.
    pub application_name: String,
    /// Limit for TCP connect + startup + authentication together; `Duration::ZERO` means no
    /// limit (libpq's `connect_timeout=0`).
    pub connect_timeout: Duration,
    /// libpq's sslmode (TLS is never used on a Unix socket, as in libpq).
    pub tls_mode: TlsMode,
    /// The TLS client configuration; `None` builds the default for `tls_mode`.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl ConnectParams {
    /// Takes the first host of `cfg` (a `hostaddr` wins over a `host`, as in libpq), its port
    /// (default 5432), user (default: the `USER`/`LOGNAME` of this process), password, database
    /// (default: the user name) and connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]).
    ///
    /// `application_name` is used when non-empty, else the URL's, else `pgduplex`.
    ///
    /// Fails when the URL has no host, or asks for channel binding, which this connection does
    /// not implement yet. The TLS mode comes from the URL's `sslmode` as tokio-postgres parsed
    /// it (disable/prefer/require); callers with richer settings set `tls_mode`/`tls_config`.
    pub fn from_config(
        cfg: &tokio_postgres::Config,
        application_name: &str,
    ) -> Result<Self, ProtocolError> {
        if !matches!(
            cfg.get_channel_binding(),
            ChannelBinding::Disable | ChannelBinding::Prefer
        ) {
            return Err(ProtocolError::Config(
                "the URL requires channel binding, which the replication connection does not \
                 support yet (SCRAM-SHA-256-PLUS)"
                    .into(),
            ));
        }
        let host = if let Some(addr) = cfg.get_hostaddrs().first() {
            addr.to_string()
        } else {
            match cfg.get_hosts().first() {
                Some(Host::Tcp(name)) => name.clone(),
                Some(Host::Unix(dir)) => dir
                    .to_str()
                    .ok_or_else(|| {
                        ProtocolError::Config(format!(
                            "the Unix socket directory {} is not valid UTF-8",
                            dir.display()
                        ))
                    })?
                    .to_owned(),
                None => {
                    return Err(ProtocolError::Config(
                        "the URL names no host: add host=... (or a socket directory)".into(),
                    ));
                }
            }
        };
        let port = cfg.get_ports().first().copied().unwrap_or(DEFAULT_PORT);
        let user = match cfg.get_user() {
            Some(user) => user.to_owned(),
            None => std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .map_err(|_| {
                    ProtocolError::Config(
                        "the URL names no user and USER/LOGNAME are not set: add user=...".into(),
                    )
                })?,
        };
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        let application_name = if !application_name.is_empty() {
            application_name.to_owned()
        } else {
            cfg.get_application_name().unwrap_or("pgduplex").to_owned()
        };
        let connect_timeout = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        Ok(ConnectParams {
            host,
            port,
            user,
            password: cfg.get_password().map(<[u8]>::to_vec),
            dbname,
            application_name,
            connect_timeout,
            tls_mode: match cfg.get_ssl_mode() {
                SslMode::Disable => TlsMode::Disable,
                SslMode::Prefer => TlsMode::Prefer,
                _ => TlsMode::Require,
            },
            tls_config: None,
        })
    }

    /// Whether `host` names a Unix socket directory rather than a TCP host.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The server as it appears in error messages and logs: `host:port`, or the socket file.
    /// Never contains the user or password.
    pub fn server_label(&self) -> String {
        if self.is_unix_socket() {
            format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port)
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> Result<ConnectParams, ProtocolError> {
        ConnectParams::from_config(&url.parse().unwrap(), "")
    }

    #[test]
    fn tcp_url() {
        let p = params("postgresql://alice:s3cret@db1:6543/shop?connect_timeout=3").unwrap();
        assert_eq!(p.host, "db1");
        assert_eq!(p.port, 6543);
        assert_eq!(p.user, "alice");
        assert_eq!(p.password.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(p.dbname, "shop");
        assert_eq!(p.application_name, "pgduplex");
        assert_eq!(p.connect_timeout, Duration::from_secs(3));
        assert_eq!(p.server_label(), "db1:6543");
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn unix_socket_and_defaults() {
        let p = ConnectParams::from_config(
            &"host=/tmp user=bob application_name=x".parse().unwrap(),
            "pgduplex_a_to_b",
        )
        .unwrap();
        assert_eq!(p.host, "/tmp");
        assert_eq!(p.port, DEFAULT_PORT);
        assert_eq!(p.dbname, "bob");
        assert_eq!(p.password, None);
        assert_eq!(p.application_name, "pgduplex_a_to_b");
        assert_eq!(p.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(p.is_unix_socket());
        assert_eq!(p.server_label(), "/tmp/.s.PGSQL.5432");
    }

    #[test]
    fn hostaddr_wins_and_ipv6_label() {
        let p = params("host=db1 hostaddr=::1 user=u port=7000").unwrap();
        assert_eq!(p.host, "::1");
        assert_eq!(p.server_label(), "[::1]:7000");
    }

    #[test]
    fn tls_mode_from_url_and_missing_host_refused() {
        let p = params("host=db1 user=u sslmode=require").unwrap();
        assert_eq!(p.tls_mode, TlsMode::Require);
        assert_eq!(params("host=db1 user=u").unwrap().tls_mode, TlsMode::Prefer);
        assert!(matches!(params("user=u"), Err(ProtocolError::Config(_))));
    }
}

//! [`ReplicationClient`]: startup, authentication and walsender commands, before streaming.

use std::collections::HashMap;
use std::io;

use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::tls::TlsMode;
use super::commands::{self, CreatedSlot, IdentifySystem, SnapshotAction};
use super::conn::{self, Conn, Socket};
use super::frame::{self, Backend};
use super::stream::ReplicationStream;
use super::version::parse_server_version;
use super::{ConnectParams, Lsn, ProtocolError};

/// A logged-in `replication=database` connection that accepts walsender commands
/// (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, plain SQL) until it is turned into a
/// [`ReplicationStream`] by [`ReplicationClient::start_logical_replication`].
///
/// It exists because tokio-postgres cannot open replication connections. It owns its socket
/// alone; methods take `&mut self`, so commands never interleave.
pub struct ReplicationClient {
    conn: Conn,
    parameters: HashMap<String, String>,
    server_version_num: u32,
    backend_pid: Option<i32>,
    /// A query was sent whose ReadyForQuery has not been read yet (its future was dropped):
    /// the next command first reads up to it, so results never get mixed up.
    pending_ready: bool,
    /// Set after an I/O or protocol error: the byte stream can no longer be trusted.
    broken: Option<String>,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("server", &self.conn.server())
            .field("server_version_num", &self.server_version_num)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Connects, sends the startup message with `replication=database` and
    /// `client_encoding=UTF8`, authenticates (trust, cleartext password, md5 or SCRAM-SHA-256
    /// without channel binding) and reads the server's parameters up to ReadyForQuery.
    ///
    /// All of it must finish within `params.connect_timeout` (unless zero), else
    /// [`ProtocolError::Timeout`]. A password the server rejects is
    /// [`ProtocolError::Server`] with SQLSTATE `28P01`; the password is never logged.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ProtocolError> {
        let server = params.server_label();
        tracing::debug!(server = %server, user = %params.user, dbname = %params.dbname,
            "opening replication connection");
        let attempt = Self::connect_inner(params, server.clone());
        if params.connect_timeout.is_zero() {
            return attempt.await;
        }
        match tokio::time::timeout(params.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ProtocolError::Timeout(format!(
                "connecting to {server} and logging in as {} took longer than connect_timeout \
                 ({:?})",
                params.user, params.connect_timeout
            ))),
        }
    }

    async fn connect_inner(params: &ConnectParams, server: String) -> Result<Self, ProtocolError> {
        let socket = open_socket(params, &server).await?;
        let socket = negotiate_tls(socket, params, &server).await?;
        let mut conn = Conn::new(socket, server);
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("application_name", params.application_name.as_str()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
        ];
        for (name, value) in startup {
            if value.contains('\0') {
                return Err(ProtocolError::Config(format!("{name} contains a NUL byte")));
            }
        }
        frontend::startup_message(startup, conn.write_buf()).map_err(|e| {
            ProtocolError::Config(format!("cannot encode the startup message: {e}"))
        })?;
        conn.flush("sending the startup message").await?;
        authenticate(&mut conn, params).await?;

        let mut parameters = HashMap::new();
        let mut backend_pid = None;
        loop {
            match conn.read_message("reading the startup reply").await? {
                Backend::Message(Message::ParameterStatus(body)) => {
                    let (name, value) = parameter(&body)?;
                    parameters.insert(name, value);
                }
                Backend::Message(Message::BackendKeyData(body)) => {
                    backend_pid = Some(body.process_id());
                }
                Backend::Message(Message::ReadyForQuery(_)) => break,
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(frame::server_error(&body));
                }
                other if conn.handle_async(&other) => {}
                other => {
                    return Err(ProtocolError::Protocol(format!(
                        "unexpected {} during startup",
                        conn::describe(&other)
                    )));
                }
            }
        }
        let version_text = parameters.get("server_version").ok_or_else(|| {
            ProtocolError::Protocol("the server did not report server_version at startup".into())
        })?;
        let server_version_num = parse_server_version(version_text).ok_or_else(|| {
            ProtocolError::Protocol(format!("cannot parse server_version {version_text:?}"))
        })?;
        tracing::debug!(server = %conn.server(), server_version_num, backend_pid,
            "replication connection ready");
        Ok(ReplicationClient {
            conn,
            parameters,
            server_version_num,
            backend_pid,
            pending_ready: false,
            broken: None,
        })
    }

    /// The server's version as `server_version_num` (150018 for 15.18, 180006 for 18.6), from
    /// the `server_version` it reported at startup. Commands and options differ by version
    /// (e.g. `origin` exists from 16 on).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// A run-time parameter the server reported (`server_version`, `server_encoding`,
    /// `integer_datetimes`, `TimeZone`...), as last reported.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The walsender's process id, for matching `pg_stat_replication.pid` or logs.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Runs one simple-protocol query (or walsender command) and returns every DataRow as text
    /// columns (`None` for NULL). A server error is returned after the server is ready again,
    /// so the connection stays usable.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ProtocolError> {
        let result = self.simple_query_inner(sql).await;
        self.note(result)
    }

    async fn simple_query_inner(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ProtocolError> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.conn.read_message("reading a query result").await? {
                Backend::Message(Message::DataRow(body)) => rows.push(frame::data_row_text(&body)?),
                Backend::Message(Message::RowDescription(_))
                | Backend::Message(Message::CommandComplete(_))
                | Backend::Message(Message::EmptyQueryResponse) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    error.get_or_insert(frame::server_error(&body));
                }
                Backend::Message(Message::ParameterStatus(body)) => self.store_parameter(&body)?,
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.pending_ready = false;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                other if self.conn.handle_async(&other) => {}
                other => {
                    return Err(ProtocolError::Protocol(format!(
                        "unexpected {} in reply to a simple query (COPY and START_REPLICATION \
                         are not run through simple_query)",
                        conn::describe(&other)
                    )));
                }
            }
        }
    }

    /// Runs `IDENTIFY_SYSTEM`: which cluster (system identifier), timeline and database this
    /// connection reached, and the current WAL flush position.
    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ProtocolError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        commands::parse_identify_system(&rows)
    }

    /// Creates a logical slot with the pgoutput plugin (`TEMPORARY` slots vanish when this
    /// connection closes). The snapshot action decides how the initial copy sees the data as
    /// of `consistent_point`; see [`SnapshotAction`].
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ProtocolError> {
        let sql =
            commands::create_logical_slot(slot, temporary, snapshot, self.server_version_num)?;
        tracing::info!(server = %self.conn.server(), slot, temporary, ?snapshot,
            "creating logical replication slot");
        let rows = self.simple_query(&sql).await?;
        commands::parse_created_slot(&rows)
    }

    /// Sends `START_REPLICATION SLOT "slot" LOGICAL start (options)` and waits for the server
    /// to switch to streaming (CopyBothResponse).
    ///
    /// `start` is a request: the server starts at the slot's `confirmed_flush_lsn` instead when
    /// that is later, so re-read the slot afterwards (DESIGN.md §2). Options are pgoutput's
    /// (`proto_version`, `publication_names`, `messages`, `origin` on 16+...), quoted here.
    /// On error the connection is consumed: reconnect to try again.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ProtocolError> {
        let sql = commands::start_replication(slot, start, options)?;
        tracing::info!(server = %self.conn.server(), slot, %start, "starting logical replication");
        self.send_query(&sql).await?;
        loop {
            match self
                .conn
                .read_message("waiting for the replication stream to start")
                .await?
            {
                Backend::CopyBothResponse => return Ok(ReplicationStream::new(self.conn)),
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(frame::server_error(&body));
                }
                other if self.conn.handle_async(&other) => {}
                other => {
                    return Err(ProtocolError::Protocol(format!(
                        "unexpected {} in reply to START_REPLICATION",
                        conn::describe(&other)
                    )));
                }
            }
        }
    }

    /// Sends Terminate and closes the socket. Dropping the client closes it too, less politely.
    pub async fn close(mut self) -> Result<(), ProtocolError> {
        frontend::terminate(self.conn.write_buf());
        self.conn.flush("sending Terminate").await
    }

    /// Finishes any query whose reply was abandoned, then sends a new one.
    async fn send_query(&mut self, sql: &str) -> Result<(), ProtocolError> {
        if let Some(why) = &self.broken {
            return Err(ProtocolError::Protocol(format!(
                "the replication connection to {} is unusable after an earlier error: {why}",
                self.conn.server()
            )));
        }
        if self.pending_ready {
            self.conn.flush("finishing an abandoned query").await?;
            loop {
                match self
                    .conn
                    .read_message("skipping an abandoned query's result")
                    .await?
                {
                    Backend::Message(Message::ReadyForQuery(_)) => break,
                    Backend::Message(Message::ParameterStatus(body)) => {
                        self.store_parameter(&body)?
                    }
                    Backend::CopyBothResponse
                    | Backend::Message(Message::CopyOutResponse(_))
                    | Backend::Message(Message::CopyInResponse(_)) => {
                        return Err(ProtocolError::Protocol(
                            "an abandoned query left the connection in COPY mode".into(),
                        ));
                    }
                    _ => {}
                }
            }
            self.pending_ready = false;
        }
        if sql.contains('\0') {
            return Err(ProtocolError::Config(
                "a query cannot contain a NUL byte".into(),
            ));
        }
        frontend::query(sql, self.conn.write_buf())
            .map_err(|e| ProtocolError::Config(format!("cannot encode the query: {e}")))?;
        self.pending_ready = true;
        self.conn.flush("sending a query").await
    }

    fn store_parameter(
        &mut self,
        body: &postgres_protocol::message::backend::ParameterStatusBody,
    ) -> Result<(), ProtocolError> {
        let (name, value) = parameter(body)?;
        self.parameters.insert(name, value);
        Ok(())
    }

    /// Marks the connection unusable after an error that desynchronized the byte stream.
    fn note<T>(&mut self, result: Result<T, ProtocolError>) -> Result<T, ProtocolError> {
        if let Err(e) = &result
            && !matches!(e, ProtocolError::Server { .. } | ProtocolError::Config(_))
        {
            self.broken.get_or_insert_with(|| e.to_string());
        }
        result
    }
}

fn parameter(
    body: &postgres_protocol::message::backend::ParameterStatusBody,
) -> Result<(String, String), ProtocolError> {
    let bad = |e: io::Error| ProtocolError::Protocol(format!("malformed ParameterStatus: {e}"));
    Ok((
        body.name().map_err(bad)?.to_owned(),
        body.value().map_err(bad)?.to_owned(),
    ))
}

/// Opens the TCP connection (trying each resolved address in turn) or the Unix socket.
async fn open_socket(params: &ConnectParams, server: &str) -> Result<Socket, ProtocolError> {
    if params.is_unix_socket() {
        let stream = UnixStream::connect(server)
            .await
            .map_err(|e| ProtocolError::io(format!("connecting to Unix socket {server}"), e))?;
        return Ok(Socket::Unix(stream));
    }
    let addrs = tokio::net::lookup_host((params.host.as_str(), params.port))
        .await
        .map_err(|e| ProtocolError::io(format!("resolving {server}"), e))?;
    let mut last_error = None;
    for addr in addrs {
        match connect_tcp(addr).await {
            Ok(stream) => return Ok(Socket::Tcp(stream)),
            Err(e) => {
                tracing::debug!(server = %server, %addr, error = %e, "connect attempt failed");
                last_error = Some(ProtocolError::io(
                    format!("connecting to {server} ({addr})"),
                    e,
                ));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        ProtocolError::io(
            format!("resolving {server}"),
            io::Error::new(
                io::ErrorKind::NotFound,
                "the host name resolved to no address",
            ),
        )
    }))
}

/// Asks the server for TLS (SSLRequest) when `params.tls_mode` wants it and upgrades the
/// socket. A server that declines is refused unless the mode is `prefer`.
async fn negotiate_tls(socket: Socket, params: &ConnectParams, server: &str) -> Result<Socket, ProtocolError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Socket::Tcp(mut tcp) = socket else { return Ok(socket) };
    if params.tls_mode == TlsMode::Disable {
        return Ok(Socket::Tcp(tcp));
    }
    let mut request = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(|e| ProtocolError::io(format!("sending SSLRequest to {server}"), e))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| ProtocolError::io(format!("reading the SSLRequest answer of {server}"), e))?;
    match answer[0] {
        b'S' => {}
        b'N' if !params.tls_mode.required() => return Ok(Socket::Tcp(tcp)),
        b'N' => {
            return Err(ProtocolError::Config(format!(
                "{server} does not accept TLS connections, but the URL's sslmode requires TLS"
            )));
        }
        other => {
            return Err(ProtocolError::Protocol(format!("{server} answered SSLRequest with {other:#04x}")));
        }
    }
    let config = match &params.tls_config {
        Some(c) => c.clone(),
        None => crate::tls::TlsSettings { mode: params.tls_mode, root_cert: None }
            .client_config()
            .map_err(|e| ProtocolError::Config(e.to_string()))?,
    };
    let name = rustls::pki_types::ServerName::try_from(params.host.clone())
        .map_err(|e| ProtocolError::Config(format!("{} is not a valid TLS server name: {e}", params.host)))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ProtocolError::io(format!("TLS handshake with {server}"), e))?;
    Ok(Socket::Tls(Box::new(tls)))
}

/// TCP with keepalives (a dead peer is noticed even while we only read) and no Nagle delay
/// (status updates are small and should leave at once).
async fn connect_tcp(addr: std::net::SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_keepalive(true)?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Answers the server's authentication request, up to AuthenticationOk.
async fn authenticate(conn: &mut Conn, params: &ConnectParams) -> Result<(), ProtocolError> {
    let password = || {
        params.password.as_deref().ok_or_else(|| {
            ProtocolError::Auth(format!(
                "{} asks for a password for user {:?}, but the connection URL has none",
                params.server_label(),
                params.user
            ))
        })
    };
    match conn
        .read_message("reading the authentication request")
        .await?
    {
        Backend::Message(Message::AuthenticationOk) => return Ok(()),
        Backend::Message(Message::AuthenticationCleartextPassword) => {
            let password = password()?;
            frontend::password_message(password, conn.write_buf())
                .map_err(|e| ProtocolError::Auth(format!("cannot encode the password: {e}")))?;
            conn.flush("sending the password").await?;
        }
        Backend::Message(Message::AuthenticationMd5Password(body)) => {
            let hash = md5_hash(params.user.as_bytes(), password()?, body.salt());
            frontend::password_message(hash.as_bytes(), conn.write_buf())
                .map_err(|e| ProtocolError::Auth(format!("cannot encode the md5 hash: {e}")))?;
            conn.flush("sending the md5 password hash").await?;
        }
        Backend::Message(Message::AuthenticationSasl(body)) => {
            let mut mechanisms = body.mechanisms();
            let mut offered = Vec::new();
            loop {
                match mechanisms.next() {
                    Ok(Some(m)) => offered.push(m.to_owned()),
                    Ok(None) => break,
                    Err(e) => {
                        return Err(ProtocolError::Protocol(format!(
                            "malformed SASL mechanism list: {e}"
                        )));
                    }
                }
            }
            if !offered.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                return Err(ProtocolError::Auth(format!(
                    "the server offers SASL mechanisms {offered:?}; only {} is supported",
                    sasl::SCRAM_SHA_256
                )));
            }
            scram_sha_256(conn, password()?).await?;
        }
        Backend::Message(Message::ErrorResponse(body)) => return Err(frame::server_error(&body)),
        Backend::Message(
            Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential,
        ) => {
            return Err(ProtocolError::Auth(format!(
                "{} asks for GSSAPI/SSPI/Kerberos/SCM authentication, which is not supported: \
                 use scram-sha-256, md5, password or trust in pg_hba.conf",
                params.server_label()
            )));
        }
        other => {
            return Err(ProtocolError::Protocol(format!(
                "unexpected {} instead of an authentication request",
                conn::describe(&other)
            )));
        }
    }
    match conn
        .read_message("reading the authentication result")
        .await?
    {
        Backend::Message(Message::AuthenticationOk) => Ok(()),
        Backend::Message(Message::ErrorResponse(body)) => Err(frame::server_error(&body)),
        other => Err(ProtocolError::Protocol(format!(
            "unexpected {} instead of AuthenticationOk",
            conn::describe(&other)
        ))),
    }
}

/// SCRAM-SHA-256 without channel binding (no TLS yet, so `n,,`): client-first, server-first,
/// client-final, then the server's proof is checked by `finish`.
async fn scram_sha_256(conn: &mut Conn, password: &[u8]) -> Result<(), ProtocolError> {
    let mut scram = sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), conn.write_buf())
        .map_err(|e| ProtocolError::Auth(format!("cannot encode SCRAM client-first: {e}")))?;
    conn.flush("sending SCRAM client-first").await?;
    match conn.read_message("reading SCRAM server-first").await? {
        Backend::Message(Message::AuthenticationSaslContinue(body)) => scram
            .update(body.data())
            .map_err(|e| ProtocolError::Auth(format!("SCRAM server-first rejected: {e}")))?,
        Backend::Message(Message::ErrorResponse(body)) => return Err(frame::server_error(&body)),
        other => {
            return Err(ProtocolError::Protocol(format!(
                "unexpected {} instead of SCRAM server-first",
                conn::describe(&other)
            )));
        }
    }
    frontend::sasl_response(scram.message(), conn.write_buf())
        .map_err(|e| ProtocolError::Auth(format!("cannot encode SCRAM client-final: {e}")))?;
    conn.flush("sending SCRAM client-final").await?;
    match conn.read_message("reading SCRAM server-final").await? {
        Backend::Message(Message::AuthenticationSaslFinal(body)) => {
            scram.finish(body.data()).map_err(|e| {
                ProtocolError::Auth(format!(
                    "the server's SCRAM proof is wrong (is this the right server?): {e}"
                ))
            })
        }
        Backend::Message(Message::ErrorResponse(body)) => Err(frame::server_error(&body)),
        other => Err(ProtocolError::Protocol(format!(
            "unexpected {} instead of SCRAM server-final",
            conn::describe(&other)
        ))),
    }
}

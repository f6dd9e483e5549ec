//! The one owner of a replication socket: buffered, cancel-safe reads of whole backend
//! messages, and writes that survive cancellation.
//!
//! Reads go through one `BytesMut`: [`Conn::read_message`] first looks for a complete frame in
//! the buffer and only then awaits `read_buf`, which is cancel-safe (bytes read are in the
//! buffer, or nothing was read). So dropping a pending read (the other branch of a
//! `tokio::select!` won) loses no data and never leaves half a frame consumed.
//!
//! Writes go through a second buffer: a message is appended whole, then flushed with
//! `write_buf`, which advances the buffer by what the kernel took. If a write is cancelled, the
//! rest of the message stays buffered and goes out first on the next write, so the server
//! never sees a torn frame followed by a new one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::ProtocolError;
use super::frame::{self, Backend};

/// Read at least this much per `read_buf` (bigger for big frames, up to [`MAX_READ_RESERVE`]).
const MIN_READ_RESERVE: usize = 8 * 1024;
/// Reserve at most this much, or as much as is already buffered, per read: a large frame grows
/// the buffer as its bytes arrive, not when its length field is read.
const MAX_READ_RESERVE: usize = 1024 * 1024;

/// A TCP or Unix stream (or an in-memory pipe in unit tests).
pub enum Socket {
    /// `host:port`.
    Tcp(TcpStream),
    /// `<dir>/.s.PGSQL.<port>`.
    Unix(UnixStream),
    /// TCP with TLS (boxed: the TLS state is large).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A fake server in unit tests.
    #[cfg(test)]
    Test(tokio::io::DuplexStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(test)]
            Socket::Test(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(test)]
            Socket::Test(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            Socket::Test(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            Socket::Test(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A socket with its read and write buffers, and the server's label for error messages.
pub struct Conn {
    socket: Socket,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// `host:port` or the socket path: every I/O error names it.
    server: String,
    /// See [`Conn::set_read_coalescing`].
    coalesce: Option<std::time::Duration>,
    /// The last read emptied the socket (returned less than the room it was given).
    last_read_small: bool,
}

/// Room offered to each read while coalescing, so a read can take everything that arrived.
const COALESCE_READ_RESERVE: usize = 512 * 1024;

impl Conn {
    /// Wraps a connected socket.
    pub fn new(socket: Socket, server: String) -> Self {
        Conn {
            socket,
            read_buf: BytesMut::with_capacity(MIN_READ_RESERVE),
            write_buf: BytesMut::new(),
            coalesce: None,
            last_read_small: false,
            server,
        }
    }

    /// The server label (`host:port` or socket path), never credentials.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The write buffer, to append whole frontend messages to before [`Conn::flush`].
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Writes out everything buffered. Cancel-safe in the sense described in the module docs.
    pub async fn flush(&mut self, step: &str) -> Result<(), ProtocolError> {
        while !self.write_buf.is_empty() {
            let n = self
                .socket
                .write_buf(&mut self.write_buf)
                .await
                .map_err(|e| ProtocolError::io(format!("{step} ({})", self.server), e))?;
            if n == 0 {
                return Err(ProtocolError::io(
                    format!("{step} ({})", self.server),
                    io::Error::new(io::ErrorKind::WriteZero, "server closed the connection"),
                ));
            }
        }
        self.socket
            .flush()
            .await
            .map_err(|e| ProtocolError::io(format!("{step} ({})", self.server), e))
    }

    /// The next backend message; an end of stream is an error here (see
    /// [`Conn::read_message_or_eof`]). Cancel-safe.
    pub async fn read_message(&mut self, step: &str) -> Result<Backend, ProtocolError> {
        match self.read_message_or_eof(step).await? {
            Some(message) => Ok(message),
            None => Err(ProtocolError::io(
                format!("{step} ({})", self.server),
                io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"),
            )),
        }
    }

    /// Read coalescing: after a read that returned little (the peer writes message by message),
    /// wait `delay` before reading again, so one read takes many messages instead of one
    /// wake-up and one system call per message. It trades at most `delay` of latency for far
    /// less CPU while a stream catches up, CPU that the walsender on a small machine needs.
    pub fn set_read_coalescing(&mut self, delay: Option<std::time::Duration>) {
        self.coalesce = delay;
    }

    /// The next backend message, or `None` when the server closed the connection between two
    /// messages. A close in the middle of a message is an error. Cancel-safe.
    pub async fn read_message_or_eof(
        &mut self,
        step: &str,
    ) -> Result<Option<Backend>, ProtocolError> {
        loop {
            if let Some(message) = frame::split_message(&mut self.read_buf)? {
                return Ok(Some(message));
            }
            // Room for the rest of the frame, but never more than what has already arrived
            // (or MAX_READ_RESERVE): a big frame grows the buffer geometrically as its bytes
            // come in (amortized O(n) copying), and a lying length field allocates nothing.
            let missing = frame::bytes_missing(&self.read_buf).unwrap_or(0);
            let cap = MAX_READ_RESERVE.max(self.read_buf.len());
            let min = if self.coalesce.is_some() { COALESCE_READ_RESERVE } else { MIN_READ_RESERVE };
            self.read_buf.reserve(missing.clamp(min, cap.max(min)));
            if let (Some(delay), true) = (self.coalesce, self.last_read_small) {
                // Cancel-safe: nothing is held across this await.
                tokio::time::sleep(delay).await;
                self.last_read_small = false;
            }
            let room = self.read_buf.capacity() - self.read_buf.len();
            let n = self
                .socket
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| ProtocolError::io(format!("{step} ({})", self.server), e))?;
            self.last_read_small = n < room;
            if n == 0 {
                if self.read_buf.is_empty() {
                    return Ok(None);
                }
                return Err(ProtocolError::io(
                    format!("{step} ({})", self.server),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "server closed the connection in the middle of a message ({} bytes \
                             buffered)",
                            self.read_buf.len()
                        ),
                    ),
                ));
            }
        }
    }

    /// Logs a NoticeResponse (warnings at `warn`, the rest at `debug`).
    pub fn log_notice(&self, body: &postgres_protocol::message::backend::NoticeResponseBody) {
        match frame::parse_fields(body.fields()) {
            Ok(n) if n.severity == "WARNING" => tracing::warn!(
                server = %self.server, code = %n.code, detail = ?n.detail,
                "server warning: {}", n.message
            ),
            Ok(n) => tracing::debug!(
                server = %self.server, severity = %n.severity, code = %n.code,
                "server notice: {}", n.message
            ),
            Err(e) => tracing::debug!(server = %self.server, error = %e, "undecodable notice"),
        }
    }

    /// Whether a message is one the server may send at any time (notice, parameter change,
    /// notification), which callers skip after [`Conn::handle_async`].
    pub fn handle_async(&self, message: &Backend) -> bool {
        match message {
            Backend::Message(Message::NoticeResponse(body)) => {
                self.log_notice(body);
                true
            }
            Backend::Message(Message::ParameterStatus(_))
            | Backend::Message(Message::NotificationResponse(_)) => true,
            _ => false,
        }
    }
}

/// A short name of a backend message for "unexpected message" errors.
pub fn describe(message: &Backend) -> &'static str {
    match message {
        Backend::CopyBothResponse => "CopyBothResponse",
        Backend::Message(m) => match m {
            Message::AuthenticationOk => "AuthenticationOk",
            Message::AuthenticationCleartextPassword
            | Message::AuthenticationMd5Password(_)
            | Message::AuthenticationSasl(_)
            | Message::AuthenticationSaslContinue(_)
            | Message::AuthenticationSaslFinal(_)
            | Message::AuthenticationGss
            | Message::AuthenticationGssContinue(_)
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationSspi => "an authentication request",
            Message::BackendKeyData(_) => "BackendKeyData",
            Message::CommandComplete(_) => "CommandComplete",
            Message::CopyData(_) => "CopyData",
            Message::CopyDone => "CopyDone",
            Message::CopyInResponse(_) => "CopyInResponse",
            Message::CopyOutResponse(_) => "CopyOutResponse",
            Message::DataRow(_) => "DataRow",
            Message::EmptyQueryResponse => "EmptyQueryResponse",
            Message::ErrorResponse(_) => "ErrorResponse",
            Message::NoticeResponse(_) => "NoticeResponse",
            Message::ParameterStatus(_) => "ParameterStatus",
            Message::ReadyForQuery(_) => "ReadyForQuery",
            Message::RowDescription(_) => "RowDescription",
            _ => "an extended-query message",
        },
    }
}

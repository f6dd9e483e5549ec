//! [`ReplicationStream`]: the CopyBoth phase after `START_REPLICATION`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::{self, Conn};
use super::frame::{self, Backend};
use super::standby_status::StandbyStatus;
use super::{Lsn, ProtocolError, keepalive, pg_epoch_micros_now, xlog_data};

/// How long [`ReplicationStream::close`] waits for the server to finish before dropping the
/// socket (so the server logs a clean disconnect rather than a reset).
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One message of the replication stream, decoded from a CopyData frame.
///
/// It exists so the pipeline sees typed LSNs and times, never raw frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A chunk of decoded WAL: one pgoutput message in `data`.
    XLogData {
        /// WAL position of this message (for pgoutput, the LSN the message belongs to; 0/0 for
        /// some messages).
        wal_start: Lsn,
        /// The server's current end of WAL when it sent this; NOT the end of this message, and
        /// not a position that may be confirmed (see the module docs).
        wal_end: Lsn,
        /// Server clock at sending, µs since 2000-01-01 UTC (lag metrics).
        send_time: i64,
        /// The pgoutput message (first byte: `B` Begin, `C` Commit, `R` Relation, ...).
        data: Bytes,
    },
    /// The server's heartbeat.
    PrimaryKeepalive {
        /// The server's current end of WAL. It may be confirmed only when no transaction is
        /// open and everything received has been applied and flushed (DESIGN.md §5).
        wal_end: Lsn,
        /// Server clock at sending, µs since 2000-01-01 UTC.
        send_time: i64,
        /// The server wants a standby status update now, or will time us out
        /// (`wal_sender_timeout`).
        reply_requested: bool,
    },
}

impl ReplicationMessage {
    /// Decodes a CopyData body (`w` XLogData or `k` keepalive). Any other sub-tag is an error:
    /// unknown traffic is never skipped silently.
    pub fn parse(body: Bytes) -> Result<ReplicationMessage, ProtocolError> {
        match body.first() {
            Some(&xlog_data::TAG) => xlog_data::parse(body),
            Some(&keepalive::TAG) => keepalive::parse(&body),
            Some(&other) => Err(ProtocolError::Protocol(format!(
                "unknown replication message {} in CopyData",
                frame::tag_name(other)
            ))),
            None => Err(ProtocolError::Protocol(
                "empty CopyData in the replication stream".into(),
            )),
        }
    }
}

/// The streaming half of a replication connection: reads XLogData and keepalives, sends
/// standby status updates. Made by
/// [`ReplicationClient::start_logical_replication`](super::ReplicationClient::start_logical_replication).
///
/// It exists so that the pipeline's `tokio::select!` loop can race [`next`](Self::next)
/// against timers safely: `next` is cancel-safe, and this type is the socket's only owner.
pub struct ReplicationStream {
    conn: Conn,
    /// The server ended the copy (CopyDone, CommandComplete, clean close): `next` returns
    /// `None` from now on.
    ended: bool,
    /// Last flush LSN sent, to check that reports never go backwards.
    last_flush: Lsn,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("server", &self.conn.server())
            .field("ended", &self.ended)
            .field("last_flush", &self.last_flush)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn new(conn: Conn) -> Self {
        ReplicationStream {
            conn,
            ended: false,
            last_flush: Lsn::ZERO,
        }
    }

    /// Turns read coalescing on (`Some(delay)`) or off; see [`Conn::set_read_coalescing`].
    pub fn set_read_coalescing(&mut self, delay: Option<std::time::Duration>) {
        self.conn.set_read_coalescing(delay);
    }

    /// The next XLogData or keepalive.
    ///
    /// `Ok(None)` once the server ended the stream: it sent CopyDone or CommandComplete, or
    /// closed the connection between two messages. An ErrorResponse (e.g. `57P01` on server
    /// shutdown, or the slot was dropped) is `Err(ProtocolError::Server)`; a close in the
    /// middle of a message is `Err(ProtocolError::Io)`.
    ///
    /// Cancel-safe: if the future is dropped before it completes (another `select!` branch
    /// won), no message is lost; a partly received message stays buffered for the next call.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ProtocolError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            let Some(message) = self
                .conn
                .read_message_or_eof("reading the replication stream")
                .await?
            else {
                tracing::info!(server = %self.conn.server(),
                    "server closed the replication connection");
                self.ended = true;
                return Ok(None);
            };
            // From here on nothing awaits: the message is handled whole or not taken at all.
            match message {
                Backend::Message(Message::CopyData(body)) => {
                    return ReplicationMessage::parse(body.into_bytes()).map(Some);
                }
                Backend::Message(Message::CopyDone)
                | Backend::Message(Message::CommandComplete(_)) => {
                    tracing::info!(server = %self.conn.server(), "server ended the replication stream");
                    self.ended = true;
                    return Ok(None);
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    self.ended = true;
                    return Err(frame::server_error(&body));
                }
                other if self.conn.handle_async(&other) => {}
                other => {
                    return Err(ProtocolError::Protocol(format!(
                        "unexpected {} in the replication stream",
                        conn::describe(&other)
                    )));
                }
            }
        }
    }

    /// Sends a standby status update (`r`) stamped with the current time.
    ///
    /// `flush` becomes the slot's `confirmed_flush_lsn`: it must be the end LSN of a source
    /// transaction whose apply is committed and flushed on the target, or a keepalive's
    /// `wal_end` when nothing is in flight (see the module docs). Invariants (checked in debug
    /// builds): `write >= flush`, and `flush` never goes backwards on one stream.
    ///
    /// If this future is dropped half-way, the rest of the message is sent first by the next
    /// call or by [`close`](Self::close); the server never sees a torn message.
    pub async fn send_standby_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ProtocolError> {
        debug_assert!(
            write >= flush,
            "standby status write {write} < flush {flush}"
        );
        debug_assert!(
            flush >= self.last_flush,
            "standby status flush went backwards: {} -> {flush}",
            self.last_flush
        );
        let status = StandbyStatus {
            write,
            flush,
            apply,
            client_time: pg_epoch_micros_now(),
            reply_requested,
        };
        let mut body = BytesMut::with_capacity(super::standby_status::LEN);
        status.encode(&mut body);
        frontend::CopyData::new(body.freeze())
            .map_err(|e| ProtocolError::Protocol(format!("cannot frame a status update: {e}")))?
            .write(self.conn.write_buf());
        self.last_flush = self.last_flush.max(flush);
        tracing::trace!(server = %self.conn.server(), %write, %flush, %apply, reply_requested,
            "sending standby status update");
        self.conn.flush("sending a standby status update").await
    }

    /// Ends the stream politely: CopyDone (unless the server already ended it) and Terminate,
    /// then reads what the server still sends, for up to 2 s, so the socket closes cleanly.
    /// Best effort: an error means the connection was already gone, which is fine to ignore.
    pub async fn close(mut self) -> Result<(), ProtocolError> {
        if !self.ended {
            frontend::copy_done(self.conn.write_buf());
        }
        frontend::terminate(self.conn.write_buf());
        self.conn.flush("sending CopyDone and Terminate").await?;
        let drain =
            async { while let Ok(Some(_)) = self.conn.read_message_or_eof("closing").await {} };
        let _ = tokio::time::timeout(CLOSE_DRAIN_TIMEOUT, drain).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conn::Socket;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = ReplicationMessage::parse(Bytes::from(bytes));
        }
    }

    /// The pipeline spawns tasks around these: the types and their futures must be `Send`.
    #[allow(dead_code)]
    fn futures_are_send(
        params: crate::protocol::ConnectParams,
        mut client: crate::protocol::ReplicationClient,
        mut stream: ReplicationStream,
    ) {
        fn send<T: Send>(_: &T) {}
        send(&crate::protocol::ReplicationClient::connect(&params));
        send(&client.simple_query("SELECT 1"));
        send(&client.identify_system());
        send(&stream.next());
        send(&stream.send_standby_status(Lsn(1), Lsn(1), Lsn(1), false));
        send(&client.start_logical_replication("s", Lsn(1), &[]));
        send(&stream.close());
    }

    /// A large frame arriving in small pieces is reassembled whole.
    #[tokio::test]
    async fn large_frame_in_pieces() {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut stream = ReplicationStream::new(Conn::new(Socket::Test(ours), "fake:5432".into()));
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let wire = frame(b'd', &xlog_data::encode(Lsn(1), Lsn(2), 3, &payload));
        let writer = tokio::spawn(async move {
            theirs.write_all(&wire).await.unwrap();
            theirs
        });
        match stream.next().await.unwrap() {
            Some(ReplicationMessage::XLogData { data, .. }) => assert!(data == payload),
            other => panic!("expected XLogData, got {other:?}"),
        }
        drop(writer.await.unwrap());
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn fake() -> (ReplicationStream, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64);
        (
            ReplicationStream::new(Conn::new(Socket::Test(ours), "fake:5432".into())),
            theirs,
        )
    }

    fn expected_messages() -> Vec<ReplicationMessage> {
        (0..50u64)
            .map(|i| {
                if i % 3 == 0 {
                    ReplicationMessage::PrimaryKeepalive {
                        wal_end: Lsn(i),
                        send_time: i as i64,
                        reply_requested: i % 2 == 0,
                    }
                } else {
                    ReplicationMessage::XLogData {
                        wal_start: Lsn(i),
                        wal_end: Lsn(i + 100),
                        send_time: -(i as i64),
                        data: Bytes::from(vec![b'B'; i as usize * 7]),
                    }
                }
            })
            .collect()
    }

    fn encode(m: &ReplicationMessage) -> Vec<u8> {
        let body = match m {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => xlog_data::encode(*wal_start, *wal_end, *send_time, data),
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                send_time,
                reply_requested,
            } => keepalive::encode(*wal_end, *send_time, *reply_requested),
        };
        frame(b'd', &body)
    }

    /// The server dribbles frames one byte at a time while the reader's `next()` keeps losing
    /// a `select!` race: every message still arrives whole and in order.
    #[tokio::test]
    async fn next_is_cancel_safe() {
        let (mut stream, mut server) = fake();
        let expected = expected_messages();
        let wire: Vec<u8> = expected
            .iter()
            .flat_map(encode)
            .chain(frame(b'c', b""))
            .collect();
        let writer = tokio::spawn(async move {
            for byte in wire {
                server.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            server
        });
        let mut got = Vec::new();
        let mut cancelled = 0u32;
        loop {
            tokio::select! {
                biased;
                m = stream.next() => match m.unwrap() {
                    Some(m) => got.push(m),
                    None => break,
                },
                _ = tokio::task::yield_now() => cancelled += 1,
            }
        }
        assert_eq!(got, expected);
        assert!(
            cancelled > 100,
            "the race was exercised ({cancelled} cancellations)"
        );
        assert_eq!(stream.next().await.unwrap(), None, "stays ended");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn status_update_bytes_and_close() {
        let (mut stream, mut server) = fake();
        stream
            .send_standby_status(Lsn(30), Lsn(20), Lsn(10), true)
            .await
            .unwrap();
        let mut buf = [0u8; 5 + super::super::standby_status::LEN];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[0], b'd');
        assert_eq!(&buf[1..5], &(4 + 34u32).to_be_bytes());
        let status = StandbyStatus::parse(&buf[5..]).unwrap();
        assert_eq!(
            (status.write, status.flush, status.apply),
            (Lsn(30), Lsn(20), Lsn(10))
        );
        assert!(status.reply_requested);
        assert!((pg_epoch_micros_now() - status.client_time).abs() < 60_000_000);

        // close: CopyDone + Terminate, then the server hangs up
        let closer = tokio::spawn(stream.close());
        let mut tail = [0u8; 10];
        server.read_exact(&mut tail).await.unwrap();
        assert_eq!(tail, [b'c', 0, 0, 0, 4, b'X', 0, 0, 0, 4]);
        drop(server);
        closer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn error_eof_and_garbage() {
        let (mut stream, mut server) = fake();
        let mut err = Vec::new();
        for (t, v) in [
            (b'S', "FATAL"),
            (b'C', "57P01"),
            (b'M', "terminating connection"),
        ] {
            err.push(t);
            err.extend_from_slice(v.as_bytes());
            err.push(0);
        }
        err.push(0);
        server.write_all(&frame(b'E', &err)).await.unwrap();
        let e = stream.next().await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("57P01"));
        assert!(e.is_retryable());

        let (mut stream, server) = fake();
        drop(server);
        assert_eq!(
            stream.next().await.unwrap(),
            None,
            "clean close ends the stream"
        );

        let (mut stream, mut server) = fake();
        server
            .write_all(&frame(b'd', b"kshort")[..8])
            .await
            .unwrap();
        drop(server);
        assert!(matches!(stream.next().await, Err(ProtocolError::Io { .. })));

        let (mut stream, mut server) = fake();
        server.write_all(&frame(b'd', b"zzz")).await.unwrap();
        assert!(matches!(
            stream.next().await,
            Err(ProtocolError::Protocol(_))
        ));

        let (mut stream, mut server) = fake();
        let mut notice = Vec::new();
        notice.extend_from_slice(b"SWARNING\0CXX000\0Mhello\0\0");
        server.write_all(&frame(b'N', &notice)).await.unwrap();
        server
            .write_all(&frame(b'd', &keepalive::encode(Lsn(5), 1, false)))
            .await
            .unwrap();
        assert!(matches!(
            stream.next().await.unwrap(),
            Some(ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(5),
                ..
            })
        ));
    }
}

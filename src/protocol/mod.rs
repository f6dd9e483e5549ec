//! The replication connection to a source server: startup and authentication, walsender
//! commands, the CopyBoth stream of XLogData and keepalives, and standby status updates.
//!
//! The crates.io tokio-postgres has no replication support, so this module speaks the protocol
//! itself over a tokio TCP or Unix socket, with postgres-protocol's encoders, backend parser
//! and SCRAM client. (It does not know CopyBothResponse, which [`frame`] handles by hand.)
//!
//! ```text
//! ReplicationClient::connect --> identify_system / create_logical_slot / simple_query
//!        |
//!        +-- start_logical_replication --> ReplicationStream: next() -> XLogData | keepalive
//!                                                           send_standby_status(write, flush, apply)
//! ```
//!
//! Layout: pure parts ([`frame`], [`xlog_data`], [`keepalive`], [`standby_status`],
//! [`commands`], [`version`]) do no I/O and are unit/property tested; `conn` owns the socket
//! (one owner, buffered, cancel-safe reads); `client` and `stream` are the two phases.
//!
//! # Which LSN the caller may report
//!
//! The standby status update carries three positions. For a logical slot the server treats
//! `flush` as "the subscriber has this durably": it becomes the slot's `confirmed_flush_lsn`,
//! the server may then recycle older WAL, and after a reconnect it resumes decoding at the first
//! transaction that *commits after* that point. So:
//!
//! - `flush` must never exceed the commit end LSN of the last source transaction whose changes
//!   are **committed and flushed on the target** (DESIGN.md §5: read it from
//!   `pg_replication_origin_session_progress(true)`, which flushes the target's WAL first).
//!   Reporting more, e.g. the end of a transaction that is merely decoded, queued or applied
//!   but not yet durable, means a target crash loses a transaction the source has forgotten.
//! - Neither XLogData's `wal_end` nor `wal_start` is such a position: `wal_end` is the server's
//!   current end of WAL, possibly far ahead of what has been sent.
//! - A keepalive's `wal_end` may be confirmed only when no transaction is open, nothing
//!   received is waiting to be applied, and everything applied is flushed: then no transaction
//!   commits in between, and an idle slot can still advance (PG 15+ sends no empty
//!   transactions).
//! - `write` may be larger (what has been received and queued) but is at least `flush`; both
//!   never go backwards on one stream. `apply` is reported equal to `flush` by the pipeline.
//!
//! Reporting less than allowed is always safe: it only holds WAL and re-sends transactions
//! after a reconnect, which the exactly-once apply (origin progress) skips.
//!
//! The server expects an update at least every `wal_sender_timeout` and at once when a
//! keepalive has `reply_requested`; the pipeline sends one at least every
//! min(1 s, wal_sender_timeout / 2) regardless (DESIGN.md §2).

mod client;
pub mod commands;
mod conn;
mod error;
pub mod frame;
pub mod keepalive;
mod params;
pub mod standby_status;
mod stream;
pub mod version;
pub mod xlog_data;

pub use crate::lsn::Lsn;
pub use client::ReplicationClient;
pub use commands::{CreatedSlot, IdentifySystem, SnapshotAction};
pub use error::ProtocolError;
pub use params::{ConnectParams, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PORT};
pub use stream::{ReplicationMessage, ReplicationStream};

/// Microseconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Now, in microseconds since 2000-01-01 UTC: the clock of standby status updates and of the
/// send/commit times in the stream, so lag can be computed without conversions.
pub fn pg_epoch_micros_now() -> i64 {
    let unix_micros = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    };
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_epoch_is_after_2024() {
        // 2024-01-01 is 24 years (6 leap days) after 2000-01-01.
        let y2024 = (24 * 365 + 6) * 86_400 * 1_000_000i64;
        assert!(pg_epoch_micros_now() > y2024);
    }
}

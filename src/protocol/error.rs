//! The one error type of the replication connection, and whether retrying can help.

/// Everything that can go wrong on a replication connection.
///
/// It exists so that the pipeline can choose between reconnecting, waiting and retrying, or
/// stopping with a message for the operator, without parsing strings: see
/// [`ProtocolError::is_retryable`] and [`ProtocolError::sqlstate`].
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A socket-level failure (connect, read, write, unexpected end of stream). `context` names
    /// the server (`host:port` or the Unix socket path) and the step that failed.
    #[error("{context}: {source}")]
    Io {
        /// Which server and which step, e.g. `reading the startup reply from db1:5432`.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The server answered with an ErrorResponse.
    #[error("server error {code}: {message}{}{}",
        detail.as_deref().map(|d| format!(" (detail: {d})")).unwrap_or_default(),
        hint.as_deref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
    Server {
        /// The SQLSTATE, e.g. `28P01` for a wrong password.
        code: String,
        /// The primary, human-readable message.
        message: String,
        /// Optional secondary message with more detail.
        detail: Option<String>,
        /// Optional suggestion of what to do.
        hint: Option<String>,
    },

    /// Authentication could not be carried out on our side: no password was given but the
    /// server asks for one, the server asks for a method we do not implement, or the server's
    /// SCRAM proof is wrong. A password the server rejects arrives as [`ProtocolError::Server`]
    /// with SQLSTATE `28P01` instead.
    #[error("authentication failed: {0}")]
    Auth(String),

    /// The server sent something the protocol does not allow at this point, or a malformed
    /// frame. This is a bug on one side or a corrupted stream; retrying will not fix it.
    #[error("protocol violation: {0}")]
    Protocol(String),

    /// A step did not finish within its time limit (e.g. connect + startup within
    /// `connect_timeout`).
    #[error("timed out: {0}")]
    Timeout(String),

    /// The connection parameters cannot be used (no host, TLS required, a NUL byte in a name..).
    #[error("invalid connection parameters: {0}")]
    Config(String),
}

impl ProtocolError {
    /// Whether the same operation, retried later on a fresh connection, can be expected to
    /// succeed without anyone changing anything.
    ///
    /// Retryable:
    /// - [`Io`](Self::Io) and [`Timeout`](Self::Timeout): the network or the server went away.
    /// - Server errors of class `08` (connection exception), `57P01`/`57P02`/`57P03`
    ///   (admin shutdown, crash shutdown, cannot connect now: the server is restarting),
    ///   `57014` (query canceled, e.g. `pg_cancel_backend` on our walsender), class `53`
    ///   (insufficient resources, e.g. too many connections), `55006` (object in use: after a
    ///   reconnect the previous walsender may still hold the slot for a moment), and `40001` /
    ///   `40P01` (serialization failure, deadlock).
    ///
    /// Not retryable: authentication failures (class `28` and [`Auth`](Self::Auth)), syntax and
    /// undefined-object errors (class `42`, e.g. the slot or publication does not exist),
    /// `55000` (object not in prerequisite state, e.g. `wal_level` is not `logical` or the slot
    /// was invalidated), every other SQLSTATE, [`Protocol`](Self::Protocol) and
    /// [`Config`](Self::Config): an operator has to act first.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProtocolError::Io { .. } | ProtocolError::Timeout(_) => true,
            ProtocolError::Server { code, .. } => sqlstate_is_retryable(code),
            ProtocolError::Auth(_) | ProtocolError::Protocol(_) | ProtocolError::Config(_) => false,
        }
    }

    /// The SQLSTATE of a server error, `None` for errors that did not come from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ProtocolError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Wraps an I/O error with the step and server it happened on.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ProtocolError::Io {
            context: context.into(),
            source,
        }
    }
}

/// See [`ProtocolError::is_retryable`] for the reasoning behind each code.
fn sqlstate_is_retryable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "55006" | "40001" | "40P01"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ProtocolError {
        ProtocolError::Server {
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn retryable_classes() {
        for code in [
            "08006", "08P01", "57P01", "57P02", "57P03", "53300", "55006", "57014",
        ] {
            assert!(server(code).is_retryable(), "{code}");
        }
        for code in [
            "28P01", "28000", "42704", "42601", "55000", "XX000", "57P04",
        ] {
            assert!(!server(code).is_retryable(), "{code}");
        }
        let io = ProtocolError::io("x", std::io::Error::other("reset"));
        assert!(io.is_retryable());
        assert_eq!(io.sqlstate(), None);
        assert!(!ProtocolError::Auth("x".into()).is_retryable());
        assert!(!ProtocolError::Protocol("x".into()).is_retryable());
        assert_eq!(server("28P01").sqlstate(), Some("28P01"));
    }

    #[test]
    fn server_error_display_has_detail_and_hint() {
        let e = ProtocolError::Server {
            code: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            e.to_string(),
            "server error 42704: replication slot \"s\" does not exist (detail: d) (hint: h)"
        );
    }
}

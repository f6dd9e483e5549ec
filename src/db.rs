//! Ordinary SQL connections (setup, apply, verify) through tokio-postgres, and the error type
//! that carries which node and which step failed.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::NodeConfig;

/// An error talking SQL to a node; the message names the node and what was being done.
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {context}: {}", describe(.source))]
pub struct DbError {
    pub node: String,
    pub context: String,
    #[source]
    pub source: tokio_postgres::Error,
}

impl DbError {
    /// Wraps a tokio-postgres error with the node and the step that failed.
    pub fn new(node: impl Into<String>, context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        DbError { node: node.into(), context: context.into(), source }
    }

    /// The SQLSTATE the server sent, if the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.source.code().map(|c| c.code())
    }

    /// Whether trying again later may succeed (lost connections, shutdowns, lock and
    /// serialization conflicts), as opposed to errors that need a person (privileges, schema).
    pub fn is_retryable(&self) -> bool {
        match self.sqlstate() {
            None => true, // I/O, closed connection, timeout
            Some(code) => {
                code.starts_with("08") // connection exception
                    || code.starts_with("57P") // operator intervention / shutdown
                    || code.starts_with("53") // insufficient resources
                    || code == "40001" // serialization failure
                    || code == "40P01" // deadlock
                    || code == "55P03" // lock not available
                    || code == "55006" // object in use (origin / slot still held by a dying session)
            }
        }
    }
}

/// Renders a tokio-postgres error as one line: severity, message, detail, hint, SQLSTATE.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} ({})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        s
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s.push_str(&format!(": {inner}"));
            src = inner.source();
        }
        s
    }
}

/// Opens an ordinary SQL connection to a node and drives it on a background task.
pub async fn connect(node: &NodeConfig, application_name: &str) -> Result<Client, DbError> {
    let mut cfg = node.pg.clone();
    cfg.application_name(application_name);
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    let name = node.name.to_string();
    let err = |e| DbError::new(node.name.as_str(), "cannot connect", e);
    let client = match &node.tls_config {
        None => {
            let (client, connection) = cfg.connect(NoTls).await.map_err(err)?;
            spawn_connection(name, connection);
            client
        }
        Some(tls) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            let (client, connection) = cfg.connect(connector).await.map_err(err)?;
            spawn_connection(name, connection);
            client
        }
    };
    Ok(client)
}

/// Drives a connection until it closes.
fn spawn_connection<F>(node: String, connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%node, error = %describe(&e), "sql connection closed");
        }
    });
}

/// Quotes an SQL identifier the way `quote_ident` does, always (so case and keywords are safe).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on in every supported version).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("Order"), "\"Order\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}

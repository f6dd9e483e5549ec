//! pgduplex: change-data-capture replication between two PostgreSQL databases.
//!
//! Data flows one way through the modules: socket ([`protocol`]) -> pgoutput messages
//! ([`pgoutput`]) -> one direction's pipeline ([`pipeline`]) -> target writer ([`apply`]) ->
//! commit -> progress. Pure parts (decoder, LSN arithmetic, SQL text) do no I/O and are
//! tested alone; [`setup`] installs and removes what replication needs.

pub mod apply;
pub mod config;
pub mod db;
pub mod demo;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod pipeline;
pub mod protocol;
pub mod setup;
pub mod tls;
pub mod versions;

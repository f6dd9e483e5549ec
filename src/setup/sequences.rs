//! `pgduplex sequences`: logical decoding does not carry sequences (DESIGN §7), so they are
//! handled here. `interleave` makes the two nodes' sequences generate disjoint values (each
//! node its own remainder modulo 2), for tables both nodes insert into; `sync` moves each
//! sequence of the target past the source's, for cutover.

use tokio_postgres::Client;

use crate::config::{Config, NodeName};
use crate::db::{self, DbError, quote_ident};

use super::SetupError;

/// A sequence feeding a column of a replicated table, as one node sees it.
#[derive(Debug, Clone)]
struct Sequence {
    /// `schema.name`, quoted for SQL.
    sql_name: String,
    /// `schema.name` for messages.
    name: String,
    increment: i64,
    start: i64,
    /// The last value handed out, `None` before the first `nextval`.
    last: Option<i64>,
    /// The largest value in the column it feeds.
    column_max: Option<i64>,
}

/// Sequences owned by (serial) or backing (identity) columns of the replicated tables.
async fn sequences(config: &Config, node: &str, client: &Client) -> Result<Vec<Sequence>, DbError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, s.schemaname::text, s.sequencename::text, s.increment_by, s.start_value, \
                    s.last_value, a.attname::text \
             FROM pg_depend d \
             JOIN pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S' \
             JOIN pg_namespace sn ON sn.oid = sc.relnamespace \
             JOIN pg_sequences s ON s.schemaname = sn.nspname AND s.sequencename = sc.relname \
             JOIN pg_class c ON c.oid = d.refobjid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
               AND n.nspname NOT IN ('pgduplex', 'pg_catalog', 'information_schema') \
             ORDER BY 3, 4",
            &[],
        )
        .await
        .map_err(|e| DbError::new(node, "cannot list sequences", e))?;
    let mut out = Vec::new();
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if !config.table_selected(&schema, &table) {
            continue;
        }
        let (seq_schema, seq_name, column): (String, String, String) = (r.get(2), r.get(3), r.get(7));
        let column_max: Option<i64> = client
            .query_one(
                &format!("SELECT max({})::bigint FROM {}.{}", quote_ident(&column), quote_ident(&schema), quote_ident(&table)),
                &[],
            )
            .await
            .map_err(|e| DbError::new(node, format!("cannot read the largest {schema}.{table}.{column}"), e))?
            .get(0);
        out.push(Sequence {
            sql_name: format!("{}.{}", quote_ident(&seq_schema), quote_ident(&seq_name)),
            name: format!("{seq_schema}.{seq_name}"),
            increment: r.get(4),
            start: r.get(5),
            last: r.get(6),
            column_max,
        });
    }
    Ok(out)
}

/// Gives each node's sequences its own remainder modulo 2 (the first node by name the odd
/// values), restarting above every value either node has used. Returns what it changed.
pub async fn interleave(config: &Config) -> Result<Vec<String>, SetupError> {
    let mut nodes = Vec::new();
    for (name, node) in &config.nodes {
        let client = db::connect(node, "pgduplex sequences").await?;
        let seqs = sequences(config, name.as_str(), &client).await?;
        nodes.push((name.clone(), client, seqs));
    }
    let mut lines = Vec::new();
    let names: Vec<String> = nodes[0].2.iter().map(|s| s.name.clone()).collect();
    for seq in &names {
        // The highest value either node has handed out or stored.
        let mut high = 0i64;
        let mut found = Vec::new();
        for (node, _, seqs) in &nodes {
            match seqs.iter().find(|s| &s.name == seq) {
                Some(s) => {
                    high = high.max(s.last.unwrap_or(0)).max(s.column_max.unwrap_or(0));
                    found.push(s.clone());
                }
                None => {
                    return Err(SetupError::Usage(format!(
                        "sequence {seq} exists on node {} but not on node {node}: create it there first",
                        nodes[0].0
                    )));
                }
            }
        }
        for (i, (node, client, _)) in nodes.iter().enumerate() {
            let s = &found[i];
            let remainder = if i == 0 { 1 } else { 0 };
            let mut next = high + 1;
            if next.rem_euclid(2) != remainder {
                next += 1;
            }
            if s.increment == 2 && s.start.rem_euclid(2) == remainder && s.last.is_some_and(|l| l.rem_euclid(2) == remainder) {
                lines.push(format!("node {node}: sequence {seq} already interleaved (increment 2, {} values)", parity(remainder)));
                continue;
            }
            client
                .batch_execute(&format!("ALTER SEQUENCE {} INCREMENT BY 2 START WITH {next} RESTART WITH {next}", s.sql_name))
                .await
                .map_err(|e| DbError::new(node.as_str(), format!("cannot interleave sequence {seq}"), e))?;
            lines.push(format!(
                "node {node}: sequence {seq}: increment {} -> 2, restarts at {next} ({} values)",
                s.increment,
                parity(remainder)
            ));
        }
    }
    if names.is_empty() {
        lines.push("no sequence feeds a replicated table".into());
    }
    Ok(lines)
}

fn parity(remainder: i64) -> &'static str {
    if remainder == 1 { "odd" } else { "even" }
}

/// Moves every sequence of `to` past the value of the same sequence on `from` (never
/// backwards), for cutover: after it, rows inserted on `to` cannot take keys `from` used.
pub async fn sync(config: &Config, from: &NodeName, to: &NodeName) -> Result<Vec<String>, SetupError> {
    let source = db::connect(config.node(from), "pgduplex sequences").await?;
    let target = db::connect(config.node(to), "pgduplex sequences").await?;
    let source_seqs = sequences(config, from.as_str(), &source).await?;
    let target_seqs = sequences(config, to.as_str(), &target).await?;
    let mut lines = Vec::new();
    for s in &source_seqs {
        let Some(t) = target_seqs.iter().find(|t| t.name == s.name) else {
            lines.push(format!("node {to}: sequence {} is missing (it exists on node {from}): create it, then sync again", s.name));
            continue;
        };
        // Past every value the source handed out and every key either side holds (the target's
        // rows came from the source with their keys, without moving its sequence).
        let mut wanted = s.last.unwrap_or(0).max(s.column_max.unwrap_or(0)).max(t.column_max.unwrap_or(0));
        // An interleaved sequence keeps its own remainder (its node's odd or even values).
        let step = t.increment.abs();
        if step >= 2 {
            let remainder = t.last.unwrap_or(t.start).rem_euclid(step);
            wanted += (remainder - wanted.rem_euclid(step)).rem_euclid(step);
        }
        let current = t.last.unwrap_or(0);
        if wanted <= current {
            lines.push(format!("node {to}: sequence {} already at {current}, past node {from}'s {wanted}", s.name));
            continue;
        }
        target
            .query_one("SELECT setval($1::text::regclass, $2)", &[&t.sql_name, &wanted])
            .await
            .map_err(|e| DbError::new(to.as_str(), format!("cannot set sequence {}", s.name), e))?;
        lines.push(format!("node {to}: sequence {} set to {wanted} (was {current}; node {from} is at {wanted})", s.name));
    }
    if source_seqs.is_empty() {
        lines.push("no sequence feeds a replicated table".into());
    }
    Ok(lines)
}

//! `pgduplex sequences`: logical decoding does not carry sequences (DESIGN §7), so they are
//! handled here. `interleave` makes the two nodes' sequences generate disjoint values (each
//! node its own remainder modulo 2), for tables both nodes insert into; `sync` moves each
//! sequence of the target past the source's, for cutover.
//!
//! A sequence *feeds* a column when it is the column's serial or identity sequence, or when
//! the column's default calls `nextval` on it (with or without `OWNED BY`; one sequence may
//! feed several tables). The same sequence is found on the other node by name, or else by the
//! columns it feeds (identity sequences are named by PostgreSQL and may differ).

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::config::{Config, NodeName};
use crate::db::{self, DbError, quote_ident};

use super::SetupError;

/// Every (table schema, table, column, sequence schema, sequence, increment, column type) where
/// the sequence feeds the column: serial and identity sequences depend on their column (`a`,
/// `i`), a default calling `nextval` depends on its sequence.
pub(super) const FED_COLUMNS_SQL: &str = "\
    WITH fed AS ( \
        SELECT d.objid AS seq, d.refobjid AS rel, d.refobjsubid AS att FROM pg_depend d \
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
          AND d.refobjsubid > 0 \
        UNION \
        SELECT d.refobjid, ad.adrelid, ad.adnum FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid \
        WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass) \
    SELECT n.nspname::text AS table_schema, c.relname::text AS table_name, a.attname::text AS column_name, \
           sn.nspname::text AS seq_schema, sc.relname::text AS seq_name, s.seqincrement AS increment, \
           format_type(a.atttypid, NULL) AS column_type \
    FROM fed \
    JOIN pg_class sc ON sc.oid = fed.seq AND sc.relkind = 'S' \
    JOIN pg_namespace sn ON sn.oid = sc.relnamespace \
    JOIN pg_sequence s ON s.seqrelid = sc.oid \
    JOIN pg_class c ON c.oid = fed.rel \
    JOIN pg_namespace n ON n.oid = c.relnamespace \
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = fed.att AND NOT a.attisdropped \
    WHERE n.nspname NOT IN ('pgduplex', 'pg_catalog', 'information_schema')";

/// A sequence feeding columns of replicated tables, as one node sees it.
#[derive(Debug, Clone)]
struct Sequence {
    /// `schema.name`, quoted for SQL.
    sql_name: String,
    /// `schema.name` for messages.
    name: String,
    increment: i64,
    /// The columns it feeds, `schema.table.column`, sorted.
    feeds: Vec<String>,
    /// Integer columns it feeds, quoted `("schema"."table", "column")`, for their largest value.
    integer_columns: Vec<(String, String)>,
}

/// A sequence's position, read under the lock that keeps `nextval` out (see `interleave`).
#[derive(Debug, Clone, Copy)]
struct Position {
    /// The last value handed out or about to be (`last_value`, whether called or not).
    last: i64,
    /// Whether `nextval` has been called since the last (re)start.
    called: bool,
    /// The largest value in the integer columns it feeds.
    column_max: Option<i64>,
}

/// The sequences feeding columns of the replicated tables on one node.
async fn sequences(config: &Config, node: &str, client: &Client) -> Result<Vec<Sequence>, DbError> {
    let rows = client
        .query(&format!("{FED_COLUMNS_SQL} ORDER BY 4, 5, 1, 2, 3"), &[])
        .await
        .map_err(|e| DbError::new(node, "cannot list sequences", e))?;
    let mut by_name: BTreeMap<String, (Sequence, bool)> = BTreeMap::new();
    for r in rows {
        let (schema, table, column, seq_schema, seq_name): (String, String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let column_type: String = r.get(6);
        let name = format!("{seq_schema}.{seq_name}");
        let (seq, selected) = by_name.entry(name.clone()).or_insert_with(|| {
            (
                Sequence {
                    sql_name: format!("{}.{}", quote_ident(&seq_schema), quote_ident(&seq_name)),
                    name,
                    increment: r.get(5),
                    feeds: Vec::new(),
                    integer_columns: Vec::new(),
                },
                false,
            )
        });
        *selected |= config.table_selected(&schema, &table);
        seq.feeds.push(format!("{schema}.{table}.{column}"));
        if matches!(column_type.as_str(), "smallint" | "integer" | "bigint") {
            seq.integer_columns.push((format!("{}.{}", quote_ident(&schema), quote_ident(&table)), quote_ident(&column)));
        }
    }
    Ok(by_name
        .into_values()
        .filter(|(_, selected)| *selected)
        .map(|(mut s, _)| {
            s.feeds.sort();
            s
        })
        .collect())
}

/// Reads a sequence's position. Reading the sequence itself (not `pg_sequences`, which shows
/// NULL without privileges) makes a missing privilege an error instead of a silent 0.
async fn position(client: &Client, node: &str, s: &Sequence) -> Result<Position, DbError> {
    let row = client
        .query_one(&format!("SELECT last_value, is_called FROM {}", s.sql_name), &[])
        .await
        .map_err(|e| DbError::new(node, format!("cannot read sequence {} (needs SELECT on it: GRANT SELECT ON SEQUENCE {} TO <role>)", s.name, s.sql_name), e))?;
    let mut column_max = None;
    for (table, column) in &s.integer_columns {
        let max: Option<i64> = client
            .query_one(&format!("SELECT max({column})::bigint FROM {table}"), &[])
            .await
            .map_err(|e| DbError::new(node, format!("cannot read the largest {table}.{column}"), e))?
            .get(0);
        column_max = column_max.max(max);
    }
    Ok(Position { last: row.get(0), called: row.get(1), column_max })
}

/// The sequence of `theirs` that is `s`: same name, or else feeding the same columns.
fn counterpart<'a>(s: &Sequence, theirs: &'a [Sequence]) -> Option<&'a Sequence> {
    theirs.iter().find(|t| t.name == s.name).or_else(|| theirs.iter().find(|t| t.feeds == s.feeds))
}

/// The first value of `remainder` (mod 2) above `high`.
fn next_with_parity(high: i64, remainder: i64) -> i64 {
    let next = high + 1;
    if next.rem_euclid(2) == remainder { next } else { next + 1 }
}

/// Gives each node's sequences its own remainder modulo 2 (the first node by name the odd
/// values), restarting above every value either node has used. Returns what it changed.
///
/// Race-free against applications inserting meanwhile: on both nodes, in one transaction each,
/// `ALTER SEQUENCE ... INCREMENT BY 2` first takes the lock that `nextval` waits for (held to
/// COMMIT); only then are the last values and the columns' largest values read, so no value can
/// be handed out between reading them and the restart.
pub async fn interleave(config: &Config) -> Result<Vec<String>, SetupError> {
    let mut nodes = Vec::new();
    for (name, node) in &config.nodes {
        let client = db::connect(node, "pgduplex sequences").await?;
        let seqs = sequences(config, name.as_str(), &client).await?;
        nodes.push((name.clone(), client, seqs));
    }
    let (first, second) = (&nodes[0], &nodes[1]);
    // Match and check everything before changing anything.
    let mut pairs = Vec::new();
    for s in &first.2 {
        let Some(t) = counterpart(s, &second.2) else {
            return Err(SetupError::Usage(format!(
                "sequence {} (feeding {}) exists on node {} but not on node {}: create it there first",
                s.name,
                s.feeds.join(", "),
                first.0,
                second.0
            )));
        };
        for (node, seq) in [(&first.0, s), (&second.0, t)] {
            if seq.increment < 0 {
                return Err(SetupError::Usage(format!(
                    "sequence {} on node {node} counts down (increment {}): pgduplex interleaves ascending sequences only; \
                     interleave it by hand (ALTER SEQUENCE {} INCREMENT BY -2 RESTART WITH <an odd value below every used one> \
                     on one node, an even one on the other)",
                    seq.name, seq.increment, seq.sql_name
                )));
            }
        }
        pairs.push((s.clone(), t.clone()));
    }
    for (node, client, _) in &nodes {
        client.batch_execute("BEGIN").await.map_err(|e| DbError::new(node.as_str(), "cannot begin", e))?;
    }
    let mut lines = Vec::new();
    for (s, t) in &pairs {
        let seqs = [s, t];
        for (i, (node, client, _)) in nodes.iter().enumerate() {
            client
                .batch_execute(&format!("ALTER SEQUENCE {} INCREMENT BY 2", seqs[i].sql_name))
                .await
                .map_err(|e| DbError::new(node.as_str(), format!("cannot alter sequence {}", seqs[i].name), e))?;
        }
        let mut positions = Vec::new();
        for (i, (node, client, _)) in nodes.iter().enumerate() {
            positions.push(position(client, node.as_str(), seqs[i]).await?);
        }
        // The highest value either node has handed out or stored.
        let high = positions.iter().map(|p| p.last.max(p.column_max.unwrap_or(i64::MIN))).max().unwrap_or(0).max(0);
        for (i, (node, client, _)) in nodes.iter().enumerate() {
            let (seq, pos) = (seqs[i], positions[i]);
            let remainder = if i == 0 { 1 } else { 0 };
            // Already interleaved: increment 2 before we set it, and its own parity in use.
            if seq.increment == 2 && pos.last.rem_euclid(2) == remainder {
                lines.push(format!("node {node}: sequence {} already interleaved (increment 2, {} values)", seq.name, parity(remainder)));
                continue;
            }
            let next = next_with_parity(high, remainder);
            client
                .batch_execute(&format!("ALTER SEQUENCE {} START WITH {next} RESTART WITH {next}", seq.sql_name))
                .await
                .map_err(|e| DbError::new(node.as_str(), format!("cannot interleave sequence {}", seq.name), e))?;
            lines.push(format!(
                "node {node}: sequence {}: increment {} -> 2, restarts at {next} ({} values)",
                seq.name,
                seq.increment,
                parity(remainder)
            ));
        }
    }
    for (node, client, _) in &nodes {
        client.batch_execute("COMMIT").await.map_err(|e| DbError::new(node.as_str(), "cannot commit the interleaved sequences", e))?;
    }
    if pairs.is_empty() {
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
        let Some(t) = counterpart(s, &target_seqs) else {
            lines.push(format!("node {to}: sequence {} is missing (it exists on node {from}): create it, then sync again", s.name));
            continue;
        };
        if s.increment < 0 || t.increment < 0 {
            lines.push(format!("node {to}: sequence {} counts down: NOT synced (set it by hand below node {from}'s value)", t.name));
            continue;
        }
        let (sp, tp) = (position(&source, from.as_str(), s).await?, position(&target, to.as_str(), t).await?);
        // Past every value the source handed out and every key either side holds (the target's
        // rows came from the source with their keys, without moving its sequence).
        let mut wanted = sp.last.max(sp.column_max.unwrap_or(0)).max(tp.column_max.unwrap_or(0));
        // An interleaved sequence keeps its own remainder (its node's odd or even values).
        let step = t.increment;
        if step >= 2 {
            let remainder = tp.last.rem_euclid(step);
            wanted += (remainder - wanted.rem_euclid(step)).rem_euclid(step);
        }
        let current = if tp.called { tp.last } else { tp.last - t.increment };
        if wanted <= current {
            lines.push(format!("node {to}: sequence {} already at {current}, past node {from}'s {wanted}", t.name));
            continue;
        }
        target
            .query_one("SELECT setval($1::text::regclass, $2)", &[&t.sql_name, &wanted])
            .await
            .map_err(|e| DbError::new(to.as_str(), format!("cannot set sequence {}", t.name), e))?;
        lines.push(format!("node {to}: sequence {} set to {wanted} (was {current}; node {from} is at {wanted})", t.name));
    }
    if source_seqs.is_empty() {
        lines.push("no sequence feeds a replicated table".into());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_above_every_used_value() {
        assert_eq!(next_with_parity(10, 1), 11);
        assert_eq!(next_with_parity(10, 0), 12);
        assert_eq!(next_with_parity(0, 0), 2);
        assert_eq!(next_with_parity(-5, 0), -4);
    }

    #[test]
    fn counterpart_by_name_then_by_fed_columns() {
        let seq = |name: &str, feeds: &[&str]| Sequence {
            sql_name: name.into(),
            name: name.into(),
            increment: 1,
            feeds: feeds.iter().map(|f| f.to_string()).collect(),
            integer_columns: vec![],
        };
        let theirs = [seq("public.t_id_seq1", &["public.t.id"]), seq("public.shared", &["public.a.id", "public.b.id"])];
        assert_eq!(counterpart(&seq("public.t_id_seq", &["public.t.id"]), &theirs).map(|s| s.name.as_str()), Some("public.t_id_seq1"));
        assert_eq!(counterpart(&seq("public.shared", &["public.a.id"]), &theirs).map(|s| s.name.as_str()), Some("public.shared"));
        assert!(counterpart(&seq("public.other", &["public.c.id"]), &theirs).is_none());
    }
}

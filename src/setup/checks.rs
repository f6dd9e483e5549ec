//! Prerequisite checks run by `init` before it changes anything. Every problem names the node
//! and the table, column or setting at fault, and the fix; all are reported at once.

use std::collections::BTreeMap;
use std::fmt;

use tokio_postgres::Client;

use crate::config::{Config, Direction};
use crate::db::DbError;

/// One unmet prerequisite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub node: String,
    pub what: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {} (fix: {})", self.node, self.what, self.fix)
    }
}

/// A source table selected by `replication.tables`.
#[derive(Debug, Clone)]
pub struct SourceTable {
    pub schema: String,
    pub name: String,
}

const TABLES_SQL: &str = "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgduplex') AND n.nspname NOT LIKE 'pg\\_%' \
    ORDER BY 1, 2";

const COLUMNS_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '' \
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

async fn setting(client: &Client, node: &str, name: &str) -> Result<String, DbError> {
    client
        .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
        .await
        .map(|r| r.get(0))
        .map_err(|e| DbError::new(node, format!("cannot read setting {name}"), e))
}

/// Checks one direction; returns the selected source tables and every problem found.
pub async fn check_direction(
    config: &Config,
    d: &Direction,
    source: &Client,
    target: &Client,
) -> Result<(Vec<SourceTable>, Vec<Problem>), DbError> {
    let (src, tgt) = (d.source.as_str(), d.target.as_str());
    let mut problems = Vec::new();
    let mut problem = |node: &str, what: String, fix: String| problems.push(Problem { node: node.into(), what, fix });

    let wal_level = setting(source, src, "wal_level").await?;
    if wal_level != "logical" {
        problem(src, format!("wal_level is {wal_level}, logical decoding needs logical"), "ALTER SYSTEM SET wal_level = logical; then restart the server".into());
    }
    let slot = d.slot_name();
    let q = |e, what: &str| DbError::new(src, what.to_string(), e);
    let row = source
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots)::int, current_setting('max_replication_slots')::int, \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    (SELECT count(*) FROM pg_stat_replication)::int, current_setting('max_wal_senders')::int, \
                    (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), current_user::text",
            &[&slot],
        )
        .await
        .map_err(|e| q(e, "cannot read replication settings"))?;
    let (slots, max_slots, has_slot, senders, max_senders, can_replicate, user): (i32, i32, bool, i32, i32, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6));
    if !has_slot && slots >= max_slots {
        problem(src, format!("max_replication_slots = {max_slots} and all {slots} are in use"), "raise max_replication_slots (restart needed) or drop an unused slot".into());
    }
    if senders >= max_senders {
        problem(src, format!("max_wal_senders = {max_senders} and all are in use"), "raise max_wal_senders (restart needed)".into());
    }
    // Slots and origins are per cluster, not per database: two setups with the same node names
    // on one cluster would share them and skip each other's transactions.
    let slot_db: Option<String> = source
        .query_opt("SELECT database::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| q(e, "cannot read pg_replication_slots"))?
        .and_then(|r| r.get(0));
    let source_db = config.node(&d.source).pg.get_dbname().unwrap_or_default().to_string();
    if let Some(db) = slot_db.filter(|db| *db != source_db) {
        problem(
            src,
            format!("replication slot {slot} already exists for database {db}, not {source_db}"),
            "give the nodes names no other pgduplex setup on these clusters uses (slot and origin names are per cluster)".into(),
        );
    }
    let origin = d.origin_name();
    if !has_slot && super::origin_exists(target, tgt, &origin).await? {
        problem(
            tgt,
            format!("replication origin {origin} already exists but slot {slot} does not exist on node {src}"),
            format!(
                "if it is left from an earlier setup of these nodes, run `pgduplex teardown` (or SELECT \
                 pg_replication_origin_drop('{origin}') on node {tgt}); if another setup uses it, give the nodes other names"
            ),
        );
    }
    if !can_replicate {
        problem(src, format!("role {user} may not stream changes"), format!("ALTER ROLE {user} REPLICATION"));
    }

    let row = target
        .query_one(
            "SELECT rolsuper, current_user::text FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| DbError::new(tgt, "cannot read role attributes", e))?;
    let (superuser, tuser): (bool, String) = (row.get(0), row.get(1));
    if !superuser {
        let row = target
            .query_one(
                "SELECT has_function_privilege('pg_replication_origin_session_setup(text)', 'execute'), \
                        current_setting('server_version_num')::int",
                &[],
            )
            .await
            .map_err(|e| DbError::new(tgt, "cannot read privileges", e))?;
        let (origin_ok, version): (bool, i32) = (row.get(0), row.get(1));
        if !origin_ok {
            problem(tgt, format!("role {tuser} may not use replication origins"), format!("GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_session_progress(boolean) TO {tuser}, or use a superuser"));
        }
        let srr_ok = if version >= 150000 {
            target
                .query_one("SELECT has_parameter_privilege('session_replication_role', 'SET')", &[])
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(|e| DbError::new(tgt, "cannot read privileges", e))?
        } else {
            false
        };
        if !srr_ok {
            problem(tgt, format!("role {tuser} may not set session_replication_role"), format!("GRANT SET ON PARAMETER session_replication_role TO {tuser} (PostgreSQL 15+), or use a superuser"));
        }
    }

    let rows = source.query(TABLES_SQL, &[]).await.map_err(|e| q(e, "cannot list tables"))?;
    let mut tables = Vec::new();
    for r in rows {
        let (schema, name, ident, has_pk): (String, String, String, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
        if !config.table_selected(&schema, &name) {
            continue;
        }
        let ok = match ident.as_str() {
            "d" => has_pk,
            "f" | "i" => true,
            _ => false,
        };
        if !ok {
            problem(
                src,
                format!("table {schema}.{name} has no primary key and no REPLICA IDENTITY FULL, so its updates and deletes cannot be replicated"),
                format!("add a primary key, or ALTER TABLE {schema}.{name} REPLICA IDENTITY FULL"),
            );
        }
        let source_cols = columns(source, src, &schema, &name).await?;
        let target_cols = columns(target, tgt, &schema, &name).await?;
        if target_cols.is_empty() {
            problem(tgt, format!("table {schema}.{name} is missing"), format!("create {schema}.{name} on node {tgt} with the same columns as on node {src}"));
        } else {
            for (col, (ty, generated)) in &source_cols {
                if *generated {
                    continue;
                }
                match target_cols.get(col) {
                    None => problem(tgt, format!("table {schema}.{name} lacks column {col} ({ty})"), format!("ALTER TABLE {schema}.{name} ADD COLUMN {col} {ty}")),
                    Some((tty, _)) if tty != ty => problem(
                        tgt,
                        format!("column {schema}.{name}.{col} is {tty} here but {ty} on node {src}"),
                        format!("ALTER TABLE {schema}.{name} ALTER COLUMN {col} TYPE {ty}"),
                    ),
                    Some(_) => {}
                }
            }
        }
        tables.push(SourceTable { schema, name });
    }
    if tables.is_empty() {
        let globs: Vec<&str> = config.tables.iter().map(|p| p.as_str()).collect();
        problem(src, format!("replication.tables {globs:?} matches no table"), "adjust replication.tables or create the tables".into());
    }
    Ok((tables, problems))
}

async fn columns(client: &Client, node: &str, schema: &str, table: &str) -> Result<BTreeMap<String, (String, bool)>, DbError> {
    let rows = client
        .query(COLUMNS_SQL, &[&schema, &table])
        .await
        .map_err(|e| DbError::new(node, format!("cannot read columns of {schema}.{table}"), e))?;
    Ok(rows.into_iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// Two-way prerequisites on one node (DESIGN §6, §7): superuser (event trigger, trigger
/// functions owned by a role that can write the versions tables), and per table a primary key,
/// a plain table, and a key that both sides cannot generate alike.
pub async fn check_two_way_node(
    node: &str,
    client: &Client,
    other: &str,
    other_client: &Client,
    tables: &[SourceTable],
) -> Result<Vec<Problem>, DbError> {
    let mut problems = Vec::new();
    let mut problem = |what: String, fix: String| problems.push(Problem { node: node.into(), what, fix });
    let row = client
        .query_one("SELECT rolsuper, current_user::text FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .map_err(|e| DbError::new(node, "cannot read role attributes", e))?;
    let (superuser, user): (bool, String) = (row.get(0), row.get(1));
    if !superuser {
        problem(
            format!("role {user} is not a superuser: two-way replication installs an event trigger (regenerating capture triggers after ALTER TABLE), which needs one"),
            "run `pgduplex init` as a superuser (`run` can then use a less privileged role)".into(),
        );
    }
    for t in tables {
        let qualified = format!("{}.{}", t.schema, t.name);
        let row = client
            .query_opt(
                "SELECT c.relkind::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                        c.relreplident::text, \
                        (SELECT string_agg(conname, ', ') FROM pg_constraint WHERE conrelid = c.oid AND contype IN ('p', 'u') AND condeferrable) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(|e| DbError::new(node, format!("cannot read table {qualified}"), e))?;
        let Some(row) = row else { continue };
        let (kind, has_pk, identity, deferrable): (String, bool, String, Option<String>) = (row.get(0), row.get(1), row.get(2), row.get(3));
        if kind != "r" {
            problem(
                format!("table {qualified} is {}: two-way replication supports plain tables only", if kind == "p" { "partitioned" } else { "not a plain table" }),
                format!("leave {qualified} out of replication.tables, or replicate it one way"),
            );
        }
        if identity != "d" {
            problem(
                format!("table {qualified} has REPLICA IDENTITY {}: two-way replication matches rows by their primary key", match identity.as_str() {
                    "f" => "FULL",
                    "i" => "USING INDEX",
                    _ => "NOTHING",
                }),
                format!("ALTER TABLE {qualified} REPLICA IDENTITY DEFAULT"),
            );
        }
        if let Some(names) = deferrable {
            problem(
                format!(
                    "table {qualified} has DEFERRABLE unique or primary-key constraints ({names}): PostgreSQL does not check them in \
                     pgduplex's apply sessions (session_replication_role = replica), so replicated rows could break them"
                ),
                format!("make them NOT DEFERRABLE (ALTER TABLE {qualified} ALTER CONSTRAINT ... NOT DEFERRABLE), or replicate the table one way"),
            );
        }
        if !has_pk {
            problem(
                format!("table {qualified} has no primary key: two-way replication matches rows and keeps their versions by it"),
                format!("ALTER TABLE {qualified} ADD PRIMARY KEY (...)"),
            );
            continue;
        }
        for (seq, col, increment, next) in key_sequences(client, node, t).await? {
            let theirs = key_sequences(other_client, other, t).await?.into_iter().find(|(_, c, _, _)| *c == col);
            let interleaved = theirs.is_some_and(|(_, _, inc2, next2)| {
                increment == inc2 && increment.abs() >= 2 && next.rem_euclid(increment.abs()) != next2.rem_euclid(increment.abs())
            });
            if !interleaved {
                problem(
                    format!(
                        "key column {col} of table {qualified} takes values from sequence {seq} (increment {increment}): \
                         rows inserted on both nodes would get the same keys and overwrite each other"
                    ),
                    format!(
                        "run `pgduplex sequences interleave` (increment 2, one node odd, the other even, above every used value), \
                         or by hand ALTER SEQUENCE {seq} INCREMENT BY 2 RESTART WITH <an odd number above the largest key> on node \
                         {node} and <an even one> on node {other}"
                    ),
                );
            }
        }
    }
    Ok(problems)
}

/// Sequences feeding primary-key columns of `t` (serial, identity, or a `nextval` default with
/// or without OWNED BY): (sequence, column, increment, the next value it will hand out).
async fn key_sequences(client: &Client, node: &str, t: &SourceTable) -> Result<Vec<(String, String, i64, i64)>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT format('%I.%I', f.seq_schema, f.seq_name), f.column_name, f.increment FROM ({}) f \
                 WHERE f.table_schema = $1 AND f.table_name = $2 AND f.column_name IN ( \
                     SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                     WHERE i.indrelid = format('%I.%I', $1::text, $2::text)::regclass AND i.indisprimary) \
                 ORDER BY 2, 1",
                super::sequences::FED_COLUMNS_SQL
            ),
            &[&t.schema, &t.name],
        )
        .await
        .map_err(|e| DbError::new(node, format!("cannot read the key sequences of {}.{}", t.schema, t.name), e))?;
    let mut out = Vec::new();
    for r in rows {
        let (seq, col, increment): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        // The sequence's own row: after RESTART WITH, pg_sequences shows no last_value and the
        // old start_value, but the next value is last_value.
        let next: i64 = client
            .query_one(&format!("SELECT CASE WHEN is_called THEN last_value + {increment} ELSE last_value END FROM {seq}"), &[])
            .await
            .map_err(|e| DbError::new(node, format!("cannot read sequence {seq}"), e))?
            .get(0);
        out.push((seq, col, increment, next));
    }
    Ok(out)
}

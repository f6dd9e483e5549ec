//! `pgduplex verify`: compares every replicated table on both nodes, chunk by chunk along the
//! primary key (DESIGN §7), and names the rows that differ.
//!
//! A chunk is a primary-key range of at most `chunk_rows` rows on the first node; both nodes
//! hash the range (count and md5 over the rows' text in key order) at the same time. Only a
//! chunk whose hashes differ is fetched, as (key, md5 of row) pairs, and compared row by row, so
//! memory stays bounded by one chunk whatever the table's size. While replication runs, a chunk
//! can differ only because a change is in flight: differing chunks are compared again, after a
//! pause, up to `attempts` times, and only rows that differ every time are reported.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Client;

use crate::apply::TextValue;
use crate::config::{Config, NodeName};
use crate::db::{self, DbError, quote_ident};

use super::SetupError;

/// How `verify` walks the tables.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Rows per chunk (on the first node).
    pub chunk_rows: i64,
    /// How often a differing chunk is compared before its rows are reported.
    pub attempts: u32,
    /// Pause between two comparisons of a differing chunk.
    pub retry_pause: Duration,
    /// Keys listed per table and kind of difference.
    pub max_keys: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { chunk_rows: 10_000, attempts: 3, retry_pause: Duration::from_secs(1), max_keys: 10 }
    }
}

/// What verify found for one table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    /// Rows on the first node.
    pub rows: i64,
    pub chunks: u64,
    /// Keys whose rows differ between the nodes.
    pub changed: Vec<String>,
    pub changed_count: u64,
    /// Keys present only on the first / second node.
    pub only_first: Vec<String>,
    pub only_first_count: u64,
    pub only_second: Vec<String>,
    pub only_second_count: u64,
}

impl TableReport {
    pub fn identical(&self) -> bool {
        self.changed_count == 0 && self.only_first_count == 0 && self.only_second_count == 0
    }
}

/// A table to compare: its key columns (with types) and the columns both nodes have.
struct Plan {
    display: String,
    from: String,
    keys: Vec<(String, String)>,
    /// Per key column: compare it under COLLATE "C" (text keys, when the nodes' collations
    /// differ: chunk bounds taken on one node must order the same way on the other).
    collate_c: Vec<bool>,
    columns: Vec<String>,
}

impl Plan {
    fn key_list(&self) -> String {
        self.keys
            .iter()
            .zip(&self.collate_c)
            .map(|((k, _), c)| if *c { format!("{} COLLATE \"C\"", quote_ident(k)) } else { quote_ident(k) })
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// `(k1, k2) > ($n::t1, $n+1::t2)` style bound on the key, parameters from `offset`.
    fn bound(&self, op: &str, offset: usize) -> String {
        let params: Vec<String> = self.keys.iter().enumerate().map(|(i, (_, t))| format!("${}::{t}", i + offset + 1)).collect();
        format!("({}) {op} ({})", self.key_list(), params.join(", "))
    }
    fn row_text(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        format!("ROW({})::text", cols.join(", "))
    }
    fn key_text(&self) -> String {
        let cols: Vec<String> = self.keys.iter().map(|(k, _)| format!("{}::text", quote_ident(k))).collect();
        format!("ARRAY[{}]", cols.join(", "))
    }
}

type Key = Vec<Option<String>>;

/// The session settings that make both nodes print values alike.
const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = ISO; SET IntervalStyle = postgres; \
    SET extra_float_digits = 3; SET bytea_output = 'hex'; SET statement_timeout = 0; SET lc_monetary = 'C'; \
    SET search_path = pg_catalog";

/// Compares every replicated table (and, two-way, its versions table). `progress` gets a line
/// per table.
pub async fn verify(config: &Config, opts: &VerifyOptions, mut progress: impl FnMut(&str)) -> Result<Vec<TableReport>, SetupError> {
    let names: Vec<&NodeName> = config.nodes.keys().collect();
    let (first, second) = (names[0], names[1]);
    let a = db::connect(config.node(first), "pgduplex verify").await?;
    let b = db::connect(config.node(second), "pgduplex verify").await?;
    for (n, c) in [(first, &a), (second, &b)] {
        c.batch_execute(SESSION).await.map_err(|e| DbError::new(n.as_str(), "cannot set up the verify session", e))?;
    }
    let mut reports = Vec::new();
    // Text keys are ordered by collation: chunk bounds taken on the first node only cut the
    // second node's rows the same way if both order them alike.
    let collation = "SELECT datcollate || '/' || coalesce(datcollversion, '') FROM pg_database WHERE datname = current_database()";
    let collation_15 = "SELECT datcollate::text FROM pg_database WHERE datname = current_database()";
    let read_collation = async |c: &Client| match c.query_one(collation, &[]).await {
        Ok(r) => Ok(r.get::<_, String>(0)),
        Err(_) => c.query_one(collation_15, &[]).await.map(|r| r.get::<_, String>(0)),
    };
    let ca = read_collation(&a).await.map_err(|e| DbError::new(first.as_str(), "cannot read the database collation", e))?;
    let cb = read_collation(&b).await.map_err(|e| DbError::new(second.as_str(), "cannot read the database collation", e))?;
    let same_collation = ca == cb || (ca.starts_with("C/") || ca == "C" || ca.starts_with("POSIX")) && (cb.starts_with("C/") || cb == "C" || cb.starts_with("POSIX"));
    if !same_collation {
        progress(&format!(
            "the nodes' collations differ ({first}: {ca}, {second}: {cb}): text keys are compared under COLLATE \"C\" (slower: the key indexes are not used for ordering)"
        ));
    }
    let plans = plans(config, first, &a, second, &b).await?;
    if plans.is_empty() {
        let globs: Vec<&str> = config.tables.iter().map(|p| p.as_str()).collect();
        return Err(SetupError::Usage(format!("replication.tables {globs:?} matches no table on node {first}: nothing to verify")));
    }
    for mut plan in plans {
        if same_collation {
            plan.collate_c.iter_mut().for_each(|c| *c = false);
        }
        let report = compare_table(&plan, first, &a, second, &b, opts).await?;
        progress(&if report.identical() {
            format!("{}: identical ({} rows, {} chunks)", report.table, report.rows, report.chunks)
        } else {
            format!(
                "{}: DIFFERENT: {} changed, {} only on {first}, {} only on {second}",
                report.table, report.changed_count, report.only_first_count, report.only_second_count
            )
        });
        reports.push(report);
    }
    Ok(reports)
}

async fn plans(config: &Config, first: &NodeName, a: &Client, second: &NodeName, b: &Client) -> Result<Vec<Plan>, SetupError> {
    let tables = a
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgduplex') AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| DbError::new(first.as_str(), "cannot list tables", e))?;
    let mut plans = Vec::new();
    for r in tables {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if !config.table_selected(&schema, &table) {
            continue;
        }
        plans.push(plan_for(&schema, &table, first, a, second, b).await?);
        if config.two_way() {
            plans.push(plan_for("pgduplex", &format!("{schema}.{table}"), first, a, second, b).await?);
        }
    }
    Ok(plans)
}

async fn plan_for(schema: &str, table: &str, first: &NodeName, a: &Client, second: &NodeName, b: &Client) -> Result<Plan, SetupError> {
    let display = format!("{schema}.{table}");
    let cols_sql = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    a.attcollation <> 0, \
                    coalesce((SELECT k.ord FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                              WHERE i.indrelid = c.oid AND i.indisprimary AND k.attnum = a.attnum), 0) \
                    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attname";
    let read = async |c: &Client, node: &NodeName| {
        c.query(cols_sql, &[&schema, &table])
            .await
            .map_err(|e| DbError::new(node.as_str(), format!("cannot read the columns of {display}"), e))
    };
    let (ra, rb) = (read(a, first).await?, read(b, second).await?);
    if rb.is_empty() {
        return Err(SetupError::Usage(format!("table {display} exists on node {first} but not on node {second}")));
    }
    let mut keys: Vec<(i64, String, String, bool)> = ra
        .iter()
        .filter(|r| r.get::<_, i64>(3) > 0)
        .map(|r| (r.get::<_, i64>(3), r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, bool>(2)))
        .collect();
    keys.sort();
    if keys.is_empty() {
        return Err(SetupError::Usage(format!("table {display} has no primary key on node {first}: verify compares by key")));
    }
    let theirs: Vec<String> = rb.iter().map(|r| r.get(0)).collect();
    let columns: Vec<String> = ra.iter().map(|r| r.get::<_, String>(0)).filter(|c| theirs.contains(c)).collect();
    Ok(Plan {
        from: format!("{}.{}", quote_ident(schema), quote_ident(table)),
        display,
        collate_c: keys.iter().map(|(_, _, _, c)| *c).collect(),
        keys: keys.into_iter().map(|(_, k, t, _)| (k, t)).collect(),
        columns,
    })
}

/// Key values as parameters in text format (the SQL casts them to the key columns' types).
fn key_values(key: &Key) -> Vec<TextValue> {
    key.iter().map(|v| TextValue(v.as_ref().map(|s| Bytes::copy_from_slice(s.as_bytes())))).collect()
}

fn refs(values: &[TextValue]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

async fn compare_table(
    plan: &Plan,
    first: &NodeName,
    a: &Client,
    second: &NodeName,
    b: &Client,
    opts: &VerifyOptions,
) -> Result<TableReport, SetupError> {
    let mut report = TableReport { table: plan.display.clone(), ..Default::default() };
    let key_list = plan.key_list();
    // The upper key of the next chunk: the chunk_rows-th key after `lo` on the first node.
    let next_sql = |with_lo: bool| {
        format!(
            "SELECT {} FROM {} {} ORDER BY {key_list} OFFSET {} LIMIT 1",
            plan.key_text(),
            plan.from,
            if with_lo { format!("WHERE {}", plan.bound(">", 0)) } else { String::new() },
            opts.chunk_rows - 1
        )
    };
    let mut lo: Option<Key> = None;
    loop {
        let next = match &lo {
            None => a.query_opt(&next_sql(false), &[]).await,
            Some(k) => a.query_opt(&next_sql(true), &refs(&key_values(k))).await,
        }
        .map_err(|e| DbError::new(first.as_str(), format!("cannot read the keys of {}", plan.display), e))?;
        let hi: Option<Key> = next.map(|r| r.get(0));
        report.chunks += 1;
        // Only rows that differ on every attempt are reported: a row in flight differs once.
        let mut diff: Option<Diff> = None;
        for attempt in 0..opts.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(opts.retry_pause).await;
            }
            let (ha, hb) = tokio::try_join!(
                chunk_hash(plan, a, first, lo.as_ref(), hi.as_ref()),
                chunk_hash(plan, b, second, lo.as_ref(), hi.as_ref())
            )?;
            if attempt == 0 {
                report.rows += ha.0;
            }
            if ha == hb {
                diff = None;
                break;
            }
            let now = chunk_diff(plan, a, first, b, second, lo.as_ref(), hi.as_ref()).await?;
            diff = Some(match diff {
                None => now,
                Some((c, x, y)) => {
                    let keep = |old: Vec<Key>, new: &Vec<Key>| {
                        let new: std::collections::HashSet<&Key> = new.iter().collect();
                        old.into_iter().filter(|k| new.contains(k)).collect::<Vec<_>>()
                    };
                    (keep(c, &now.0), keep(x, &now.1), keep(y, &now.2))
                }
            });
            if diff.as_ref().is_some_and(|(c, x, y)| c.is_empty() && x.is_empty() && y.is_empty()) {
                diff = None;
                break;
            }
        }
        if let Some((changed, only_a, only_b)) = diff {
            let show = |k: &Key| format!("({})", k.iter().map(|v| v.clone().unwrap_or_else(|| "NULL".into())).collect::<Vec<_>>().join(", "));
            for (list, count, keys) in [
                (&mut report.changed, &mut report.changed_count, changed),
                (&mut report.only_first, &mut report.only_first_count, only_a),
                (&mut report.only_second, &mut report.only_second_count, only_b),
            ] {
                *count += keys.len() as u64;
                list.extend(keys.iter().take(opts.max_keys.saturating_sub(list.len())).map(show));
            }
        }
        match hi {
            Some(h) => lo = Some(h),
            None => break,
        }
    }
    Ok(report)
}

/// The range `lo < key <= hi` (either end open when `None`) as a WHERE clause and parameters.
fn range(plan: &Plan, lo: Option<&Key>, hi: Option<&Key>) -> (String, Vec<TextValue>) {
    let mut conds = Vec::new();
    let mut params = Vec::new();
    if let Some(lo) = lo {
        conds.push(plan.bound(">", params.len()));
        params.extend(key_values(lo));
    }
    if let Some(hi) = hi {
        conds.push(plan.bound("<=", params.len()));
        params.extend(key_values(hi));
    }
    let clause = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
    (clause, params)
}

async fn chunk_hash(plan: &Plan, c: &Client, node: &NodeName, lo: Option<&Key>, hi: Option<&Key>) -> Result<(i64, Option<String>), DbError> {
    let (clause, params) = range(plan, lo, hi);
    let sql = format!(
        "SELECT count(*), md5(string_agg(md5({}), '' ORDER BY {})) FROM {} {clause}",
        plan.row_text(),
        plan.key_list(),
        plan.from
    );
    let r = c.query_one(&sql, &refs(&params)).await.map_err(|e| DbError::new(node.as_str(), format!("cannot hash {}", plan.display), e))?;
    Ok((r.get(0), r.get(1)))
}

type Diff = (Vec<Key>, Vec<Key>, Vec<Key>);

/// The keys of a chunk whose rows differ, are only on the first node, only on the second.
async fn chunk_diff(plan: &Plan, a: &Client, first: &NodeName, b: &Client, second: &NodeName, lo: Option<&Key>, hi: Option<&Key>) -> Result<Diff, DbError> {
    let (clause, params) = range(plan, lo, hi);
    let sql = format!("SELECT {}, md5({}) FROM {} {clause}", plan.key_text(), plan.row_text(), plan.from);
    let fetch = async |c: &Client, node: &NodeName| {
        let rows = c
            .query(&sql, &refs(&params))
            .await
            .map_err(|e| DbError::new(node.as_str(), format!("cannot read rows of {}", plan.display), e))?;
        Ok::<BTreeMap<Key, String>, DbError>(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    };
    let (ra, rb) = tokio::try_join!(fetch(a, first), fetch(b, second))?;
    let changed = ra.iter().filter(|(k, h)| rb.get(*k).is_some_and(|hb| hb != *h)).map(|(k, _)| k.clone()).collect();
    let only_a = ra.keys().filter(|k| !rb.contains_key(*k)).cloned().collect();
    let only_b = rb.keys().filter(|k| !ra.contains_key(*k)).cloned().collect();
    Ok((changed, only_a, only_b))
}

//! `init` and `teardown`: check prerequisites on both nodes, install and remove what
//! replication needs (publication, slot, origin, the `pgduplex` schema).

mod checks;
pub mod copy;
pub mod resolve;
pub mod sequences;
pub mod status;
pub mod verify;

use std::fmt;

use tokio_postgres::Client;

use crate::config::{Config, Direction};
use crate::db::{self, DbError, quote_ident};
use crate::lsn::Lsn;

pub use checks::{Problem, SourceTable, check_direction, check_two_way_node};

/// The schema installed on every node that receives changes.
pub const TARGET_SCHEMA_SQL: &str = include_str!("../../sql/target_schema.sql");
/// The two-way additions: versions tables, capture triggers, guards, conflicts, parked changes.
pub const TWO_WAY_SQL: &str = include_str!("../../sql/two_way.sql");

/// Why init or teardown failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{}", Problems(.0))]
    Prerequisites(Vec<Problem>),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Apply(Box<crate::apply::ApplyError>),
    #[error("{}", .lines.join("\n"))]
    Unresolved { lines: Vec<String> },
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) must be fixed before replication can start:", self.0.len())?;
        for p in self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// What `init` did, for the report printed to the user.
#[derive(Debug, Default)]
pub struct InitReport {
    pub lines: Vec<String>,
}

/// What `init` is asked to do beyond checking and installing.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Only check and report what would be created.
    pub dry_run: bool,
    /// Copy every replicated table from this node into the other (which must be empty).
    pub copy_from: Option<crate::config::NodeName>,
    /// Tables copied at a time.
    pub jobs: usize,
}

/// Checks every prerequisite of every direction, reports all problems at once, and only then
/// creates publications, slots, origins and the `pgduplex` schema, and copies the tables when
/// asked to. Safe to run again; re-running after an interrupted copy starts the copy over.
pub async fn init(config: &Config, opts: &InitOptions) -> Result<InitReport, SetupError> {
    let dry_run = opts.dry_run;
    let mut report = InitReport::default();
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    for d in &config.directions {
        let source = db::connect(config.node(&d.source), "pgduplex init").await?;
        let target = db::connect(config.node(&d.target), "pgduplex init").await?;
        let (tables, mut p) = check_direction(config, d, &source, &target).await?;
        problems.append(&mut p);
        plans.push((d.clone(), source, target, tables));
    }
    if config.two_way() {
        for (d, source, target, tables) in &plans {
            problems.append(&mut check_two_way_node(d.source.as_str(), source, d.target.as_str(), target, tables).await?);
        }
    }
    // --copy-from on an established direction (its slot exists, its initial copy, if any,
    // finished): copy the tables not replicated yet (DESIGN §7, tables added later).
    if let Some(from) = &opts.copy_from
        && let Some((d, source, target, tables)) = plans.iter().find(|(d, ..)| &d.source == from)
        && slot_exists(source, d).await?
        && !copy::unfinished_copy(target, d.target.as_str(), d.source.as_str()).await?
    {
        if !problems.is_empty() {
            return Err(SetupError::Prerequisites(problems));
        }
        return add_tables(config, opts, d, source, target, tables, report).await;
    }
    // An interrupted copy leaves its tables half full: only init --copy-from may go on.
    for (d, _, target, _) in &plans {
        if opts.copy_from.as_ref() != Some(&d.source) && copy::unfinished_copy(target, d.target.as_str(), d.source.as_str()).await? {
            problems.push(Problem {
                node: d.target.to_string(),
                what: format!("an initial copy from node {} was interrupted; its tables hold part of the copy", d.source),
                fix: format!("run `pgduplex init --copy-from {}` again to start it over, or `pgduplex teardown`", d.source),
            });
        }
    }
    // The initial copy: which direction, and whether an earlier one was interrupted.
    let mut copy_restart = false;
    if let Some(from) = &opts.copy_from {
        let Some((d, _, target, tables)) = plans.iter().find(|(d, ..)| &d.source == from) else {
            return Err(SetupError::Usage(format!(
                "--copy-from {from}: replication runs {}; copy from the source node",
                config.directions.iter().map(|d| d.label()).collect::<Vec<_>>().join(", ")
            )));
        };
        copy_restart = copy::unfinished_copy(target, d.target.as_str(), d.source.as_str()).await?;
        // Two-way, the other direction's slot must be created after the copy, or the copied
        // rows would be decoded as that node's own writes and sent back.
        let reverse = Direction { source: d.target.clone(), target: d.source.clone() };
        let reverse_slot = reverse.slot_name();
        let (_, reverse_source, ..) = plans.iter().find(|(p, ..)| *p == reverse).unwrap_or(&plans[0]);
        if config.two_way()
            && reverse_source
                .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&reverse_slot])
                .await
                .map_err(|e| DbError::new(d.target.as_str(), "cannot read pg_replication_slots", e))?
                .is_some()
        {
            problems.push(Problem {
                node: d.target.to_string(),
                what: format!("replication slot {reverse_slot} already exists: it would send the copied rows back to node {}", d.source),
                fix: "run `pgduplex teardown`, then `pgduplex init --copy-from` on empty tables".into(),
            });
        }
        if !copy_restart {
            let full = copy::non_empty_tables(target, d.target.as_str(), tables).await?;
            if !full.is_empty() {
                problems.push(Problem {
                    node: d.target.to_string(),
                    what: format!("table(s) {} already hold rows; the node copied into must be empty", full.join(", ")),
                    fix: format!("empty them on node {} (or run init without --copy-from if both nodes already hold the same rows)", d.target),
                });
            }
        }
    }
    if !problems.is_empty() {
        return Err(SetupError::Prerequisites(problems));
    }
    if dry_run {
        report.lines.push("all prerequisites are met; init would:".into());
        for (d, source, _, tables) in &plans {
            if config.two_way() {
                report.lines.push(format!(
                    "  node {}: install the pgduplex schema with versions tables and capture triggers for {} table(s)",
                    d.source,
                    tables.len()
                ));
            }
            report_foreign_replication(d, source, &mut report).await?;
            report.lines.push(format!(
                "  node {}: create publication {} ({} table(s)) and replication slot {}",
                d.source,
                d.publication_name(),
                tables.len(),
                d.slot_name()
            ));
            report.lines.push(format!("  node {}: create replication origin {}", d.target, d.origin_name()));
            if opts.copy_from.as_ref() == Some(&d.source) {
                report.lines.push(format!(
                    "  copy {} table(s) from node {} into node {}{}",
                    tables.len(),
                    d.source,
                    d.target,
                    if copy_restart { " (starting an interrupted copy over)" } else { "" }
                ));
            }
        }
        return Ok(report);
    }
    if config.two_way() {
        // Versions tables and capture triggers first, on both nodes: publications list them.
        for (d, source, _, tables) in &plans {
            install_two_way_node(config, d.source.as_str(), source, tables, &mut report).await?;
        }
    }
    // The copied direction first: the other one's slot must come after the copy, or the copied
    // rows would be decoded as the target's own writes.
    let mut plans = plans;
    plans.sort_by_key(|(d, ..)| opts.copy_from.as_ref() != Some(&d.source));
    for (d, source, target, tables) in plans {
        report_foreign_replication(&d, &source, &mut report).await?;
        let copying = opts.copy_from.as_ref() == Some(&d.source);
        if copying && copy_restart {
            copy::reset_interrupted(&d, &source, &target, &tables, config.two_way()).await?;
            report.lines.push(format!("node {}: an interrupted copy was found: its tables were emptied to start over", d.target));
        }
        install_direction(&d, &source, &target, &tables, config.two_way(), !copying, &mut report).await?;
        if copying {
            let r = copy::copy(config, &d, &tables, opts.jobs, false).await?;
            let (rows, bytes): (u64, u64) = r.tables.iter().fold((0, 0), |(r0, b0), (_, r, b)| (r0 + r, b0 + b));
            let secs = r.elapsed.as_secs_f64().max(0.001);
            report.lines.push(format!(
                "node {} -> node {}: copied {} table(s), {rows} rows, {:.1} MB in {:.1} s ({:.0} rows/s, {:.1} MB/s); streaming starts at {}",
                d.source,
                d.target,
                r.tables.len(),
                bytes as f64 / 1e6,
                secs,
                rows as f64 / secs,
                bytes as f64 / 1e6 / secs,
                r.consistent_point
            ));
        }
    }
    Ok(report)
}

/// PostgreSQL minor releases without the fix that distributes catalog invalidations to the
/// transactions being decoded (May 2025 releases).
fn invalidation_bug(server_version_num: i32) -> bool {
    let (major, minor) = (server_version_num / 10000, server_version_num % 10000);
    match major {
        13 => minor < 21,
        14 => minor < 18,
        15 => minor < 13,
        16 => minor < 9,
        17 => minor < 5,
        m => m < 13,
    }
}

async fn slot_exists(source: &Client, d: &Direction) -> Result<bool, DbError> {
    Ok(source
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&d.slot_name()])
        .await
        .map_err(|e| DbError::new(d.source.as_str(), "cannot read pg_replication_slots", e))?
        .is_some())
}

/// `init --copy-from` on an established direction: adds the selected tables its publication
/// lacks (and those whose addition was interrupted), copying them from a snapshot of their own
/// while `run` holds their changes (see `pipeline::drift`), then records the snapshot's
/// consistent point so that `run` skips what the copy has and applies the rest.
async fn add_tables(
    config: &Config,
    opts: &InitOptions,
    d: &Direction,
    source: &Client,
    target: &Client,
    tables: &[SourceTable],
    mut report: InitReport,
) -> Result<InitReport, SetupError> {
    let (src, tgt) = (d.source.as_str(), d.target.as_str());
    if config.two_way() {
        return Err(SetupError::Usage(format!(
            "replication from node {src} is set up already; copying tables added since is supported one way only: for two-way, \
             create the new table empty on both nodes and run `pgduplex init` without --copy-from (before the applications write to it)"
        )));
    }
    if !opts.dry_run {
        target.batch_execute(TARGET_SCHEMA_SQL).await.map_err(|e| DbError::new(tgt, "cannot install the pgduplex schema", e))?;
    }
    let publication = d.publication_name();
    let published: Vec<(String, String)> = source
        .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| DbError::new(src, format!("cannot read the tables of publication {publication}"), e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let interrupted: Vec<String> = match target
        .query("SELECT table_name FROM pgduplex.table_sync WHERE source_node = $1 AND lsn IS NULL", &[&src])
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // A dry run against a schema from before table_sync existed: nothing was interrupted.
        Err(_) if opts.dry_run => Vec::new(),
        Err(e) => return Err(DbError::new(tgt, "cannot read pgduplex.table_sync", e).into()),
    };
    let qualified = |t: &SourceTable| format!("{}.{}", t.schema, t.name);
    let added: Vec<SourceTable> = tables
        .iter()
        .filter(|t| !published.iter().any(|(s, n)| *s == t.schema && *n == t.name) || interrupted.contains(&qualified(t)))
        .cloned()
        .collect();
    if added.is_empty() {
        report.lines.push(format!(
            "replication {} -> {} is set up and every selected table is replicated: nothing to copy \
             (to start over: `pgduplex teardown`, empty node {tgt}, `pgduplex init --copy-from {src}`)",
            src, tgt
        ));
        return Ok(report);
    }
    let fresh: Vec<SourceTable> = added.iter().filter(|t| !interrupted.contains(&qualified(t))).cloned().collect();
    let full = copy::non_empty_tables(target, tgt, &fresh).await?;
    if !full.is_empty() {
        return Err(SetupError::Prerequisites(vec![Problem {
            node: tgt.to_string(),
            what: format!("table(s) {} are to be added to replication from node {src} but already hold rows here", full.join(", ")),
            fix: format!("empty them on node {tgt} (the copy fills them), or run init without --copy-from if they already hold the same rows as node {src}"),
        }]));
    }
    let names: Vec<String> = added.iter().map(qualified).collect();
    if opts.dry_run {
        report.lines.push(format!(
            "all prerequisites are met; init would add {} table(s) to replication {src} -> {tgt} and copy them from node {src}: {}",
            added.len(),
            names.join(", ")
        ));
        return Ok(report);
    }
    // From here `run` holds the added tables' changes until their copy is done.
    for name in &names {
        target
            .execute(
                "INSERT INTO pgduplex.table_sync (source_node, table_name) VALUES ($1, $2) \
                 ON CONFLICT (source_node, table_name) DO UPDATE SET lsn = NULL",
                &[&src, name],
            )
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot record {name} in pgduplex.table_sync"), e))?;
    }
    let restarted: Vec<String> = added
        .iter()
        .filter(|t| interrupted.contains(&qualified(t)))
        .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
        .collect();
    if !restarted.is_empty() {
        // DELETE, not TRUNCATE: other tables may have foreign keys to them (not checked as replica).
        let deletes: String = restarted.iter().map(|t| format!("DELETE FROM {t}; ")).collect();
        target
            .batch_execute(&format!("BEGIN; SET LOCAL session_replication_role = replica; {deletes}COMMIT"))
            .await
            .map_err(|e| DbError::new(tgt, "cannot empty the tables of the interrupted copy", e))?;
        report.lines.push(format!("node {tgt}: an interrupted copy of {} was emptied to start over", restarted.join(", ")));
    }
    // Publish the new tables. Their lock first: a transaction writing one of them must not
    // straddle the publication change (PostgreSQL before 15.13/16.9/17.5 could then stop
    // decoding the table's later changes for good; the lock also keeps it simple to reason).
    let new: Vec<String> = added
        .iter()
        .filter(|t| !published.iter().any(|(s, n)| *s == t.schema && *n == t.name))
        .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
        .collect();
    if !new.is_empty() {
        let list = new.join(", ");
        source
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '60s'; LOCK TABLE {list} IN SHARE ROW EXCLUSIVE MODE; \
                 ALTER PUBLICATION {} ADD TABLE {list}; COMMIT",
                quote_ident(&publication)
            ))
            .await
            .map_err(|e| DbError::new(src, format!("cannot add {list} to publication {publication}"), e))?;
        report.lines.push(format!("node {src}: publication {publication}: added {list}"));
    }
    let version: i32 = source
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| DbError::new(src, "cannot read server_version_num", e))?
        .get(0);
    if invalidation_bug(version) {
        report.lines.push(format!(
            "warning: node {src} runs a PostgreSQL minor release ({version}) whose logical decoding can miss the changes of a table \
             added to a publication while a transaction that began earlier writes to it (fixed in 13.21, 14.18, 15.13, 16.9, \
             17.5): update that server, and check the added tables with `pgduplex verify`"
        ));
    }
    let r = copy::copy(config, d, &added, opts.jobs, true).await?;
    for name in &names {
        target
            .execute(
                "UPDATE pgduplex.table_sync SET lsn = $3::text::pg_lsn WHERE source_node = $1 AND table_name = $2",
                &[&src, name, &r.consistent_point.to_string()],
            )
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot record the copy of {name} in pgduplex.table_sync"), e))?;
    }
    let (rows, bytes): (u64, u64) = r.tables.iter().fold((0, 0), |(r0, b0), (_, r, b)| (r0 + r, b0 + b));
    report.lines.push(format!(
        "node {src} -> node {tgt}: added {} table(s) ({}), copied {rows} rows, {:.1} MB in {:.1} s at {}; `pgduplex run` \
         applies their changes from there (changes made meanwhile were held)",
        added.len(),
        names.join(", "),
        bytes as f64 / 1e6,
        r.elapsed.as_secs_f64(),
        r.consistent_point
    ));
    Ok(report)
}

/// Installs the two-way schema on `node` and tracks every replicated table (versions table,
/// capture trigger, TRUNCATE guard).
async fn install_two_way_node(
    config: &Config,
    node: &str,
    client: &Client,
    tables: &[SourceTable],
    report: &mut InitReport,
) -> Result<(), SetupError> {
    client
        .batch_execute(&format!("SET client_min_messages = warning; {TARGET_SCHEMA_SQL}; {TWO_WAY_SQL}"))
        .await
        .map_err(|e| DbError::new(node, "cannot install the pgduplex two-way schema", e))?;
    for name in config.nodes.keys() {
        client
            .execute(
                "INSERT INTO pgduplex.nodes (name, is_self) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET is_self = excluded.is_self",
                &[&name.as_str(), &(name.as_str() == node)],
            )
            .await
            .map_err(|e| DbError::new(node, "cannot write pgduplex.nodes", e))?;
    }
    for t in tables {
        let qualified = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        client
            .execute("SELECT pgduplex.track($1::text::regclass)", &[&qualified])
            .await
            .map_err(|e| DbError::new(node, format!("cannot install the capture trigger of {}.{}", t.schema, t.name), e))?;
    }
    report.lines.push(format!("node {node}: versions tables and capture triggers installed for {} table(s)", tables.len()));
    Ok(())
}

/// The versions table of `t` (two-way), as named by sql/two_way.sql.
fn versions_table(t: &SourceTable) -> String {
    format!("pgduplex.{}", quote_ident(&format!("{}.{}", t.schema, t.name)))
}

/// Lists replication origins and subscriptions on the source that are not pgduplex's, and
/// says what pgduplex does with what they write (DESIGN §4): it replicates it like any other
/// change; only its own origins' transactions are dropped as echoes.
async fn report_foreign_replication(d: &Direction, source: &Client, report: &mut InitReport) -> Result<(), DbError> {
    let src = d.source.as_str();
    let rows = source
        .query(
            "SELECT 'replication origin ' || roname FROM pg_replication_origin WHERE roname NOT LIKE 'pgduplex\\_%' \
             UNION ALL SELECT 'subscription ' || subname FROM pg_subscription \
             WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| DbError::new(src, "cannot list replication origins and subscriptions", e))?;
    for r in rows {
        let what: String = r.get(0);
        report.lines.push(format!(
            "node {src}: {what} is not pgduplex's: changes it applies here are replicated to node {} like any other",
            d.target
        ));
    }
    Ok(())
}

async fn install_direction(
    d: &Direction,
    source: &Client,
    target: &Client,
    tables: &[SourceTable],
    two_way: bool,
    create_slot: bool,
    report: &mut InitReport,
) -> Result<(), SetupError> {
    let (src, tgt) = (d.source.as_str(), d.target.as_str());
    target
        .batch_execute(TARGET_SCHEMA_SQL)
        .await
        .map_err(|e| DbError::new(tgt, "cannot install the pgduplex schema", e))?;

    let publication = d.publication_name();
    let mut list = tables.iter().map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))).collect::<Vec<_>>();
    if two_way {
        list.extend(tables.iter().map(versions_table));
    }
    let list = list.join(", ");
    let exists = source
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| DbError::new(src, "cannot read pg_publication", e))?
        .is_some();
    let sql = if exists {
        format!("ALTER PUBLICATION {} SET TABLE {list}", quote_ident(&publication))
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
            quote_ident(&publication)
        )
    };
    source.batch_execute(&sql).await.map_err(|e| DbError::new(src, format!("cannot create publication {publication}"), e))?;
    report.lines.push(format!(
        "node {src}: publication {publication} {} with {} table(s)",
        if exists { "updated" } else { "created" },
        tables.len()
    ));

    if !create_slot {
        // The initial copy creates the slot (with its snapshot) and the origin.
        return Ok(());
    }
    let origin = d.origin_name();
    if !origin_exists(target, tgt, &origin).await? {
        target
            .execute("SELECT pg_replication_origin_create($1)", &[&origin])
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot create replication origin {origin}"), e))?;
        report.lines.push(format!("node {tgt}: replication origin {origin} created"));
    }

    let slot = d.slot_name();
    let slot_exists = source
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| DbError::new(src, "cannot read pg_replication_slots", e))?
        .is_some();
    if slot_exists {
        report.lines.push(format!("node {src}: replication slot {slot} already exists, kept"));
    } else {
        let lsn: String = source
            .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .map_err(|e| DbError::new(src, format!("cannot create replication slot {slot}"), e))?
            .get(0);
        // Streaming starts at the slot's consistent point: record it as the origin's progress so
        // that a slot confirmed past the origin always means a real gap.
        target
            .execute("SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)", &[&origin, &lsn])
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot set progress of origin {origin}"), e))?;
        let lsn: Lsn = lsn.parse().unwrap_or(Lsn::ZERO);
        report.lines.push(format!("node {src}: replication slot {slot} created at {lsn}"));
        tracing::debug!(%slot, %lsn, "replication slot created");
    }
    Ok(())
}

/// Whether the replication origin `origin` exists on `node` (origins are per cluster).
pub(crate) async fn origin_exists(client: &Client, node: &str, origin: &str) -> Result<bool, DbError> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&origin])
        .await
        .map_err(|e| DbError::new(node, "cannot read pg_replication_origin", e))?
        .is_some())
}

/// Removes what `init` created, slot first (a forgotten slot fills the source's disk). Objects
/// already gone are skipped; a node that cannot be reached is an error naming it.
pub async fn teardown(config: &Config) -> Result<Vec<String>, SetupError> {
    let mut lines = Vec::new();
    for d in &config.directions {
        let (src, tgt) = (d.source.as_str(), d.target.as_str());
        let source = db::connect(config.node(&d.source), "pgduplex teardown").await?;
        let slot = d.slot_name();
        // A walsender may still hold the slot for a moment after `run` stopped.
        source
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await
            .map_err(|e| DbError::new(src, "cannot stop the walsender of the slot", e))?;
        let mut dropped = false;
        for _ in 0..50 {
            match source
                .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await
            {
                Ok(n) => {
                    dropped = n > 0;
                    break;
                }
                Err(e) if e.code().map(|c| c.code()) == Some("55006") => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(DbError::new(src, format!("cannot drop replication slot {slot}"), e).into()),
            }
        }
        if dropped {
            lines.push(format!("node {src}: replication slot {slot} dropped"));
        }
        let publication = d.publication_name();
        let n = source
            .execute("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
            .await
            .map_err(|e| DbError::new(src, "cannot read pg_publication", e))?;
        if n > 0 {
            source
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&publication)))
                .await
                .map_err(|e| DbError::new(src, format!("cannot drop publication {publication}"), e))?;
            lines.push(format!("node {src}: publication {publication} dropped"));
        }

        let target = db::connect(config.node(&d.target), "pgduplex teardown").await?;
        let origin = d.origin_name();
        let n = target
            .execute("SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1", &[&origin])
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot drop replication origin {origin} (is `pgduplex run` still running?)"), e))?;
        if n > 0 {
            lines.push(format!("node {tgt}: replication origin {origin} dropped"));
        }
        let resolve_origin = d.resolve_origin_name();
        target
            .execute("SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1", &[&resolve_origin])
            .await
            .map_err(|e| DbError::new(tgt, format!("cannot drop replication origin {resolve_origin} (is `pgduplex resolve` running?)"), e))?;
        // The schema goes only when no other pgduplex setup on this database still uses it.
        // (An error here means the table is gone already: nothing else uses the schema.)
        let others: i64 = target
            .query_one("SELECT count(*) FROM pgduplex.heartbeat WHERE source_node <> $1", &[&src])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if others == 0 {
            target
                .batch_execute("DROP SCHEMA IF EXISTS pgduplex CASCADE")
                .await
                .map_err(|e| DbError::new(tgt, "cannot drop schema pgduplex", e))?;
            lines.push(format!("node {tgt}: schema pgduplex dropped"));
            // The capture role is per cluster and may serve other setups on it: kept, owning
            // nothing here any more.
            let role: Option<String> = target
                .query_opt("SELECT rolname::text FROM pg_roles WHERE rolname = 'pgduplex_capture'", &[])
                .await
                .map_err(|e| DbError::new(tgt, "cannot read pg_roles", e))?
                .map(|r| r.get(0));
            if role.is_some() && d == &config.directions[config.directions.len() - 1] {
                lines.push(
                    "role pgduplex_capture (two-way capture triggers) kept: it is per cluster and owns nothing in these \
                     databases now; DROP ROLE pgduplex_capture once no pgduplex setup uses the cluster"
                        .into(),
                );
            }
        } else {
            target
                .execute("DELETE FROM pgduplex.heartbeat WHERE source_node = $1", &[&src])
                .await
                .map_err(|e| DbError::new(tgt, "cannot clean pgduplex.heartbeat", e))?;
            lines.push(format!("node {tgt}: schema pgduplex kept: another pgduplex setup uses it"));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_bug_is_fixed_in_the_may_2025_minors() {
        assert!(invalidation_bug(150012));
        assert!(!invalidation_bug(150013));
        assert!(!invalidation_bug(150018));
        assert!(invalidation_bug(160008) && !invalidation_bug(160009));
        assert!(invalidation_bug(170004) && !invalidation_bug(170005));
        assert!(!invalidation_bug(180000) && !invalidation_bug(180006));
        assert!(invalidation_bug(120020));
    }
}

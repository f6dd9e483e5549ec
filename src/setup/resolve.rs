//! `pgduplex resolve`: lists the changes parked on either node (DESIGN §6b), and applies or
//! discards them by the operator's choice.
//!
//! Applying goes through the same merge as streaming, row by row: all parked changes of the row
//! (its key) are joined in their order and merged into the row as it is now, in one
//! transaction that also removes them from `pgduplex.parked`. It is tagged with the direction's
//! resolve origin, so the other node drops it as an echo: the change came from there.
//! Discarding only forgets the change on this node; the node it came from still has it.

use std::sync::Arc;

use crate::apply::{Applier, ApplyError, TwoWay};
use crate::config::{Config, Direction, NodeName};
use crate::db::{self, DbError};
use crate::metrics::Metrics;
use crate::versions::NodeId;

use super::SetupError;

/// One parked change, as `resolve list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedChange {
    /// The node it is parked on (the target).
    pub node: String,
    pub id: i64,
    pub at: String,
    /// The node it came from.
    pub source_node: String,
    pub source_lsn: String,
    pub table: String,
    pub key: String,
    /// insert, update or delete.
    pub op: String,
    pub error: String,
}

/// Every parked change on both nodes, oldest first per node.
pub async fn list(config: &Config) -> Result<Vec<ParkedChange>, SetupError> {
    let mut out = Vec::new();
    for (name, node) in &config.nodes {
        let client = db::connect(node, "pgduplex resolve").await?;
        let rows = client
            .query(
                "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS\"Z\"'), source_node, source_lsn::text, table_name, \
                 key::text, lower(change->>'op'), error FROM pgduplex.parked ORDER BY id",
                &[],
            )
            .await
            .map_err(|e| DbError::new(name.as_str(), "cannot read pgduplex.parked (is two-way replication set up?)", e))?;
        out.extend(rows.iter().map(|r| ParkedChange {
            node: name.to_string(),
            id: r.get(0),
            at: r.get(1),
            source_node: r.get(2),
            source_lsn: r.get(3),
            table: r.get(4),
            key: r.get(5),
            op: r.get(6),
            error: r.get(7),
        }));
    }
    Ok(out)
}

/// What the operator chose for a set of parked changes on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Apply,
    Discard,
}

/// Applies or discards parked changes on `node` (`ids`, or all of them when empty). Returns a
/// line per row handled; a row that still fails stays parked and is reported, and the result
/// is an error naming it.
pub async fn settle(config: &Config, node: &NodeName, ids: &[i64], choice: Choice) -> Result<Vec<String>, SetupError> {
    let target = config.nodes.get(node).ok_or_else(|| SetupError::Usage(format!("node {node} is not in the config")))?;
    let client = db::connect(target, "pgduplex resolve").await?;
    let rows = client
        .query("SELECT id, source_node FROM pgduplex.parked WHERE cardinality($1::bigint[]) = 0 OR id = ANY ($1) ORDER BY id", &[&ids])
        .await
        .map_err(|e| DbError::new(node.as_str(), "cannot read pgduplex.parked", e))?;
    let found: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if let Some(missing) = ids.iter().find(|id| !found.iter().any(|(f, _)| f == *id)) {
        return Err(SetupError::Usage(format!("no parked change {missing} on node {node} (see `pgduplex resolve list`)")));
    }
    let mut lines = Vec::new();
    if choice == Choice::Discard {
        let ids: Vec<i64> = found.iter().map(|(id, _)| *id).collect();
        client
            .execute("DELETE FROM pgduplex.parked WHERE id = ANY ($1)", &[&ids])
            .await
            .map_err(|e| DbError::new(node.as_str(), "cannot discard parked changes", e))?;
        for (id, source) in &found {
            lines.push(format!(
                "node {node}: parked change {id} discarded (node {source} still has it: change or delete the row there if the nodes must agree)"
            ));
        }
        return Ok(lines);
    }
    let mut failed = Vec::new();
    let mut done: Vec<i64> = Vec::new();
    // Changes parked on a node come from the other one.
    let Some(source) = config.nodes.keys().find(|n| *n != node).cloned() else {
        return Err(SetupError::Usage("two nodes are needed".into()));
    };
    let direction = Direction { source, target: node.clone() };
    let mut applier = resolve_applier(config, &direction).await?;
    for (id, from) in found {
        if done.contains(&id) {
            continue;
        }
        if from != direction.source.as_str() {
            return Err(SetupError::Usage(format!("parked change {id} on node {node} came from node {from}, which is not in the config")));
        }
        let before: Vec<i64> = parked_ids(&client, node).await?;
        match applier.resolve_parked(id).await.map_err(|e| SetupError::Apply(Box::new(e)))? {
            Ok(n) => {
                let after = parked_ids(&client, node).await?;
                done.extend(before.iter().filter(|i| !after.contains(i)));
                lines.push(format!("node {node}: parked change {id} applied ({n} parked change(s) of its row)"));
            }
            Err(reason) => {
                lines.push(format!("node {node}: parked change {id} still cannot be applied: {reason}"));
                failed.push(id);
            }
        }
    }
    if !failed.is_empty() {
        return Err(SetupError::Unresolved { lines });
    }
    Ok(lines)
}

async fn parked_ids(client: &tokio_postgres::Client, node: &NodeName) -> Result<Vec<i64>, DbError> {
    Ok(client
        .query("SELECT id FROM pgduplex.parked", &[])
        .await
        .map_err(|e| DbError::new(node.as_str(), "cannot read pgduplex.parked", e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// An applier for `direction` under its resolve origin (created on first use).
async fn resolve_applier(config: &Config, direction: &Direction) -> Result<Applier, SetupError> {
    let target = config.node(&direction.target);
    let origin = direction.resolve_origin_name();
    let client = db::connect(target, "pgduplex resolve").await?;
    if !super::origin_exists(&client, direction.target.as_str(), &origin).await? {
        client
            .execute("SELECT pg_replication_origin_create($1)", &[&origin])
            .await
            .map_err(|e| DbError::new(direction.target.as_str(), format!("cannot create replication origin {origin}"), e))?;
    }
    let (mut applier, _) = Applier::connect_with_origin(target, direction, config.apply.clone(), Arc::new(Metrics::new()), origin)
        .await
        .map_err(|e| SetupError::Apply(Box::new(e)))?;
    let id = |n: &NodeName| NodeId::new(n.as_str()).map_err(|e| SetupError::Usage(e.to_string()));
    applier
        .enable_two_way(TwoWay::new(id(&direction.target)?, id(&direction.source)?, config.conflicts.clone()))
        .await
        .map_err(|e: ApplyError| SetupError::Apply(Box::new(e)))?;
    Ok(applier)
}

//! The TOML configuration contract, validated once into typed values.
//!
//! ```toml
//! [nodes.a]
//! url = "postgresql://user:password@127.0.0.1:5432/app"
//! [nodes.b]
//! url = "postgresql://user:password@127.0.0.1:5433/app"
//! [replication]
//! direction = "a-to-b"          # or "both"
//! tables = ["public.*"]
//! [conflicts]                   # two-way only
//! policy = "last-write-wins"    # default for every table
//! [conflicts.tables."public.accounts"]
//! prefer = "a"                  # node a's writes win concurrent changes to this table
//! [metrics]
//! listen = "127.0.0.1:9187"
//! ```
//!
//! Node names are the user's; they appear in slot, publication and origin names and in metric
//! labels, so they are restricted to what is safe in all of those: `[a-z0-9_]`, at most 20 bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::tls::{TlsMode, TlsSettings};
use crate::versions::{NodeId, Policy};
use std::sync::Arc;

/// Why a configuration could not be used; every variant names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML for pgduplex: {message}")]
    Parse { path: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// A node's name, as used in `[nodes.<name>]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

impl NodeName {
    /// Validates a node name: 1-20 bytes of `[a-z0-9_]`, starting with a letter.
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 20
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(NodeName(name.to_string()))
        } else {
            Err(ConfigError::Invalid(format!(
                "node name {name:?} must be 1-20 characters of a-z, 0-9 and '_', starting with a letter \
                 (it becomes part of slot, publication and origin names)"
            )))
        }
    }

    /// The name as written in the config.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One database instance pgduplex replicates from or to.
#[derive(Clone)]
pub struct NodeConfig {
    /// The node's name from the config.
    pub name: NodeName,
    /// Parsed libpq-style connection settings (never logged: they may hold a password).
    pub pg: tokio_postgres::Config,
    /// `sslmode` / `sslrootcert` from the URL.
    pub tls: TlsSettings,
    /// The TLS client configuration built from `tls` (None with `sslmode=disable`).
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password must never reach a log line.
        f.debug_struct("NodeConfig")
            .field("name", &self.name)
            .field("host", &self.pg.get_hosts())
            .field("port", &self.pg.get_ports())
            .field("dbname", &self.pg.get_dbname())
            .field("user", &self.pg.get_user())
            .field("tls", &self.tls)
            .finish()
    }
}

/// One replication direction: changes committed on `source` are applied to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Direction {
    pub source: NodeName,
    pub target: NodeName,
}

impl Direction {
    /// `a-to-b`: the label used in logs and metrics.
    pub fn label(&self) -> String {
        format!("{}-to-{}", self.source, self.target)
    }
    /// The logical replication slot on the source.
    pub fn slot_name(&self) -> String {
        format!("pgduplex_{}_to_{}", self.source, self.target)
    }
    /// The publication on the source listing the replicated tables (per direction, so two
    /// setups from one source database never change each other's table list).
    pub fn publication_name(&self) -> String {
        format!("pgduplex_{}_to_{}", self.source, self.target)
    }
    /// The replication origin on the target that tags our writes and records progress.
    pub fn origin_name(&self) -> String {
        format!("pgduplex_from_{}", self.source)
    }
    /// The replication origin on the target tagging `pgduplex resolve`'s writes of parked
    /// changes from the source (an echo like the apply's: the source already has them).
    pub fn resolve_origin_name(&self) -> String {
        format!("pgduplex_resolve_from_{}", self.source)
    }
}

/// Apply tuning: how many source transactions may share one target transaction.
#[derive(Clone, Debug)]
pub struct ApplyConfig {
    /// Close a batch once it holds this many changed rows (checked at source commit boundaries).
    pub batch_max_rows: usize,
    /// Close a batch once it has been open this long.
    pub batch_max_delay: Duration,
    /// `lock_timeout` of the apply session.
    pub lock_timeout: Duration,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_max_rows: 20_000,
            batch_max_delay: Duration::from_millis(50),
            lock_timeout: Duration::from_secs(10),
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: BTreeMap<NodeName, NodeConfig>,
    pub directions: Vec<Direction>,
    /// `schema.table` globs selecting the replicated tables on the source.
    pub tables: Vec<glob::Pattern>,
    pub apply: ApplyConfig,
    /// Address of the /metrics and /healthz server; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// How concurrent changes are settled (two-way replication).
    pub conflicts: ConflictPolicies,
}

/// The conflict policy of each table: a default and per-table exceptions (globs, first match).
#[derive(Clone, Debug)]
pub struct ConflictPolicies {
    pub default: Policy,
    pub tables: Vec<(glob::Pattern, Policy)>,
}

impl ConflictPolicies {
    /// The policy of table `schema.table`.
    pub fn for_table(&self, schema: &str, table: &str) -> Policy {
        let qualified = format!("{schema}.{table}");
        self.tables.iter().find(|(p, _)| p.matches(&qualified)).map_or(self.default, |(_, policy)| *policy)
    }
}

impl Default for ConflictPolicies {
    fn default() -> Self {
        ConflictPolicies { default: Policy::LastWriteWins, tables: Vec::new() }
    }
}

impl Config {
    /// Whether both directions run (two-way replication with version vectors).
    pub fn two_way(&self) -> bool {
        self.directions.len() == 2
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    nodes: Option<BTreeMap<String, RawNode>>,
    replication: Option<RawReplication>,
    #[serde(default)]
    apply: RawApply,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    conflicts: RawConflicts,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConflicts {
    policy: Option<String>,
    prefer: Option<String>,
    #[serde(default)]
    tables: BTreeMap<String, RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    policy: Option<String>,
    prefer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    direction: String,
    tables: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApply {
    batch_max_rows: Option<usize>,
    batch_max_delay_ms: Option<u64>,
    lock_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Validates config text (the path in errors is left empty; [`Config::load`] fills it).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.message().to_string(),
        })?;
        let raw_nodes = raw
            .nodes
            .ok_or_else(|| ConfigError::Invalid("missing [nodes.<name>] sections: two nodes are needed".into()))?;
        if raw_nodes.len() != 2 {
            return Err(ConfigError::Invalid(format!(
                "exactly two [nodes.<name>] sections are needed, found {}",
                raw_nodes.len()
            )));
        }
        let mut nodes = BTreeMap::new();
        for (name, node) in raw_nodes {
            let name = NodeName::new(&name)?;
            let (url, tls) = TlsSettings::split_url(&node.url)
                .map_err(|e| ConfigError::Invalid(format!("nodes.{name}.url: {e}")))?;
            let mut pg = tokio_postgres::Config::from_str(&url).map_err(|e| {
                ConfigError::Invalid(format!("nodes.{name}.url is not a valid PostgreSQL URL: {e}"))
            })?;
            pg.ssl_mode(tls.mode.for_tokio_postgres());
            let tls_config = match tls.mode {
                TlsMode::Disable => None,
                _ => Some(tls.client_config().map_err(|e| ConfigError::Invalid(format!("nodes.{name}.url: {e}")))?),
            };
            if pg.get_hosts().is_empty() {
                return Err(ConfigError::Invalid(format!("nodes.{name}.url names no host")));
            }
            if pg.get_dbname().is_none() {
                return Err(ConfigError::Invalid(format!("nodes.{name}.url names no database")));
            }
            if pg.get_user().is_none() {
                return Err(ConfigError::Invalid(format!("nodes.{name}.url names no user")));
            }
            nodes.insert(name.clone(), NodeConfig { name, pg, tls, tls_config });
        }
        let replication = raw
            .replication
            .ok_or_else(|| ConfigError::Invalid("missing [replication] section with `direction`".into()))?;
        let directions = parse_direction(&replication.direction, &nodes)?;
        let table_globs = replication.tables.unwrap_or_else(|| vec!["public.*".to_string()]);
        if table_globs.is_empty() {
            return Err(ConfigError::Invalid("replication.tables is empty: list at least one schema.table glob".into()));
        }
        let mut tables = Vec::new();
        for g in &table_globs {
            if !g.contains('.') {
                return Err(ConfigError::Invalid(format!(
                    "replication.tables entry {g:?} must be a schema.table glob, e.g. \"public.*\""
                )));
            }
            tables.push(glob::Pattern::new(g).map_err(|e| {
                ConfigError::Invalid(format!("replication.tables entry {g:?} is not a valid glob: {e}"))
            })?);
        }
        let defaults = ApplyConfig::default();
        let apply = ApplyConfig {
            batch_max_rows: raw.apply.batch_max_rows.unwrap_or(defaults.batch_max_rows).max(1),
            batch_max_delay: raw
                .apply
                .batch_max_delay_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.batch_max_delay),
            lock_timeout: raw
                .apply
                .lock_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.lock_timeout),
        };
        let metrics_listen = match raw.metrics.listen.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9187))),
            Some("") | Some("off") => None,
            Some(s) => Some(s.parse().map_err(|_| {
                ConfigError::Invalid(format!("metrics.listen {s:?} is not an address like \"127.0.0.1:9187\""))
            })?),
        };
        let conflicts = parse_conflicts(raw.conflicts, &nodes)?;
        if directions.len() == 2
            && let Some(bad) = nodes.keys().find(|n| matches!(n.as_str(), "t" | "n"))
        {
            return Err(ConfigError::Invalid(format!(
                "nodes.{bad}: two-way replication cannot use a node named \"t\" or \"n\" (versions columns <column>|t and <column>|n are taken): rename the node"
            )));
        }
        if directions.len() == 1 && (!conflicts.tables.is_empty() || conflicts.default != Policy::LastWriteWins) {
            return Err(ConfigError::Invalid(
                "[conflicts] only applies to two-way replication (replication.direction = \"both\")".into(),
            ));
        }
        Ok(Config { nodes, directions, tables, apply, metrics_listen, conflicts })
    }

    /// The node called `name` (it exists: names are validated at load).
    pub fn node(&self, name: &NodeName) -> &NodeConfig {
        &self.nodes[name]
    }

    /// Whether a source table named `schema.table` is replicated.
    pub fn table_selected(&self, schema: &str, table: &str) -> bool {
        let qualified = format!("{schema}.{table}");
        self.tables.iter().any(|p| p.matches(&qualified))
    }
}

fn parse_direction(text: &str, nodes: &BTreeMap<NodeName, NodeConfig>) -> Result<Vec<Direction>, ConfigError> {
    let names: Vec<&str> = nodes.keys().map(NodeName::as_str).collect();
    if text == "both" {
        let mut it = nodes.keys();
        let (a, b) = match (it.next(), it.next()) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => return Err(ConfigError::Invalid("replication.direction = \"both\" needs two nodes".into())),
        };
        return Ok(vec![Direction { source: a.clone(), target: b.clone() }, Direction { source: b, target: a }]);
    }
    let bad = || {
        ConfigError::Invalid(format!(
            "replication.direction {text:?} must be \"<from>-to-<to>\" with node names {names:?}, e.g. \"{}-to-{}\"",
            names[0], names[1]
        ))
    };
    let (from, to) = text.split_once("-to-").ok_or_else(bad)?;
    let from = NodeName::new(from).map_err(|_| bad())?;
    let to = NodeName::new(to).map_err(|_| bad())?;
    if !nodes.contains_key(&from) || !nodes.contains_key(&to) || from == to {
        return Err(bad());
    }
    Ok(vec![Direction { source: from, target: to }])
}

/// One `policy = "..."` / `prefer = "<node>"` pair (the default, or a table's).
fn parse_policy(
    key: &str,
    policy: Option<String>,
    prefer: Option<String>,
    nodes: &BTreeMap<NodeName, NodeConfig>,
) -> Result<Option<Policy>, ConfigError> {
    let names: Vec<&str> = nodes.keys().map(NodeName::as_str).collect();
    match (policy.as_deref(), prefer) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "{key}: give either policy = \"last-write-wins\" or prefer = \"<node>\", not both"
        ))),
        (Some("last-write-wins"), None) => Ok(Some(Policy::LastWriteWins)),
        (Some(other), None) => Err(ConfigError::Invalid(format!(
            "{key}.policy {other:?} is not a conflict policy: use \"last-write-wins\", or prefer = \"<node>\" with a node of {names:?}"
        ))),
        (None, Some(node)) => {
            let known = nodes.keys().find(|n| n.as_str() == node).ok_or_else(|| {
                ConfigError::Invalid(format!("{key}.prefer {node:?} is not a node: use one of {names:?}"))
            })?;
            let id = NodeId::new(known.as_str()).map_err(|e| ConfigError::Invalid(format!("{key}.prefer: {e}")))?;
            Ok(Some(Policy::Prefer(id)))
        }
        (None, None) => Ok(None),
    }
}

fn parse_conflicts(raw: RawConflicts, nodes: &BTreeMap<NodeName, NodeConfig>) -> Result<ConflictPolicies, ConfigError> {
    let default = parse_policy("conflicts", raw.policy, raw.prefer, nodes)?.unwrap_or(Policy::LastWriteWins);
    let mut tables = Vec::new();
    for (name, p) in raw.tables {
        let key = format!("conflicts.tables.{name:?}");
        if !name.contains('.') {
            return Err(ConfigError::Invalid(format!("{key}: name a table as schema.table (globs allowed)")));
        }
        let pattern = glob::Pattern::new(&name).map_err(|e| ConfigError::Invalid(format!("{key} is not a valid glob: {e}")))?;
        let policy = parse_policy(&key, p.policy, p.prefer, nodes)?
            .ok_or_else(|| ConfigError::Invalid(format!("{key}: give policy = \"last-write-wins\" or prefer = \"<node>\"")))?;
        tables.push((pattern, policy));
    }
    Ok(ConflictPolicies { default, tables })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [nodes.old]
        url = "postgresql://u:secret@127.0.0.1:5432/app"
        [nodes.new]
        url = "postgresql://u@127.0.0.1:5433/app"
        [replication]
        direction = "old-to-new"
    "#;

    #[test]
    fn parses_and_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.directions.len(), 1);
        let d = &c.directions[0];
        assert_eq!(d.slot_name(), "pgduplex_old_to_new");
        assert_eq!(d.origin_name(), "pgduplex_from_old");
        assert!(c.table_selected("public", "orders"));
        assert!(!c.table_selected("audit", "orders"));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
    }

    #[test]
    fn debug_never_shows_password() {
        let c = Config::parse(GOOD).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn clear_errors() {
        assert!(err(&GOOD.replace("old-to-new", "old-to-nowhere")).contains("replication.direction"));
        let both = Config::parse(&GOOD.replace("old-to-new", "both")).expect("both");
        assert_eq!(both.directions.len(), 2);
        assert!(both.two_way());
        assert_eq!(both.directions[0].label(), "new-to-old");
        assert_eq!(both.directions[1].label(), "old-to-new");
        assert!(err(&GOOD.replace("[nodes.new]", "[nodes.New]")).contains("node name"));
        assert!(err(&GOOD.replace("127.0.0.1:5433/app", "127.0.0.1:notaport/app")).contains("nodes.new.url"));
        assert!(err(&format!("{GOOD}\ntables = [\"orders\"]")).contains("schema.table"));
        assert!(err(&format!("{GOOD}\n[metrics]\nlisten = \"nope\"")).contains("metrics.listen"));
        assert!(err(&format!("{GOOD}\nbogus = 1")).contains("bogus"));
        assert!(err("[replication]\ndirection='a-to-b'").contains("two nodes"));
        assert!(err("not toml [").contains("TOML"));
    }

    #[test]
    fn conflict_policies() {
        let both = GOOD.replace("old-to-new", "both");
        let c = Config::parse(&format!(
            "{both}\n[conflicts]\npolicy = \"last-write-wins\"\n[conflicts.tables.\"public.acc*\"]\nprefer = \"old\"\n"
        ))
        .unwrap();
        let old = NodeId::new("old").unwrap();
        assert_eq!(c.conflicts.for_table("public", "accounts"), Policy::Prefer(old));
        assert_eq!(c.conflicts.for_table("public", "orders"), Policy::LastWriteWins);
        let e = Config::parse(&format!("{both}\n[conflicts]\npolicy = \"first-write-wins\"\n")).unwrap_err().to_string();
        assert!(e.contains("conflicts.policy") && e.contains("first-write-wins"), "{e}");
        let e = Config::parse(&format!("{both}\n[conflicts.tables.\"public.t\"]\nprefer = \"nobody\"\n")).unwrap_err().to_string();
        assert!(e.contains("public.t") && e.contains("nobody") && e.contains("old"), "{e}");
        let e = Config::parse(&format!("{GOOD}\n[conflicts]\nprefer = \"old\"\n")).unwrap_err().to_string();
        assert!(e.contains("two-way"), "{e}");
    }

    #[test]
    fn shipped_configs_parse() {
        let example = include_str!("../pgduplex.example.toml");
        Config::parse(example).expect("pgduplex.example.toml");
        Config::parse(include_str!("../deploy/pgduplex.toml")).expect("deploy/pgduplex.toml");
        // The commented two-way lines of the example, switched on.
        let two_way = example
            .replace("direction = \"old-to-new\" ", "direction = \"both\" ")
            .replace("# [conflicts", "[conflicts")
            .replace("# policy", "policy")
            .replace("# prefer", "prefer");
        let c = Config::parse(&two_way).expect("two-way example");
        assert!(c.two_way());
        assert_eq!(c.conflicts.for_table("public", "accounts"), Policy::Prefer(NodeId::new("old").unwrap()));
    }

    #[test]
    fn two_way_refuses_node_names_of_register_columns() {
        let text = GOOD.replace("nodes.old]", "nodes.t]").replace("old-to-new", "both");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("nodes.t") && e.contains("rename"), "{e}");
    }
}

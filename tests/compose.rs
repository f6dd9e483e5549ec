//! docker-compose.yml and deploy/, checked from the files alone (Docker cannot run here): every
//! service, build context, Dockerfile source, bind-mounted path, named volume and port the
//! compose file refers to exists and is unique, and the pieces agree with one another: the
//! PostgreSQL servers run with `wal_level=logical`, pgduplex reads the config file that is
//! mounted, Prometheus scrapes pgduplex where deploy/pgduplex.toml makes it listen, Grafana's
//! data source is that Prometheus, and the dashboard queries only metrics src/metrics.rs defines.
//!
//! Every failure names the file and the key at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_norway::Value;

const COMPOSE: &str = "docker-compose.yml";
const METRICS_RS: &str = "src/metrics.rs";

/// The services the compose file must have besides the two PostgreSQL servers.
const PGDUPLEX: &str = "pgduplex";
const PROMETHEUS: &str = "prometheus";
const GRAFANA: &str = "grafana";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: cannot read: {e}"))
}

fn parse_yaml(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}"))
}

/// A scalar as text (YAML may read `5432` or `true` as a number or a boolean).
fn scalar(v: &Value, file: &str, key: &str) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("{file}: {key}: expected a string or number, found {other:?}"),
    }
}

/// `command`/`entrypoint`: a list of arguments, or one string split on whitespace.
fn args(v: &Value, file: &str, key: &str) -> Vec<String> {
    match v {
        Value::Sequence(seq) => seq.iter().enumerate().map(|(i, a)| scalar(a, file, &format!("{key}[{i}]"))).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        other => panic!("{file}: {key}: expected a list or a string, found {other:?}"),
    }
}

/// The value of `--flag value` or `--flag=value` in `args`.
fn flag(args: &[String], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&prefix).map(str::to_string)
        }
    })
}

/// `host:port` split, the port parsed.
fn host_port(s: &str, file: &str, key: &str) -> (String, u16) {
    let (host, port) = s.rsplit_once(':').unwrap_or_else(|| panic!("{file}: {key}: {s:?} is not host:port"));
    let port = port.parse().unwrap_or_else(|_| panic!("{file}: {key}: {s:?}: port {port:?} is not a number"));
    (host.to_string(), port)
}

/// A bind mount or volume of a service.
#[derive(Debug)]
struct Mount {
    key: String,
    /// `Some(host path)` for a bind mount, as written.
    bind: Option<String>,
    /// The named volume, if any.
    volume: Option<String>,
    target: String,
}

#[derive(Debug)]
struct PortMapping {
    key: String,
    host: Option<u16>,
    container: u16,
    proto: String,
}

/// One service of the compose file.
struct Service<'a> {
    name: String,
    v: &'a Value,
}

impl<'a> Service<'a> {
    fn key(&self, k: &str) -> String {
        format!("services.{}.{k}", self.name)
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k)
    }

    fn image(&self) -> Option<String> {
        self.get("image").map(|v| scalar(v, COMPOSE, &self.key("image")))
    }

    /// The image's name without registry path or tag: `prom/prometheus:v3` -> `prometheus`.
    fn image_name(&self) -> Option<String> {
        let image = self.image()?;
        let no_digest = image.split('@').next().unwrap_or_default();
        let last = no_digest.rsplit('/').next().unwrap_or_default();
        Some(last.split(':').next().unwrap_or_default().to_string())
    }

    fn command(&self) -> Vec<String> {
        self.get("command").map(|v| args(v, COMPOSE, &self.key("command"))).unwrap_or_default()
    }

    fn environment(&self) -> BTreeMap<String, String> {
        let key = self.key("environment");
        match self.get("environment") {
            None => BTreeMap::new(),
            Some(Value::Mapping(m)) => m
                .iter()
                .map(|(k, v)| {
                    let k = scalar(k, COMPOSE, &key);
                    let v = if v.is_null() { String::new() } else { scalar(v, COMPOSE, &format!("{key}.{k}")) };
                    (k, v)
                })
                .collect(),
            Some(Value::Sequence(s)) => s
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let e = scalar(e, COMPOSE, &format!("{key}[{i}]"));
                    let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
            Some(other) => panic!("{COMPOSE}: {key}: expected a map or a list, found {other:?}"),
        }
    }

    fn mounts(&self) -> Vec<Mount> {
        let Some(vols) = self.get("volumes") else { return Vec::new() };
        let vols = vols
            .as_sequence()
            .unwrap_or_else(|| panic!("{COMPOSE}: {}: expected a list", self.key("volumes")));
        vols.iter()
            .enumerate()
            .map(|(i, v)| {
                let key = self.key(&format!("volumes[{i}]"));
                match v {
                    Value::String(s) => {
                        let parts: Vec<&str> = s.split(':').collect();
                        match parts.as_slice() {
                            [target] => Mount { key, bind: None, volume: None, target: target.to_string() },
                            [source, target] | [source, target, _] => {
                                let is_path = source.starts_with('.') || source.starts_with('/') || source.starts_with('~');
                                Mount {
                                    key,
                                    bind: is_path.then(|| source.to_string()),
                                    volume: (!is_path).then(|| source.to_string()),
                                    target: target.to_string(),
                                }
                            }
                            _ => panic!("{COMPOSE}: {key}: {s:?} is not source:target[:mode]"),
                        }
                    }
                    Value::Mapping(_) => {
                        let kind = v.get("type").map(|t| scalar(t, COMPOSE, &format!("{key}.type"))).unwrap_or_default();
                        let source = v.get("source").map(|t| scalar(t, COMPOSE, &format!("{key}.source")));
                        let target = scalar(
                            v.get("target").unwrap_or_else(|| panic!("{COMPOSE}: {key}.target: missing")),
                            COMPOSE,
                            &format!("{key}.target"),
                        );
                        match kind.as_str() {
                            "bind" => Mount { key, bind: source, volume: None, target },
                            "volume" => Mount { key, bind: None, volume: source, target },
                            _ => Mount { key, bind: None, volume: None, target },
                        }
                    }
                    other => panic!("{COMPOSE}: {key}: expected a string or a map, found {other:?}"),
                }
            })
            .collect()
    }

    /// The host path behind `container_path`, through the bind mount of the longest target that
    /// contains it, with the mount's key.
    fn host_path(&self, container_path: &str) -> Option<(PathBuf, String)> {
        self.mounts()
            .into_iter()
            .filter_map(|m| {
                let bind = m.bind.clone()?;
                let rest = if container_path == m.target {
                    ""
                } else {
                    container_path.strip_prefix(&format!("{}/", m.target.trim_end_matches('/')))?
                };
                let host = root().join(bind);
                let host = if rest.is_empty() { host } else { host.join(rest) };
                Some((m.target.len(), host, m.key))
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, p, k)| (p, k))
    }

    /// Like `host_path`, failing with a message naming `what` when nothing is mounted there.
    fn mounted(&self, container_path: &str, what: &str) -> (PathBuf, String) {
        let (path, key) = self.host_path(container_path).unwrap_or_else(|| {
            panic!(
                "{COMPOSE}: {}: no bind mount provides {container_path} ({what})",
                self.key("volumes")
            )
        });
        assert!(path.exists(), "{COMPOSE}: {key}: {} ({what}) does not exist", rel(&path));
        (path, key)
    }

    fn ports(&self) -> Vec<PortMapping> {
        let Some(ports) = self.get("ports") else { return Vec::new() };
        let ports = ports
            .as_sequence()
            .unwrap_or_else(|| panic!("{COMPOSE}: {}: expected a list", self.key("ports")));
        let mut out = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let key = self.key(&format!("ports[{i}]"));
            let num = |s: &str| -> Vec<u16> {
                let parse = |x: &str| -> u16 {
                    x.parse().unwrap_or_else(|_| panic!("{COMPOSE}: {key}: {x:?} is not a port number"))
                };
                match s.split_once('-') {
                    Some((a, b)) => (parse(a)..=parse(b)).collect(),
                    None => vec![parse(s)],
                }
            };
            match p {
                Value::Mapping(_) => {
                    let target = scalar(p.get("target").unwrap_or_else(|| panic!("{COMPOSE}: {key}.target: missing")), COMPOSE, &key);
                    let published = p.get("published").map(|v| scalar(v, COMPOSE, &format!("{key}.published")));
                    let proto = p.get("protocol").map(|v| scalar(v, COMPOSE, &key)).unwrap_or_else(|| "tcp".into());
                    let containers = num(&target);
                    let hosts = published.map(|h| num(&h));
                    for (j, c) in containers.iter().enumerate() {
                        let host = hosts.as_ref().map(|h| *h.get(j).unwrap_or(&h[0]));
                        out.push(PortMapping { key: key.clone(), host, container: *c, proto: proto.clone() });
                    }
                }
                _ => {
                    let s = scalar(p, COMPOSE, &key);
                    let (spec, proto) = s.split_once('/').unwrap_or((&s, "tcp"));
                    // An IPv6 host address is in brackets: drop it before splitting on ':'.
                    let spec = match spec.strip_prefix('[') {
                        Some(rest) => rest.split_once("]:").map(|(_, r)| r).unwrap_or(rest),
                        None => spec,
                    };
                    let parts: Vec<&str> = spec.split(':').collect();
                    let (host, container) = match parts.as_slice() {
                        [c] => (None, *c),
                        [h, c] => (Some(*h), *c),
                        [_ip, h, c] => (Some(*h).filter(|h| !h.is_empty()), *c),
                        _ => panic!("{COMPOSE}: {key}: {s:?} is not [ip:]host:container"),
                    };
                    let containers = num(container);
                    let hosts = host.map(num);
                    for (j, c) in containers.iter().enumerate() {
                        let host = hosts.as_ref().map(|h| *h.get(j).unwrap_or(&h[0]));
                        out.push(PortMapping { key: key.clone(), host, container: *c, proto: proto.to_string() });
                    }
                }
            }
        }
        out
    }

    /// `depends_on` as (service, condition).
    fn depends_on(&self) -> Vec<(String, Option<String>)> {
        let key = self.key("depends_on");
        match self.get("depends_on") {
            None => Vec::new(),
            Some(Value::Sequence(s)) => s.iter().map(|d| (scalar(d, COMPOSE, &key), None)).collect(),
            Some(Value::Mapping(m)) => m
                .iter()
                .map(|(k, v)| {
                    let name = scalar(k, COMPOSE, &key);
                    let cond = v.get("condition").map(|c| scalar(c, COMPOSE, &format!("{key}.{name}.condition")));
                    (name, cond)
                })
                .collect(),
            Some(other) => panic!("{COMPOSE}: {key}: expected a list or a map, found {other:?}"),
        }
    }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

struct Compose {
    doc: Value,
}

impl Compose {
    fn load() -> Compose {
        Compose { doc: parse_yaml(COMPOSE) }
    }

    fn services(&self) -> Vec<Service<'_>> {
        let m = self
            .doc
            .get("services")
            .and_then(Value::as_mapping)
            .unwrap_or_else(|| panic!("{COMPOSE}: services: missing or not a map"));
        m.iter().map(|(k, v)| Service { name: scalar(k, COMPOSE, "services"), v }).collect()
    }

    fn service(&self, name: &str) -> Service<'_> {
        self.services()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{COMPOSE}: services.{name}: missing"))
    }

    /// The services running the `postgres` image.
    fn postgres(&self) -> Vec<Service<'_>> {
        self.services().into_iter().filter(|s| s.image_name().as_deref() == Some("postgres")).collect()
    }

    fn declared_volumes(&self) -> BTreeSet<String> {
        match self.doc.get("volumes") {
            None => BTreeSet::new(),
            Some(Value::Mapping(m)) => m.keys().map(|k| scalar(k, COMPOSE, "volumes")).collect(),
            Some(other) => panic!("{COMPOSE}: volumes: expected a map, found {other:?}"),
        }
    }
}

/// deploy/pgduplex.toml, or whichever file the pgduplex service mounts as its config.
struct PgduplexConfig {
    file: String,
    toml: toml::Value,
}

impl PgduplexConfig {
    fn load(compose: &Compose) -> PgduplexConfig {
        let svc = compose.service(PGDUPLEX);
        let cmd = svc.command();
        let path = flag(&cmd, "--config")
            .unwrap_or_else(|| panic!("{COMPOSE}: {}: no --config <path> in {cmd:?}", svc.key("command")));
        let (host, key) = svc.mounted(&path, "the --config file");
        assert!(host.is_file(), "{COMPOSE}: {key}: {} (--config {path}) is not a file", rel(&host));
        let file = rel(&host);
        let text = std::fs::read_to_string(&host).unwrap_or_else(|e| panic!("{file}: cannot read: {e}"));
        let toml = toml::from_str(&text).unwrap_or_else(|e| panic!("{file}: not valid TOML: {e}"));
        PgduplexConfig { file, toml }
    }

    fn metrics_listen(&self) -> SocketAddr {
        let listen = self
            .toml
            .get("metrics")
            .and_then(|m| m.get("listen"))
            .and_then(toml::Value::as_str)
            .unwrap_or_else(|| panic!("{}: metrics.listen: missing (Prometheus has nothing to scrape)", self.file));
        listen.parse().unwrap_or_else(|e| panic!("{}: metrics.listen: {listen:?}: {e}", self.file))
    }
}

/// The `pgduplex_...` string constants of src/metrics.rs: constant name -> metric name.
fn defined_metrics() -> BTreeMap<String, String> {
    let text = read(METRICS_RS);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else { continue };
        let Some((ident, value)) = rest.split_once(": &str = \"") else { continue };
        let Some(value) = value.strip_suffix("\";") else { continue };
        if value.starts_with("pgduplex_") {
            out.insert(ident.trim().to_string(), value.to_string());
        }
    }
    assert!(!out.is_empty(), "{METRICS_RS}: no `pub const X: &str = \"pgduplex_...\";` found");
    out
}

/// Metric names in a PromQL expression: the `pgduplex_...` identifiers.
fn metric_names(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("pgduplex_") {
        if expr[..i].chars().next_back().is_some_and(ident) {
            continue;
        }
        let end = expr[i..].find(|c: char| !ident(c)).map_or(expr.len(), |e| i + e);
        out.push(expr[i..end].to_string());
    }
    out
}

/// The `job="..."` matchers of a PromQL expression.
fn job_matchers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("job=\"") {
        let rest = &expr[i + 5..];
        if let Some(end) = rest.find('"') {
            out.push(rest[..end].to_string());
        }
    }
    out
}

#[test]
fn services_exist_and_images_are_pinned() {
    let c = Compose::load();
    let pg: Vec<String> = c.postgres().iter().map(|s| s.name.clone()).collect();
    assert_eq!(pg.len(), 2, "{COMPOSE}: services: expected two services with image postgres:<version>, found {pg:?}");
    for name in [PGDUPLEX, PROMETHEUS, GRAFANA] {
        c.service(name);
    }
    assert_eq!(c.service(PROMETHEUS).image_name().as_deref(), Some("prometheus"), "{COMPOSE}: services.{PROMETHEUS}.image");
    assert_eq!(c.service(GRAFANA).image_name().as_deref(), Some("grafana"), "{COMPOSE}: services.{GRAFANA}.image");
    assert!(c.service(PGDUPLEX).get("build").is_some(), "{COMPOSE}: services.{PGDUPLEX}.build: missing (it is built from this repository)");
    for s in c.services() {
        let Some(image) = s.image() else {
            assert!(s.get("build").is_some(), "{COMPOSE}: {}: neither image nor build", s.key("image"));
            continue;
        };
        let name_tag = image.split('@').next().unwrap_or_default();
        let tag = name_tag.rsplit('/').next().unwrap_or_default().split_once(':').map(|(_, t)| t);
        assert!(
            image.contains('@') || matches!(tag, Some(t) if !t.is_empty() && t != "latest"),
            "{COMPOSE}: {}: {image:?} is not pinned to a version tag",
            s.key("image")
        );
    }
}

#[test]
fn build_contexts_dockerfiles_and_copied_sources_exist() {
    let c = Compose::load();
    let mut built = 0;
    for s in c.services() {
        let Some(build) = s.get("build") else { continue };
        built += 1;
        let (context, dockerfile) = match build {
            Value::String(ctx) => (ctx.clone(), "Dockerfile".to_string()),
            Value::Mapping(_) => (
                build.get("context").map_or(".".into(), |v| scalar(v, COMPOSE, &s.key("build.context"))),
                build.get("dockerfile").map_or("Dockerfile".into(), |v| scalar(v, COMPOSE, &s.key("build.dockerfile"))),
            ),
            other => panic!("{COMPOSE}: {}: expected a string or a map, found {other:?}", s.key("build")),
        };
        let ctx = root().join(&context);
        assert!(ctx.is_dir(), "{COMPOSE}: {}: context {context:?} is not a directory", s.key("build"));
        let df = ctx.join(&dockerfile);
        assert!(df.is_file(), "{COMPOSE}: {}: dockerfile {} does not exist", s.key("build"), rel(&df));

        // Every COPY/ADD source (not --from another stage) must exist in the context.
        let df_name = rel(&df);
        let text = std::fs::read_to_string(&df).unwrap_or_else(|e| panic!("{df_name}: cannot read: {e}"));
        let joined = text.replace("\\\n", " ");
        for (n, line) in joined.lines().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(instr) = words.first() else { continue };
            if !instr.eq_ignore_ascii_case("COPY") && !instr.eq_ignore_ascii_case("ADD") {
                continue;
            }
            if words.iter().any(|w| w.starts_with("--from")) {
                continue;
            }
            let rest = line.trim_start()[instr.len()..].trim();
            let operands: Vec<String> = if rest.starts_with('[') {
                serde_json::from_str(rest).unwrap_or_else(|e| panic!("{df_name}: line {}: {e}", n + 1))
            } else {
                words[1..].iter().filter(|w| !w.starts_with("--")).map(|w| w.to_string()).collect()
            };
            let (_, sources) = operands.split_last().unwrap_or_else(|| panic!("{df_name}: line {}: {instr} without operands", n + 1));
            for src in sources {
                let pattern = ctx.join(src);
                let found = glob::glob(&pattern.to_string_lossy()).map(|g| g.count()).unwrap_or(0);
                assert!(found > 0, "{df_name}: line {}: {instr} source {src:?} does not exist in context {context:?}", n + 1);
            }
        }
    }
    assert!(built > 0, "{COMPOSE}: no service has a build");
}

#[test]
fn bind_mounts_exist_and_named_volumes_are_declared() {
    let c = Compose::load();
    let declared = c.declared_volumes();
    let mut used = BTreeSet::new();
    let canonical_root = root().canonicalize().expect("repository root");
    for s in c.services() {
        for m in s.mounts() {
            if let Some(bind) = &m.bind {
                if bind.starts_with('/') || bind.starts_with('~') {
                    continue; // a host path outside the repository: nothing to check here
                }
                let host = root().join(bind);
                assert!(host.exists(), "{COMPOSE}: {}: host path {bind:?} does not exist in the repository", m.key);
                let canonical = host.canonicalize().expect("existing path");
                assert!(canonical.starts_with(&canonical_root), "{COMPOSE}: {}: host path {bind:?} is outside the repository", m.key);
            }
            if let Some(v) = &m.volume {
                assert!(declared.contains(v), "{COMPOSE}: {}: named volume {v:?} is not declared under the top-level volumes", m.key);
                used.insert(v.clone());
            }
            assert!(m.target.starts_with('/'), "{COMPOSE}: {}: container path {:?} is not absolute", m.key, m.target);
        }
        for (i, f) in s.get("env_file").map(|v| args(v, COMPOSE, &s.key("env_file"))).unwrap_or_default().iter().enumerate() {
            assert!(root().join(f).is_file(), "{COMPOSE}: {}: {f:?} does not exist", s.key(&format!("env_file[{i}]")));
        }
    }
    for v in &declared {
        assert!(used.contains(v), "{COMPOSE}: volumes.{v}: declared but no service uses it");
    }
}

#[test]
fn host_ports_are_unique() {
    let c = Compose::load();
    let mut seen: BTreeMap<(u16, String), String> = BTreeMap::new();
    for s in c.services() {
        for p in s.ports() {
            let Some(host) = p.host else { continue };
            if let Some(other) = seen.insert((host, p.proto.clone()), p.key.clone()) {
                panic!("{COMPOSE}: {}: host port {host}/{} is already published by {other}", p.key, p.proto);
            }
        }
    }
}

#[test]
fn postgres_services_run_with_logical_replication_and_keep_their_data() {
    let c = Compose::load();
    for s in c.postgres() {
        let cmd = s.command();
        let key = s.key("command");
        assert_eq!(cmd.first().map(String::as_str), Some("postgres"), "{COMPOSE}: {key}: must start with \"postgres\" to pass server settings");
        let settings: Vec<&str> = cmd
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.as_str() {
                "-c" => cmd.get(i + 1).map(String::as_str),
                _ => a.strip_prefix("--").or_else(|| a.strip_prefix("-c")),
            })
            .collect();
        assert!(settings.contains(&"wal_level=logical"), "{COMPOSE}: {key}: no `-c wal_level=logical` in {cmd:?}");
        for setting in settings {
            if let Some((name @ ("max_replication_slots" | "max_wal_senders"), v)) = setting.split_once('=') {
                let n: u32 = v.parse().unwrap_or_else(|_| panic!("{COMPOSE}: {key}: {name}={v} is not a number"));
                assert!(n >= 2, "{COMPOSE}: {key}: {name}={n}: two-way replication needs at least 2");
            }
        }
        assert!(s.get("healthcheck").is_some(), "{COMPOSE}: {}: missing (pgduplex waits for service_healthy)", s.key("healthcheck"));

        // The data directory must be on a volume. From 18 on the image keeps it in
        // /var/lib/postgresql/<major>/docker and refuses a mount at /var/lib/postgresql/data.
        let image = s.image().unwrap_or_default();
        let tag = image.split('@').next().unwrap_or_default().rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        let major: u32 = tag
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("{COMPOSE}: {}: {image:?} has no major version tag", s.key("image")));
        let pgdata = s.environment().get("PGDATA").cloned().unwrap_or_else(|| {
            if major >= 18 { format!("/var/lib/postgresql/{major}/docker") } else { "/var/lib/postgresql/data".into() }
        });
        let mounts = s.mounts();
        assert!(
            mounts.iter().any(|m| pgdata == m.target || pgdata.starts_with(&format!("{}/", m.target.trim_end_matches('/')))),
            "{COMPOSE}: {}: no volume holds the data directory {pgdata} of {image}",
            s.key("volumes")
        );
        if major >= 18 {
            assert!(
                !mounts.iter().any(|m| m.target.trim_end_matches('/') == "/var/lib/postgresql/data"),
                "{COMPOSE}: {}: {image} refuses a mount at /var/lib/postgresql/data; mount /var/lib/postgresql",
                s.key("volumes")
            );
        }
    }
}

#[test]
fn depends_on_names_services_and_pgduplex_waits_for_both_postgres() {
    let c = Compose::load();
    let services: BTreeMap<String, Service<'_>> = c.services().into_iter().map(|s| (s.name.clone(), s)).collect();
    for s in services.values() {
        for (dep, cond) in s.depends_on() {
            let key = s.key(&format!("depends_on.{dep}"));
            let target = services.get(&dep).unwrap_or_else(|| panic!("{COMPOSE}: {key}: no such service"));
            if cond.as_deref() == Some("service_healthy") {
                assert!(target.get("healthcheck").is_some(), "{COMPOSE}: {key}: service_healthy, but services.{dep}.healthcheck is missing");
            }
        }
    }
    let deps: BTreeSet<String> = c.service(PGDUPLEX).depends_on().into_iter().map(|(d, _)| d).collect();
    for pg in c.postgres() {
        assert!(deps.contains(&pg.name), "{COMPOSE}: services.{PGDUPLEX}.depends_on: missing {}", pg.name);
    }
}

#[test]
fn pgduplex_reads_the_mounted_config_and_reaches_both_postgres() {
    let c = Compose::load();
    let cfg = PgduplexConfig::load(&c);
    let svc = c.service(PGDUPLEX);
    let path = flag(&svc.command(), "--config").expect("checked by PgduplexConfig::load");

    // The commands in the header comment use the same path.
    for (n, line) in read(COMPOSE).lines().enumerate().take_while(|(_, l)| l.starts_with('#')) {
        let words: Vec<String> = line.split_whitespace().map(|w| w.trim_matches('`').to_string()).collect();
        if let Some(p) = flag(&words, "--config") {
            assert_eq!(p, path, "{COMPOSE}: line {}: the header's --config differs from {}", n + 1, svc.key("command"));
        }
    }

    // Node URLs name the PostgreSQL services on their port.
    let pg: BTreeSet<String> = c.postgres().iter().map(|s| s.name.clone()).collect();
    let nodes = cfg.toml.get("nodes").and_then(toml::Value::as_table).unwrap_or_else(|| panic!("{}: nodes: missing", cfg.file));
    assert!(nodes.len() >= 2, "{}: nodes: expected two nodes", cfg.file);
    let mut hosts = BTreeSet::new();
    for (name, node) in nodes {
        let key = format!("nodes.{name}.url");
        let url = node.get("url").and_then(toml::Value::as_str).unwrap_or_else(|| panic!("{}: {key}: missing", cfg.file));
        let after_at = url.rsplit_once('@').map_or(url.split_once("://").map_or(url, |(_, r)| r), |(_, r)| r);
        let authority = after_at.split(['/', '?']).next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().unwrap_or_else(|_| panic!("{}: {key}: port {p:?}", cfg.file))),
            None => (authority, 5432),
        };
        assert!(pg.contains(host), "{}: {key}: host {host:?} is not a postgres service of {COMPOSE} ({pg:?})", cfg.file);
        assert_eq!(port, 5432, "{}: {key}: PostgreSQL listens on 5432 inside the network, not {port}", cfg.file);
        hosts.insert(host.to_string());
    }
    assert_eq!(hosts, pg, "{}: nodes: the nodes must be the two postgres services", cfg.file);

    // The metrics server is reachable from the other containers and published.
    let listen = cfg.metrics_listen();
    assert!(listen.ip().is_unspecified(), "{}: metrics.listen: {listen} is not reachable from Prometheus' container; use 0.0.0.0", cfg.file);
    assert!(
        svc.ports().iter().any(|p| p.container == listen.port()),
        "{COMPOSE}: {}: the metrics port {} of {} is not published",
        svc.key("ports"),
        listen.port(),
        cfg.file
    );
}

/// Prometheus' config (host path, as a repository path) and its parsed YAML.
fn prometheus_config(c: &Compose) -> (String, Value) {
    let svc = c.service(PROMETHEUS);
    let path = flag(&svc.command(), "--config.file").unwrap_or_else(|| "/etc/prometheus/prometheus.yml".into());
    let (host, key) = svc.mounted(&path, "Prometheus' --config.file");
    assert!(host.is_file(), "{COMPOSE}: {key}: {} is not a file", rel(&host));
    let file = rel(&host);
    (file.clone(), parse_yaml(&file))
}

/// The port Prometheus listens on inside its container.
fn prometheus_port(c: &Compose) -> u16 {
    let svc = c.service(PROMETHEUS);
    flag(&svc.command(), "--web.listen-address")
        .map_or(9090, |a| host_port(&a, COMPOSE, &svc.key("command")).1)
}

/// job_name -> targets of Prometheus' static scrape configs.
fn scrape_jobs(file: &str, doc: &Value) -> BTreeMap<String, Vec<String>> {
    let configs = doc
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("{file}: scrape_configs: missing or not a list"));
    let mut jobs = BTreeMap::new();
    for (i, job) in configs.iter().enumerate() {
        let name = scalar(job.get("job_name").unwrap_or_else(|| panic!("{file}: scrape_configs[{i}].job_name: missing")), file, "job_name");
        let mut targets = Vec::new();
        for (j, sc) in job.get("static_configs").and_then(Value::as_sequence).into_iter().flatten().enumerate() {
            for (k, t) in sc.get("targets").and_then(Value::as_sequence).into_iter().flatten().enumerate() {
                targets.push(scalar(t, file, &format!("scrape_configs[{i}].static_configs[{j}].targets[{k}]")));
            }
        }
        jobs.insert(name, targets);
    }
    jobs
}

#[test]
fn prometheus_scrapes_pgduplex_where_it_listens() {
    let c = Compose::load();
    let (file, doc) = prometheus_config(&c);
    let listen = PgduplexConfig::load(&c).metrics_listen();
    let names: BTreeSet<String> = c.services().iter().map(|s| s.name.clone()).collect();
    let mut scraped = false;
    for (job, targets) in scrape_jobs(&file, &doc) {
        for t in targets {
            let key = format!("scrape_configs[job_name={job}].static_configs.targets");
            let (host, port) = host_port(&t, &file, &key);
            assert!(names.contains(&host) || host == "localhost", "{file}: {key}: {t:?}: {host:?} is not a service of {COMPOSE}");
            if host == PGDUPLEX {
                assert_eq!(port, listen.port(), "{file}: {key}: {t:?}: pgduplex's metrics.listen port is {}", listen.port());
                scraped = true;
            }
        }
    }
    assert!(scraped, "{file}: scrape_configs: no target {PGDUPLEX}:{}", listen.port());
    let deps: Vec<String> = c.service(PROMETHEUS).depends_on().into_iter().map(|(d, _)| d).collect();
    assert!(deps.iter().any(|d| d == PGDUPLEX), "{COMPOSE}: services.{PROMETHEUS}.depends_on: missing {PGDUPLEX}");
}

/// Grafana's provisioning directory inside its container.
fn grafana_provisioning(c: &Compose) -> String {
    c.service(GRAFANA)
        .environment()
        .get("GF_PATHS_PROVISIONING")
        .cloned()
        .unwrap_or_else(|| "/etc/grafana/provisioning".into())
}

/// The YAML files of a host directory, as repository paths, sorted.
fn yaml_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: cannot list: {e}", rel(dir)))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .map(|p| rel(&p))
        .collect();
    files.sort();
    files
}

/// uid -> (file, url) of the provisioned Prometheus data sources.
fn grafana_datasources(c: &Compose) -> BTreeMap<String, (String, String)> {
    let svc = c.service(GRAFANA);
    let (dir, key) = svc.mounted(&format!("{}/datasources", grafana_provisioning(c)), "Grafana's data sources");
    let mut out = BTreeMap::new();
    let files = yaml_files(&dir);
    assert!(!files.is_empty(), "{COMPOSE}: {key}: {} holds no data source file", rel(&dir));
    for file in files {
        let doc = parse_yaml(&file);
        for (i, ds) in doc.get("datasources").and_then(Value::as_sequence).into_iter().flatten().enumerate() {
            let field = |k: &str| ds.get(k).map(|v| scalar(v, &file, &format!("datasources[{i}].{k}")));
            if field("type").as_deref() != Some("prometheus") {
                continue;
            }
            let uid = field("uid").unwrap_or_else(|| panic!("{file}: datasources[{i}].uid: missing (the dashboard refers to it)"));
            let url = field("url").unwrap_or_else(|| panic!("{file}: datasources[{i}].url: missing"));
            out.insert(uid, (file.clone(), url));
        }
    }
    out
}

#[test]
fn grafana_datasource_is_the_prometheus_service() {
    let c = Compose::load();
    let sources = grafana_datasources(&c);
    assert!(!sources.is_empty(), "{COMPOSE}: services.{GRAFANA}: no Prometheus data source provisioned");
    let port = prometheus_port(&c);
    for (uid, (file, url)) in sources {
        let key = format!("datasources[uid={uid}].url");
        let authority = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_else(|| panic!("{file}: {key}: {url:?} is not an http URL"))
            .split('/')
            .next()
            .unwrap_or_default();
        let (host, p) = authority.rsplit_once(':').map_or((authority, 80), |(h, p)| {
            (h, p.parse().unwrap_or_else(|_| panic!("{file}: {key}: {url:?}: bad port")))
        });
        assert_eq!(host, PROMETHEUS, "{file}: {key}: {url:?} does not name the {PROMETHEUS} service");
        assert_eq!(p, port, "{file}: {key}: {url:?}: Prometheus listens on {port}");
    }
    let svc = c.service(GRAFANA);
    let http_port = svc.environment().get("GF_SERVER_HTTP_PORT").map_or(3000, |p| p.parse().expect("GF_SERVER_HTTP_PORT"));
    assert!(
        svc.ports().iter().any(|p| p.container == http_port && p.host == Some(3000)),
        "{COMPOSE}: {}: Grafana's port {http_port} is not published on 3000",
        svc.key("ports")
    );
    let deps: Vec<String> = svc.depends_on().into_iter().map(|(d, _)| d).collect();
    assert!(deps.iter().any(|d| d == PROMETHEUS), "{COMPOSE}: {}: missing {PROMETHEUS}", svc.key("depends_on"));
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"].as_array().into_iter().flatten().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        out.push(p);
    }
    out
}

#[test]
fn grafana_dashboards_are_provisioned_and_query_defined_metrics() {
    let c = Compose::load();
    let svc = c.service(GRAFANA);
    let sources = grafana_datasources(&c);
    let (prom_file, prom_doc) = prometheus_config(&c);
    let jobs = scrape_jobs(&prom_file, &prom_doc);
    let defined = defined_metrics();
    let by_name: BTreeMap<&str, &str> = defined.iter().map(|(k, v)| (v.as_str(), k.as_str())).collect();
    let metrics_text: String = read(METRICS_RS).chars().filter(|c| !c.is_whitespace()).collect();
    let is_histogram =
        |ident: &str| metrics_text.contains(&format!("histogram({ident},")) || metrics_text.contains(&format!("HistogramOpts::new({ident},"));

    // Provider files -> the directories of dashboard JSON they load.
    let (prov_dir, key) = svc.mounted(&format!("{}/dashboards", grafana_provisioning(&c)), "Grafana's dashboard providers");
    let providers = yaml_files(&prov_dir);
    assert!(!providers.is_empty(), "{COMPOSE}: {key}: {} holds no dashboard provider file", rel(&prov_dir));
    let mut dashboards = Vec::new();
    for file in providers {
        let doc = parse_yaml(&file);
        let list = doc.get("providers").and_then(Value::as_sequence).unwrap_or_else(|| panic!("{file}: providers: missing"));
        for (i, p) in list.iter().enumerate() {
            let kind = p.get("type").map_or("file".into(), |t| scalar(t, &file, &format!("providers[{i}].type")));
            assert_eq!(kind, "file", "{file}: providers[{i}].type");
            let path = p
                .get("options")
                .and_then(|o| o.get("path"))
                .map(|v| scalar(v, &file, &format!("providers[{i}].options.path")))
                .unwrap_or_else(|| panic!("{file}: providers[{i}].options.path: missing"));
            let (dir, _) = svc.host_path(&path).unwrap_or_else(|| {
                panic!("{file}: providers[{i}].options.path: {path} is not bind-mounted in {COMPOSE} services.{GRAFANA}.volumes")
            });
            let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{file}: providers[{i}].options.path: {} ({path}): {e}", rel(&dir)))
                .map(|e| e.expect("directory entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            assert!(!found.is_empty(), "{file}: providers[{i}].options.path: {} ({path}) holds no .json dashboard", rel(&dir));
            found.sort();
            dashboards.extend(found);
        }
    }

    // The home dashboard, when set, is one of the mounted files.
    if let Some(home) = svc.environment().get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        let (host, key) = svc.mounted(home, "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH");
        assert!(host.is_file(), "{COMPOSE}: {key}: {} (home dashboard) is not a file", rel(&host));
    }

    let mut used = BTreeSet::new();
    let mut uids = BTreeSet::new();
    for path in dashboards {
        let file = rel(&path);
        let d: serde_json::Value =
            serde_json::from_str(&read(&file)).unwrap_or_else(|e| panic!("{file}: not valid JSON: {e}"));
        let uid = d["uid"].as_str().unwrap_or_else(|| panic!("{file}: uid: missing"));
        assert!(uids.insert(uid.to_string()), "{file}: uid: {uid:?} is used by another dashboard");
        assert!(d["title"].is_string(), "{file}: title: missing");

        // (where, datasource, expressions) of every panel target and template variable.
        let mut queries: Vec<(String, &serde_json::Value, Vec<&str>)> = Vec::new();
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let id = p["id"].as_u64().unwrap_or_else(|| panic!("{file}: panels[title={}].id: missing", p["title"]));
            assert!(ids.insert(id), "{file}: panels[id={id}].id: used twice");
            assert!(p["gridPos"].is_object(), "{file}: panels[id={id}].gridPos: missing");
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{file}: panels[id={id}].targets: missing"));
            assert!(!targets.is_empty(), "{file}: panels[id={id}].targets: empty");
            for (i, t) in targets.iter().enumerate() {
                let key = format!("panels[id={id}].targets[{i}]");
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{file}: {key}.expr: missing"));
                let ds = if t["datasource"].is_null() { &p["datasource"] } else { &t["datasource"] };
                queries.push((key, ds, vec![expr]));
            }
        }
        for (i, v) in d["templating"]["list"].as_array().into_iter().flatten().enumerate() {
            if v["type"] != "query" {
                continue;
            }
            let mut exprs: Vec<&str> = [&v["definition"], &v["query"], &v["query"]["query"]].into_iter().filter_map(|q| q.as_str()).collect();
            exprs.dedup();
            queries.push((format!("templating.list[{i}]"), &v["datasource"], exprs));
        }

        for (key, ds, exprs) in queries {
            let ds_uid = ds["uid"].as_str().unwrap_or_else(|| panic!("{file}: {key}.datasource.uid: missing"));
            assert!(sources.contains_key(ds_uid), "{file}: {key}.datasource.uid: {ds_uid:?} is not a provisioned data source ({:?})", sources.keys());
            for expr in exprs {
                for name in metric_names(expr) {
                    let ok = by_name.contains_key(name.as_str())
                        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                            name.strip_suffix(suffix).and_then(|base| by_name.get(base)).is_some_and(|ident| is_histogram(ident))
                        });
                    assert!(ok, "{file}: {key}.expr: metric {name:?} is not defined in {METRICS_RS} (in {expr:?})");
                    let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s).filter(|b| by_name.contains_key(b)));
                    used.insert(base.unwrap_or(&name).to_string());
                }
                for job in job_matchers(expr) {
                    assert!(jobs.contains_key(&job), "{file}: {key}.expr: job {job:?} is not a job_name of {prom_file}");
                }
            }
        }
    }

    // Lag, throughput, conflicts and the rest of what the dashboard is for.
    for ident in [
        "LAG_SECONDS",
        "LAG_BYTES",
        "APPLIED_TRANSACTIONS",
        "APPLIED_CHANGES",
        "CONFLICTS",
        "PARKED_CHANGES",
        "SLOT_RETAINED_WAL_BYTES",
        "PIPELINE_UP",
        "ECHOES_DROPPED",
        "ERRORS",
    ] {
        let name = defined.get(ident).unwrap_or_else(|| panic!("{METRICS_RS}: constant {ident} is gone; update this test"));
        assert!(used.contains(name), "deploy/grafana/dashboards: no panel queries {name} ({METRICS_RS} {ident})");
    }
}

#[test]
fn metric_name_scanner() {
    assert_eq!(
        metric_names(r#"sum by (le) (rate(pgduplex_x_bucket{direction=~"$direction"}[5m])) / my_pgduplex_y + pgduplex_z"#),
        ["pgduplex_x_bucket", "pgduplex_z"]
    );
    assert_eq!(job_matchers(r#"up{job="pgduplex", x="y"}"#), ["pgduplex"]);
    assert_eq!(flag(&["a".into(), "--config".into(), "/x".into()], "--config").as_deref(), Some("/x"));
    assert_eq!(flag(&["--config.file=/y".into()], "--config.file").as_deref(), Some("/y"));
}

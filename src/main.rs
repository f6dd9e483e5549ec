//! The `pgduplex` command line: parse arguments, load the config, call into the library and
//! turn errors into one clear line and an exit code (0 ok, 1 failure, 2 bad config or usage).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

use pgduplex::config::Config;
use pgduplex::metrics::{self, Metrics};
use pgduplex::{pipeline, setup};

/// Keeps two PostgreSQL databases in step through logical replication.
#[derive(Parser)]
#[command(name = "pgduplex", version, about)]
struct Cli {
    /// The TOML config file.
    #[arg(long, short, global = true, default_value = "pgduplex.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two throwaway local clusters replicated both ways under a write load, with a live
    /// summary; stopped and removed at the end (Ctrl-C). Needs no config file.
    Demo {
        /// Stop by itself after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Check prerequisites on both nodes, then create publication, slot, origin and schema.
    Init {
        /// Only check and report what would be created; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Copy every replicated table from this node into the other one (which must be
        /// empty), from the snapshot the replication slot starts at.
        #[arg(long, value_name = "NODE")]
        copy_from: Option<String>,
        /// Tables copied at a time.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// Stream changes until SIGINT/SIGTERM; serves /metrics and /healthz.
    Run,
    /// Remove what init created: slots first, then publications, origins and the schema.
    Teardown,
    /// Where each direction stands: slot, confirmed and applied positions, lag, retained WAL,
    /// applied counts and conflicts, and whether `run` is alive.
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare every replicated table on both nodes, chunk by chunk along the primary key;
    /// exit 0 when identical, 3 when rows differ (listed by key).
    Verify {
        /// Rows per chunk.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: i64,
        /// Keys listed per table and kind of difference.
        #[arg(long, default_value_t = 10)]
        max_keys: usize,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sequences (not carried by logical decoding): interleave them for two-way inserts, or
    /// sync them for cutover.
    Sequences {
        #[command(subcommand)]
        action: SequencesAction,
    },
    /// List parked changes (two-way), or apply or discard them.
    Resolve {
        #[command(subcommand)]
        action: Option<ResolveAction>,
    },
}

#[derive(Subcommand)]
enum ResolveAction {
    /// List the changes parked on both nodes (the default).
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply parked changes on a node: each with every parked change of its row, merged into
    /// the row as it is now.
    Apply(Selection),
    /// Forget parked changes on a node (the node they came from keeps them).
    Discard(Selection),
}

#[derive(Subcommand)]
enum SequencesAction {
    /// Make both nodes' sequences generate disjoint values (increment 2, one node odd, the
    /// other even), restarting above every value used.
    Interleave,
    /// Move every sequence of the other node past this node's value (never backwards).
    Sync {
        /// The node whose sequences are ahead (default: the source of a one-way setup).
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
struct Selection {
    /// The node the changes are parked on.
    #[arg(long)]
    node: String,
    /// Parked change ids, as `resolve list` shows them.
    ids: Vec<i64>,
    /// Every change parked on the node.
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; its log shows only what went wrong.
    let default_log = if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "info,tokio_postgres=warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PGDUPLEX_LOG").unwrap_or_else(|_| default_log.into()))
        .with_writer(std::io::stderr)
        .init();
    if let Command::Demo { seconds } = cli.command {
        // The demo makes its own clusters and config; it logs only warnings over its summary.
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match runtime.block_on(pgduplex::demo::demo(seconds)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the work is I/O-bound, and keeping each pipeline and its connections' tasks on
    // one thread avoids cross-thread wake-ups per statement (measured: less CPU per change).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let result = match cli.command {
            Command::Demo { .. } => unreachable!("handled before the config is loaded"),
            Command::Init { dry_run, copy_from, jobs } => init(config, dry_run, copy_from, jobs).await,
            Command::Run => run(config).await,
            Command::Teardown => teardown(config).await,
            Command::Status { json } => status(config, json).await,
            Command::Verify { chunk_rows, max_keys, json } => return verify(config, chunk_rows, max_keys, json).await,
            Command::Sequences { action } => sequences(config, action).await,
            Command::Resolve { action } => resolve(config, action.unwrap_or(ResolveAction::List { json: false })).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn init(config: Config, dry_run: bool, copy_from: Option<String>, jobs: usize) -> anyhow::Result<()> {
    let copy_from = match copy_from {
        None => None,
        Some(name) => Some(
            config
                .nodes
                .keys()
                .find(|n| n.as_str() == name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("--copy-from {name}: not a node of the config"))?,
        ),
    };
    let opts = setup::InitOptions { dry_run, copy_from, jobs: jobs.max(1) };
    let report = setup::init(&config, &opts).await?;
    for line in report.lines {
        println!("{line}");
    }
    if !dry_run {
        println!("init complete: start streaming with `pgduplex run`");
    }
    Ok(())
}

async fn teardown(config: Config) -> anyhow::Result<()> {
    for line in setup::teardown(&config).await? {
        println!("{line}");
    }
    println!("teardown complete");
    Ok(())
}

async fn sequences(config: Config, action: SequencesAction) -> anyhow::Result<()> {
    let lines = match action {
        SequencesAction::Interleave => setup::sequences::interleave(&config).await?,
        SequencesAction::Sync { from } => {
            let from = match from {
                Some(f) => config
                    .nodes
                    .keys()
                    .find(|n| n.as_str() == f)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("--from {f}: not a node of the config"))?,
                None if !config.two_way() => config.directions[0].source.clone(),
                None => anyhow::bail!("two-way setup: say which node's sequences are ahead with --from <node>"),
            };
            let to = config.nodes.keys().find(|n| **n != from).cloned().ok_or_else(|| anyhow::anyhow!("two nodes are needed"))?;
            setup::sequences::sync(&config, &from, &to).await?
        }
    };
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// Exit code of `verify` when the nodes differ (1 stays "could not run").
const EXIT_DIFFERENT: u8 = 3;

async fn verify(config: Config, chunk_rows: i64, max_keys: usize, json: bool) -> ExitCode {
    let opts = setup::verify::VerifyOptions { chunk_rows: chunk_rows.max(1), max_keys, ..Default::default() };
    let names: Vec<String> = config.nodes.keys().map(|n| n.to_string()).collect();
    let reports = match setup::verify::verify(&config, &opts, |line| if !json { println!("{line}") }).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reports).unwrap_or_default());
    } else {
        for r in reports.iter().filter(|r| !r.identical()) {
            for (what, keys, count) in [
                ("rows differ", &r.changed, r.changed_count),
                (&*format!("only on {}", names[0]), &r.only_first, r.only_first_count),
                (&*format!("only on {}", names[1]), &r.only_second, r.only_second_count),
            ] {
                if count > 0 {
                    println!("  {}: {count} {what}: {}{}", r.table, keys.join(" "), if count as usize > keys.len() { " ..." } else { "" });
                }
            }
        }
    }
    if reports.iter().all(|r| r.identical()) {
        if !json {
            println!("all {} table(s) identical", reports.len());
        }
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENT)
    }
}

async fn status(config: Config, json: bool) -> anyhow::Result<()> {
    let s = setup::status::status(&config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for line in setup::status::render(&s) {
            println!("{line}");
        }
    }
    Ok(())
}

async fn resolve(config: Config, action: ResolveAction) -> anyhow::Result<()> {
    use setup::resolve::{self, Choice};
    let (selection, choice) = match action {
        ResolveAction::List { json } => {
            let parked = resolve::list(&config).await?;
            if json {
                for p in &parked {
                    println!("{}", serde_json::to_string(p)?);
                }
            } else if parked.is_empty() {
                println!("no parked changes");
            } else {
                println!("{:<10} {:>6}  {:<20}  {:<10} {:<12} {:<24} {:<8} {:<20} error", "node", "id", "parked at", "from", "source lsn", "table", "op", "key");
                for p in &parked {
                    println!(
                        "{:<10} {:>6}  {:<20}  {:<10} {:<12} {:<24} {:<8} {:<20} {}",
                        p.node, p.id, p.at, p.source_node, p.source_lsn, p.table, p.op, p.key, p.error
                    );
                }
            }
            return Ok(());
        }
        ResolveAction::Apply(s) => (s, Choice::Apply),
        ResolveAction::Discard(s) => (s, Choice::Discard),
    };
    let node = config
        .nodes
        .keys()
        .find(|n| n.as_str() == selection.node)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("--node {}: not a node of the config", selection.node))?;
    let ids = if selection.all { Vec::new() } else { selection.ids };
    for line in resolve::settle(&config, &node, &ids, choice).await? {
        println!("{line}");
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let labels: Vec<String> = config.directions.iter().map(|d| d.label()).collect();

    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let mut rx = stop_rx.clone();
            let shutdown = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            let listener = metrics::bind(addr).await?;
            info!(%addr, "serving /metrics and /healthz");
            Some(tokio::spawn(metrics::serve(listener, metrics.clone(), labels.clone(), shutdown)))
        }
        None => None,
    };

    let mut tasks = tokio::task::JoinSet::new();
    for d in config.directions.clone() {
        tasks.spawn(pipeline::run_direction(config.clone(), d, metrics.clone(), stop_rx.clone()));
    }

    let mut outcome = Ok(());
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => {
                info!("shutting down");
                break;
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    error!(error = %e, "replication stopped");
                    outcome = Err(anyhow::Error::new(e));
                    break;
                }
                Some(Err(e)) => {
                    outcome = Err(anyhow::anyhow!("a replication task failed: {e}"));
                    break;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(e)) = joined {
            error!(error = %e, "replication stopped");
        }
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    outcome
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

//! Where clusters live on disk, and how they are cleaned up however the test process ends.
//!
//! Layout: `/tmp/pgduplex-test/run-<test pid>/<cluster>/{data,sock}`. Every cluster of a test
//! process lives under its run dir, so "everything this process started" is one directory scan:
//! each `*/data/postmaster.pid` names a postmaster, and the postmaster's cwd (its data dir)
//! confirms the PID still belongs to it.
//!
//! Three layers, because each covers an ending the others miss:
//! 1. `Drop` of a dedicated [`super::Cluster`] (the normal case).
//! 2. An `atexit` handler: libtest ends the process with `exit`, which runs atexit handlers but
//!    never drops statics, so shared clusters (and anything leaked) are stopped here.
//! 3. A watchdog shell in its own session (`setsid`), started with the first cluster: it polls
//!    the test PID once a second and, when the process is gone without having removed its run
//!    dir (SIGKILL, abort, timeout), stops the postmasters and deletes the run dir. It exits by
//!    itself as soon as the run dir is gone.
//!
//! Run dirs of processes that died together with their watchdog (e.g. a machine suspended
//! mid-run, or someone killing the whole session) are reaped by the next test process.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::process::{
    become_subreaper, is_postmaster_of, process_exists, read_postmaster_pid, stop_postmasters,
};

/// `/tmp/pgduplex-test` (or `$PGDUPLEX_TEST_ROOT`), canonical, world-writable with the sticky
/// bit like /tmp itself, so root and non-root runs can share it. Not `std::env::temp_dir()`: a
/// TMPDIR under /root is unreachable for the `postgres` user, and a long one breaks the 107-byte
/// limit of unix socket paths.
pub(crate) fn harness_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::var_os("PGDUPLEX_TEST_ROOT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/pgduplex-test"));
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("creating test root {}: {e}", root.display()));
        // Only the owner can chmod; a root made by someone else is used as it is.
        let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777));
        let templates = root.join("templates");
        let _ = std::fs::create_dir(&templates);
        let _ = std::fs::set_permissions(&templates, std::fs::Permissions::from_mode(0o1777));
        root.canonicalize()
            .unwrap_or_else(|e| panic!("canonicalizing {}: {e}", root.display()))
    })
}

/// This process's run dir, once [`run_dir`] has created it.
static RUN: OnceLock<PathBuf> = OnceLock::new();

/// This process's run dir, created (with the cleanup machinery armed) on first use.
pub(crate) fn run_dir() -> &'static Path {
    RUN.get_or_init(|| {
        become_subreaper();
        reap_stale_run_dirs();
        let run = harness_root().join(format!("run-{}", std::process::id()));
        // A leftover from an earlier process with our PID (its owner is gone: we have its PID).
        reap_run_dir(&run);
        std::fs::create_dir(&run)
            .unwrap_or_else(|e| panic!("creating run dir {}: {e}", run.display()));
        // The server user must traverse it to reach its data and socket dirs.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", run.display()));
        // SAFETY: registering a plain extern "C" fn with no captured state.
        if unsafe { libc::atexit(cleanup_at_exit) } != 0 {
            panic!("atexit registration failed; test clusters would outlive the process");
        }
        spawn_watchdog(&run);
        run
    })
}

extern "C" fn cleanup_at_exit() {
    // Must not panic (that would abort inside exit): reap_run_dir only logs.
    if let Some(run) = RUN.get() {
        reap_run_dir(run);
    }
}

/// Stops every postmaster under `run` and deletes it. Used at exit, and for run dirs whose
/// process is gone. Never panics.
pub(crate) fn reap_run_dir(run: &Path) {
    let Ok(entries) = std::fs::read_dir(run) else {
        return;
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let data = entry.path().join("data");
        if let Some(pid) = read_postmaster_pid(&data)
            && is_postmaster_of(pid, &data)
        {
            pids.push(pid);
        }
    }
    let survivors = stop_postmasters(&pids, Duration::from_secs(10));
    if !survivors.is_empty() {
        eprintln!(
            "pgduplex test harness: postmasters {survivors:?} under {} survived SIGKILL",
            run.display()
        );
    }
    if let Err(e) = std::fs::remove_dir_all(run)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("pgduplex test harness: removing {}: {e}", run.display());
    }
}

/// Reaps run dirs whose test process no longer exists.
fn reap_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(harness_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_exists(pid) {
            reap_run_dir(&entry.path());
        }
    }
}

/// The watchdog (layer 3 above). It is a shell so that it needs nothing built; `setsid` puts it
/// out of the test's process group, so a Ctrl-C or a group kill aimed at the tests spares it.
fn spawn_watchdog(run: &Path) {
    const SCRIPT: &str = r#"
run=$1; parent=$2
while kill -0 "$parent" 2>/dev/null && [ -d "$run" ]; do sleep 1; done
[ -d "$run" ] || exit 0
pids=
for pidfile in "$run"/*/data/postmaster.pid; do
    [ -f "$pidfile" ] || continue
    data=${pidfile%/postmaster.pid}
    pm=$(head -n 1 "$pidfile")
    if [ -n "$pm" ] && [ "$(readlink "/proc/$pm/cwd")" = "$data" ]; then
        kill -QUIT "$pm" 2>/dev/null && pids="$pids $pm"
    fi
done
i=0
while [ $i -lt 100 ]; do
    alive=
    for pm in $pids; do
        state=$(sed 's/.*) //' "/proc/$pm/stat" 2>/dev/null | cut -c1)
        [ -n "$state" ] && [ "$state" != Z ] && alive=1
    done
    [ -z "$alive" ] && break
    sleep 0.1; i=$((i + 1))
done
for pm in $pids; do
    state=$(sed 's/.*) //' "/proc/$pm/stat" 2>/dev/null | cut -c1)
    [ -n "$state" ] && [ "$state" != Z ] && kill -KILL "$pm" 2>/dev/null
done
rm -rf "$run"
"#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg("pgduplex-test-watchdog")
        .arg(run)
        .arg(std::process::id().to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    // The handle is dropped unwaited: the watchdog must outlive us.
    #[allow(clippy::zombie_processes)]
    cmd.spawn()
        .unwrap_or_else(|e| panic!("starting the cluster watchdog: {e}"));
}

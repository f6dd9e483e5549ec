//! Running PostgreSQL's programs as the right user, and watching server processes by PID.
//!
//! PostgreSQL refuses to start as root. When the tests run as root (CI does) the server side runs
//! as the `postgres` user through `runuser`; otherwise as the current user. Clients (psql,
//! tokio-postgres) run as whoever we are: they only talk TCP.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The account the servers run as.
struct ServerUser {
    /// `Some("postgres")` when we are root and must switch users; `None` to run as ourselves.
    switch_to: Option<String>,
    uid: u32,
    gid: u32,
}

fn server_user() -> &'static ServerUser {
    static USER: OnceLock<ServerUser> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid/getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid != 0 {
            return ServerUser {
                switch_to: None,
                uid: euid,
                gid: egid,
            };
        }
        let name = CString::new("postgres").expect("no NUL");
        // SAFETY: getpwnam returns NULL or a pointer to static storage that we read at once;
        // no other thread of the harness calls getpw* concurrently (this runs inside OnceLock).
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            panic!(
                "running as root, so the test servers must run as user 'postgres', which does \
                 not exist; run scripts/install-postgres.sh (Debian's postgresql-15 creates it)"
            );
        }
        // SAFETY: pw is non-null and points at a valid passwd record.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        ServerUser {
            switch_to: Some("postgres".to_string()),
            uid,
            gid,
        }
    })
}

/// The name of the OS user the servers run as (for messages and template keys).
pub fn server_user_name() -> String {
    match &server_user().switch_to {
        Some(name) => name.clone(),
        None => format!("uid {}", server_user().uid),
    }
}

/// The numeric uid the servers run as; part of the template cache key, because a template owned
/// by another account cannot be copied into a usable data dir.
pub(crate) fn server_uid() -> u32 {
    server_user().uid
}

/// Gives `path` to the server user (a no-op when we are that user).
pub(crate) fn chown_to_server_user(path: &Path) -> io::Result<()> {
    let user = server_user();
    if user.switch_to.is_some() {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))?;
    }
    Ok(())
}

/// Environment variables that would make a PostgreSQL program connect somewhere or behave
/// differently from what the harness asked for on its command line.
const PG_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGREQUIRESSL",
    "PGTARGETSESSIONATTRS",
    "PGDATA",
    "PGTZ",
    "PGDATESTYLE",
    "PGCLIENTENCODING",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGCTLTIMEOUT",
    "PSQLRC",
    "PSQL_HISTORY",
];

/// A command for one of the server-side programs (initdb, pg_ctl), run as the server user, in
/// `/` (a cwd under /root would be unreadable for it), with a clean PG environment and C locale
/// (so server messages, which tests may match, are English).
pub(crate) fn server_command(program: &Path) -> Command {
    let mut cmd = match &server_user().switch_to {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", user, "--"]).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    clean_env(&mut cmd);
    cmd.current_dir("/").stdin(Stdio::null());
    cmd
}

/// A command for a client program (psql), run as ourselves.
pub(crate) fn client_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    clean_env(&mut cmd);
    cmd
}

fn clean_env(cmd: &mut Command) {
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C")
        .env_remove("LANG")
        .env_remove("LANGUAGE");
}

/// Runs `cmd` to completion; `Err` carries the exit status and both output streams, so a caller
/// can put them in its panic message.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = describe(cmd);
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("could not run `{shown}`: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{shown}` failed ({})\n--- stdout ---\n{}--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The program and its arguments, without the environment noise of `Command`'s Debug.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes this process a child subreaper, once. `pg_ctl start` forks the postmaster and exits,
/// so the postmaster's parent becomes the nearest subreaper. Without this that is PID 1, which on
/// these machines never reaps: a stopped postmaster would stay a zombie and `kill(pid, 0)` would
/// keep saying it exists. As subreaper we reap it ourselves ([`reap_postmaster`]).
pub(crate) fn become_subreaper() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only sets a flag on this process.
        // Failure (non-Linux) is fine: process_exists also treats zombies as gone.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0);
        }
    });
}

/// Whether a process with this PID exists and is not a zombie (a zombie has exited; only its
/// parent's bookkeeping is left). Only looks: it never reaps, so it is safe on any PID.
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => rc == 0,
    }
}

/// Reaps `pid` if it is an exited child of ours, so that it really disappears (`kill(pid, 0)`
/// then fails with ESRCH). Postmasters become our children through [`become_subreaper`]. Only
/// for postmaster PIDs: on a `std::process::Child` it would steal the exit status.
pub(crate) fn reap_postmaster(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        let mut status = 0;
        // SAFETY: non-blocking waitpid on one PID; ECHILD (not our child) is ignored.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    }
}

/// Whether the postmaster `pid` is still up, reaping it if it has exited.
pub(crate) fn postmaster_alive(pid: u32) -> bool {
    reap_postmaster(pid);
    process_exists(pid)
}

/// Whether `pid` is the postmaster of `data_dir`: the postmaster chdirs into its data dir, so
/// its cwd identifies it. Guards every kill against a PID that was reused since we read it.
pub(crate) fn is_postmaster_of(pid: u32, data_dir: &Path) -> bool {
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => cwd == data_dir,
        // No /proc entry readable: fall back to existence (the caller holds the PID it started).
        Err(_) => postmaster_alive(pid),
    }
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        // SAFETY: plain kill(2) on a positive PID we started.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Stops postmasters the way a crash would: SIGQUIT (immediate shutdown: no checkpoint, WAL
/// replay on the next start), and SIGKILL for any that have not exited after `grace`. Returns
/// the PIDs still alive at the end (normally none).
pub(crate) fn stop_postmasters(pids: &[u32], grace: Duration) -> Vec<u32> {
    for &pid in pids {
        send_signal(pid, libc::SIGQUIT);
    }
    let all_gone = |pids: &[u32]| pids.iter().all(|&p| !postmaster_alive(p));
    if !super::poll_blocking(grace, &mut || all_gone(pids)) {
        for &pid in pids {
            if postmaster_alive(pid) {
                send_signal(pid, libc::SIGKILL);
            }
        }
        super::poll_blocking(Duration::from_secs(10), &mut || all_gone(pids));
    }
    pids.iter()
        .copied()
        .filter(|&p| postmaster_alive(p))
        .collect()
}

/// Reads the PID (first line) of `data_dir/postmaster.pid`.
pub(crate) fn read_postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

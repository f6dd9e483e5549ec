//! initdb once per version per machine; every cluster starts from a copy.
//!
//! initdb takes about a second and most of a core; a copy of its 40 MB output takes a fraction
//! of that. Templates live in `/tmp/pgduplex-test/templates/<key>/data`, where the key names the
//! major version, the server account and a hash of the bin dir and `postgres --version`, so a
//! different build never reuses a stale template. Parallel test processes may race to build the
//! same template: each builds in a private directory and `rename`s it into place; rename of a
//! directory onto an existing non-empty one fails, so the loser throws its copy away and uses
//! the winner's. A template in place is therefore always complete.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::PgVersion;
use super::cleanup::{harness_root, run_dir};
use super::process::{chown_to_server_user, run, server_command, server_uid};

/// The template data dir for `version`, built on first use.
pub(crate) fn template_data_dir(version: PgVersion) -> &'static Path {
    static TEMPLATES: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = match version {
        PgVersion::V15 => &TEMPLATES[0],
        PgVersion::V18 => &TEMPLATES[1],
    };
    slot.get_or_init(|| ensure_template(version))
}

/// -A trust: pg_hba.conf is rewritten for each cluster anyway. --no-sync: a template is a cache,
/// rebuilt if lost. C locale and UTF8 make results independent of the machine.
const INITDB_ARGS: &[&str] = &[
    "-U",
    "postgres",
    "-A",
    "trust",
    "-E",
    "UTF8",
    "--locale=C",
    "--no-sync",
];

fn ensure_template(version: PgVersion) -> PathBuf {
    let bin_dir = version.bin_dir();
    let postgres = bin_dir.join("postgres");
    // Also proves the server account can execute the binaries (e.g. not under /root).
    let server_version = run(server_command(&postgres).arg("--version"))
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|e| {
            panic!(
                "{version}: {} does not run as the server user; run scripts/install-postgres.sh\n{e}",
                postgres.display()
            )
        });
    let mut hasher = DefaultHasher::new();
    (bin_dir.as_os_str(), &server_version).hash(&mut hasher);
    let templates = harness_root().join("templates");
    let key = format!(
        "v{}-u{}-{:016x}",
        version.major(),
        server_uid(),
        hasher.finish()
    );
    let final_dir = templates.join(&key);
    let final_data = final_dir.join("data");
    if final_data.join("PG_VERSION").is_file() {
        return final_data;
    }

    static BUILD: AtomicU64 = AtomicU64::new(0);
    let build_dir = templates.join(format!(
        ".build-{key}-{}-{}",
        std::process::id(),
        BUILD.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&build_dir);
    std::fs::create_dir_all(&build_dir)
        .and_then(|()| chown_to_server_user(&build_dir))
        .unwrap_or_else(|e| panic!("{version}: creating {}: {e}", build_dir.display()));
    let build_data = build_dir.join("data");
    let initdb = bin_dir.join("initdb");
    let result = run(server_command(&initdb)
        .arg("-D")
        .arg(&build_data)
        .args(INITDB_ARGS));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&build_dir);
        panic!("{version}: initdb for the test template failed ({server_version})\n{e}");
    }
    std::fs::write(build_dir.join("server_version"), &server_version)
        .unwrap_or_else(|e| panic!("{version}: writing template stamp: {e}"));
    match std::fs::rename(&build_dir, &final_dir) {
        Ok(()) => {}
        // Another process finished first; its template is as good as ours.
        Err(_) if final_data.join("PG_VERSION").is_file() => {
            let _ = std::fs::remove_dir_all(&build_dir);
        }
        Err(e) => panic!(
            "{version}: moving template {} to {}: {e}",
            build_dir.display(),
            final_dir.display()
        ),
    }
    final_data
}

/// Copies the template into `dest` (which must not exist), keeping owner and modes: the server
/// refuses a data dir that is not its own or is group/world-writable.
pub(crate) fn copy_template(version: PgVersion, dest: &Path) -> Result<(), String> {
    let template = template_data_dir(version);
    run(std::process::Command::new("cp")
        .arg("-a")
        .arg(template)
        .arg(dest))
    .map(|_| ())
}

/// Times a fresh initdb and a copy of the template, the two ways to make a data dir (for the
/// harness self-test's report). Uses scratch dirs under the run dir and removes them.
pub fn initdb_timings(version: PgVersion) -> (Duration, Duration) {
    template_data_dir(version); // build outside the measurement
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let scratch = run_dir().join(format!("timing-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir(&scratch)
        .and_then(|()| chown_to_server_user(&scratch))
        .unwrap_or_else(|e| panic!("creating {}: {e}", scratch.display()));
    let start = Instant::now();
    let initdb = run(server_command(&version.bin("initdb"))
        .arg("-D")
        .arg(scratch.join("fresh"))
        .args(INITDB_ARGS));
    let fresh = start.elapsed();
    let start = Instant::now();
    let copy = copy_template(version, &scratch.join("copy"));
    let copied = start.elapsed();
    let _ = std::fs::remove_dir_all(&scratch);
    initdb.unwrap_or_else(|e| panic!("{version}: timing initdb: {e}"));
    copy.unwrap_or_else(|e| panic!("{version}: timing the template copy: {e}"));
    (fresh, copied)
}

//! `pgduplex demo` under a pseudo-terminal: it runs, shows both directions streaming, ends with
//! both nodes identical, and leaves no cluster, process or directory behind.

use std::process::Command;

#[test]
fn demo_runs_under_a_terminal_and_cleans_up() {
    let bin = env!("CARGO_BIN_EXE_pgduplex");
    let pg_bin = std::env::var("PGDUPLEX_PG15_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    // `script` gives the demo a terminal (its summary then updates one line in place).
    let out = Command::new("script")
        .args(["-qefc", &format!("{bin} demo --seconds 20"), "/dev/null"])
        .env("PGDUPLEX_PG_BIN", &pg_bin)
        .output()
        .expect("run script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "demo failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("txn/s") && text.contains("both nodes identical"), "{text}");
    let dir = text
        .lines()
        .find_map(|l| l.split("clusters in ").nth(1))
        .map(|d| d.trim().to_string())
        .expect("the demo names its directory");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} was not removed");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#!/usr/bin/env bash
# THE test command: installs the PostgreSQL 15 and 18 servers the real-server tests need (fast when
# already there), points the tests at them, and runs every test target in release mode (the crash
# and throughput tests move a million rows; debug builds make them crawl).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh --test harness  # extra args go to `cargo test` as given
#
# PGDUPLEX_PG15_BIN / PGDUPLEX_PG18_BIN, when already set, win over the installed defaults.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

install_out=$(bash "$repo/scripts/install-postgres.sh")
installed() {
    sed -n "s/^$1=//p" <<<"$install_out" | tail -n 1
}
PGDUPLEX_PG15_BIN=${PGDUPLEX_PG15_BIN:-$(installed PGDUPLEX_PG15_BIN)}
PGDUPLEX_PG18_BIN=${PGDUPLEX_PG18_BIN:-$(installed PGDUPLEX_PG18_BIN)}
export PGDUPLEX_PG15_BIN PGDUPLEX_PG18_BIN
echo "test.sh: PGDUPLEX_PG15_BIN=$PGDUPLEX_PG15_BIN" >&2
echo "test.sh: PGDUPLEX_PG18_BIN=$PGDUPLEX_PG18_BIN" >&2

exec cargo test --release --all-targets "$@"

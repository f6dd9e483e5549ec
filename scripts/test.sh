#!/usr/bin/env bash
# THE test command: installs the PostgreSQL 15 and 18 servers the real-server tests need (fast when
# already there), points the tests at them, and runs every test target in release mode (the crash
# and throughput tests move a million rows; debug builds make them crawl).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh --test harness  # extra args go to `cargo test` (a target flag replaces
#                                        # the default --lib --bins --tests)
#   bash scripts/test.sh -- --nocapture  # args after -- go to the test binaries
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

# Every test target by default; when the caller picks targets (--test harness, --lib, ...), only
# those: cargo would otherwise run the defaults *and* the picked ones. Benchmarks are built (so
# they cannot rot) but not run: they are measurements, never a gate.
targets=(--lib --bins --tests)
for arg in "$@"; do
    case $arg in
        --) break ;;
        --lib | --bin | --bin=* | --bins | --test | --test=* | --tests | --bench | --bench=* \
            | --benches | --example | --example=* | --examples | --doc | --all-targets)
            targets=()
            break
            ;;
    esac
done
if [ ${#targets[@]} -gt 0 ]; then
    cargo build --release --benches
fi
exec cargo test --release "${targets[@]}" "$@"

#!/usr/bin/env bash
# A one-way replication demo on this machine: starts two throwaway clusters (PostgreSQL 15 as
# the "old" node, 18 as the "new" one), replicates a table from old to new with pgduplex while
# writes run, shows both sides and the metrics, then stops and removes everything.
#
#   bash scripts/local-demo.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

eval "$(bash scripts/install-postgres.sh | grep '^PGDUPLEX_PG1[58]_BIN=')"
cargo build --release --quiet --bin pgduplex
bin=$repo/target/release/pgduplex

work=$(mktemp -d /tmp/pgduplex-demo.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
    if [ -n "${run_pid:-}" ]; then kill "$run_pid" 2>/dev/null; wait "$run_pid" 2>/dev/null || true; fi
    [ -f "$work/old/postmaster.pid" ] && as_pg "$PGDUPLEX_PG15_BIN/pg_ctl" -D "$work/old" -m fast -w stop >/dev/null
    [ -f "$work/new/postmaster.pid" ] && as_pg "$PGDUPLEX_PG18_BIN/pg_ctl" -D "$work/new" -m fast -w stop >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

start() { # name bindir port
    as_pg "$2/initdb" -D "$work/$1" -U postgres -A trust >/dev/null
    as_pg "$2/pg_ctl" -D "$work/$1" -l "$work/$1.log" -w -o "-p $3 -k $work -c listen_addresses=127.0.0.1 -c wal_level=logical" start >/dev/null
    "$2/psql" -X -q -h 127.0.0.1 -p "$3" -U postgres -c "CREATE DATABASE app"
    "$2/psql" -X -q -h 127.0.0.1 -p "$3" -U postgres -d app -c \
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric(10,2), note text)"
}
old_port=$(free_port); new_port=$(free_port)
echo "== starting PostgreSQL 15 (old, port $old_port) and 18 (new, port $new_port)"
start old "$PGDUPLEX_PG15_BIN" "$old_port"
start new "$PGDUPLEX_PG18_BIN" "$new_port"
psql_old() { "$PGDUPLEX_PG15_BIN/psql" -X -At -h 127.0.0.1 -p "$old_port" -U postgres -d app -c "$1"; }
psql_new() { "$PGDUPLEX_PG18_BIN/psql" -X -At -h 127.0.0.1 -p "$new_port" -U postgres -d app -c "$1"; }

metrics_port=$(free_port)
cat > "$work/pgduplex.toml" <<TOML
[nodes.old]
url = "postgresql://postgres@127.0.0.1:$old_port/app"
[nodes.new]
url = "postgresql://postgres@127.0.0.1:$new_port/app"
[replication]
direction = "old-to-new"
tables = ["public.*"]
[metrics]
listen = "127.0.0.1:$metrics_port"
TOML
echo "== pgduplex init"
"$bin" init --config "$work/pgduplex.toml"
echo "== pgduplex run (in the background), writes on old"
"$bin" run --config "$work/pgduplex.toml" 2> "$work/run.log" &
run_pid=$!
for i in $(seq 1 20); do
    psql_old "INSERT INTO orders (customer, amount) SELECT 'customer ' || g, g * 1.5 FROM generate_series(1, 500) g" >/dev/null
    psql_old "UPDATE orders SET note = 'updated in round $i' WHERE id % 7 = $((i % 7))" >/dev/null
done
psql_old "DELETE FROM orders WHERE id % 10 = 0" >/dev/null
want=$(psql_old "SELECT count(*) || ' rows, checksum ' || md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o")
for i in $(seq 1 100); do
    got=$(psql_new "SELECT count(*) || ' rows, checksum ' || md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o")
    [ "$got" = "$want" ] && break
    sleep 0.1
done
echo "old: $want"
echo "new: $got"
[ "$got" = "$want" ] && echo "== in step" || { echo "== NOT in step; log:"; cat "$work/run.log"; exit 1; }
echo "== a few metrics from http://127.0.0.1:$metrics_port/metrics"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics').read().decode())" \
    | grep -E '^pgduplex_(applied|lag|pipeline_up)' || true
kill "$run_pid"; wait "$run_pid" 2>/dev/null || true; run_pid=
echo "== pgduplex teardown"
"$bin" teardown --config "$work/pgduplex.toml"

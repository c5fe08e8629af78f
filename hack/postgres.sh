#!/usr/bin/env bash
# Starts a throwaway PostgreSQL on 127.0.0.1 (a free port, a temporary data directory, trust
# auth) for the ledger's PostgreSQL tests and benchmark, and prints the variables to use it:
#
#   eval "$(hack/postgres.sh)"
#   cargo test -p kommune-operator --lib ledger          # runs the PostgreSQL suite too
#   cargo bench -p kommune-store --bench ledger       # adds a postgres line
#
# Uses the server binaries under /usr/lib/postgresql/<version>/bin (Debian/Ubuntu:
# apt-get install postgresql). PostgreSQL refuses to run as root, so as root the server runs
# as the `postgres` user (or `nobody` when there is none). Stop it with the command printed as
# the last (comment) line, or `hack/postgres.sh stop <dir>`.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$BIN" || ! -x "$BIN/initdb" || ! -x "$BIN/pg_ctl" ]]; then
    log "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; install them with: apt-get install postgresql"
    exit 1
fi

# Run as an unprivileged user when we are root.
AS=()
if [[ "$(id -u)" == 0 ]]; then
    if id postgres >/dev/null 2>&1; then RUNAS=postgres; else RUNAS=nobody; fi
    AS=(runuser -u "$RUNAS" --)
fi

if [[ "${1:-}" == stop ]]; then
    DIR="${2:?usage: hack/postgres.sh stop <dir>}"
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2
    rm -rf "$DIR"
    exit 0
fi

free_port() {
    local p
    for p in $(seq 54329 54999); do
        # Nothing answers on a free port, so the connect fails.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    log "no free port between 54329 and 54999"
    exit 1
}
PORT="${KOMMUNE_PG_PORT:-$(free_port)}"

DIR="$(mktemp -d "${TMPDIR:-/tmp}/kommune-pg.XXXXXX")"
chmod 0755 "$DIR"
if [[ ${#AS[@]} -gt 0 ]]; then chown "$RUNAS" "$DIR"; fi

log "initialising $DIR/data with $BIN"
"${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --no-instructions >"$DIR/initdb.log" 2>&1 || {
    cat "$DIR/initdb.log" >&2
    exit 1
}
log "starting on 127.0.0.1:$PORT"
"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 30 \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >&2 || {
    cat "$DIR/server.log" >&2
    exit 1
}

URL="postgres://postgres@127.0.0.1:$PORT/postgres"
echo "export KOMMUNE_TEST_DATABASE_URL=$URL"
echo "export DATABASE_URL=$URL"
echo "# stop with: $0 stop $DIR"

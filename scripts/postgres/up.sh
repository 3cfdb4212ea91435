#!/usr/bin/env bash
# Start a private PostgreSQL server on loopback for the tests (Debian's package).
#
#   bash scripts/postgres/up.sh      # install postgresql if missing, initdb, start, create role + database
#   bash scripts/postgres/down.sh    # stop exactly the server this script started
#
# Everything lives under ${AUTOPIPEC_PG_DIR:-/tmp/autopipec-pg}: data/ (the cluster, owned by the
# postgres user, which the server needs: it refuses to run as root), the socket, the log, and
# pgpass (mode 600). The server listens on 127.0.0.1:${AUTOPIPEC_PG_PORT:-54329} only, with password
# (scram) authentication. Role "autopipec" may create databases (each test makes its own).
# The password lives only in that pgpass file: clients find it through PGPASSFILE (env.sh exports
# it), never in a URL: postgresql://autopipec@127.0.0.1:54329/autopipec.
set -euo pipefail

T0=$(date +%s.%N)
STATE=${AUTOPIPEC_PG_DIR:-/tmp/autopipec-pg}
PORT=${AUTOPIPEC_PG_PORT:-54329}
ROLE=autopipec
DB=autopipec
PASSWORD=${AUTOPIPEC_PG_PASSWORD:-autopipec-ci-$(hostname)}

say() { echo "[postgres-up] $*"; }
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1 - $2}'; }

find_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    return 1
}

BIN=$(find_bin || true)
if [ -z "$BIN" ]; then
    say "installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    BIN=$(find_bin)
fi

as_pg() { runuser -u postgres -- "$@"; }

if [ -f "$STATE/data/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$STATE/data" status >/dev/null 2>&1; then
    say "already running on 127.0.0.1:$PORT (data in $STATE/data)"
    exit 0
fi

rm -rf "$STATE"
mkdir -p "$STATE/data" "$STATE/run"
chown -R postgres:postgres "$STATE"
printf '%s\n' "$PASSWORD" > "$STATE/pw.tmp"
chown postgres "$STATE/pw.tmp"
chmod 600 "$STATE/pw.tmp"
as_pg "$BIN/initdb" -D "$STATE/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$STATE/initdb.log" 2>&1 || { cat "$STATE/initdb.log" >&2; exit 1; }
rm -f "$STATE/pw.tmp"
as_pg "$BIN/pg_ctl" -D "$STATE/data" -l "$STATE/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $STATE/run -c max_connections=200 -c fsync=off" start >/dev/null
as_pg "$BIN/psql" -h "$STATE/run" -p "$PORT" -U postgres -q -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'" -c "CREATE DATABASE $DB OWNER $ROLE" >/dev/null

PGPASS=$STATE/pgpass
printf '127.0.0.1:%s:*:%s:%s\n' "$PORT" "$ROLE" "$PASSWORD" > "$PGPASS"
chmod 600 "$PGPASS"
cat > "$STATE/env.sh" <<ENV
export PGPASSFILE=$PGPASS
export AUTOPIPEC_TEST_POSTGRES=postgresql://$ROLE@127.0.0.1:$PORT/$DB
ENV
say "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT, database $DB, role $ROLE; ready in $(elapsed) s"
say "clients: source $STATE/env.sh (PGPASSFILE and AUTOPIPEC_TEST_POSTGRES)"

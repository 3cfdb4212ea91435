#!/usr/bin/env bash
# Stop the PostgreSQL server of scripts/postgres/up.sh (and only that one).
set -euo pipefail
STATE=${AUTOPIPEC_PG_DIR:-/tmp/autopipec-pg}
[ -d "$STATE/data" ] || exit 0
for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/pg_ctl" ]; then
        runuser -u postgres -- "$d/pg_ctl" -D "$STATE/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
        break
    fi
done
echo "[postgres-down] stopped the server in $STATE"

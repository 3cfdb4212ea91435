#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by up.sh: exactly the daemons whose pid files it left in
# ${AUTOPIPEC_SLURM_DIR:-/tmp/autopipec-slurm}/run (slurmd, slurmctld, slurmdbd, mariadbd, munged).
# SIGTERM, wait (bounded), then SIGKILL. Never fails when they are already stopped; idempotent.
# Keeps configs, logs and the MariaDB datadir (up.sh wipes the controller state and the accounting
# database on its next start anyway).
set -euo pipefail

STATE=${AUTOPIPEC_SLURM_DIR:-/tmp/autopipec-slurm}
RUN=$STATE/run
WAIT_S=${AUTOPIPEC_SLURM_STOP_WAIT_S:-15}

# running PID: the process exists and is not a zombie (in a container, PID 1 may reap zombies late).
running() {
    kill -0 "$1" 2>/dev/null || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# stop NAME: stop the process in $RUN/NAME.pid if it is alive and still is NAME.
stop() {
    local name=$1 f=$RUN/$1.pid pid comm i t0
    [ -f "$f" ] || return 0
    pid=$(tr -dc 0-9 <"$f" 2>/dev/null || true)
    if [ -z "$pid" ] || ! running "$pid"; then
        rm -f "$f"
        return 0
    fi
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [ "$comm" != "$name" ]; then # the pid was reused by something else
        echo "[slurm-down] $f: pid $pid is '$comm', not $name; leaving it alone"
        rm -f "$f"
        return 0
    fi
    t0=$(date +%s.%N)
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < WAIT_S * 10; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        echo "[slurm-down] $name (pid $pid) did not stop in ${WAIT_S} s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            running "$pid" || break
            sleep 0.1
        done
    fi
    rm -f "$f"
    echo "[slurm-down] stopped $name (pid $pid) in $(echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}') s"
}

# slurmstepd processes of this cluster (they run with their cwd in $STATE/log) and their descendants.
our_steps() {
    local p
    for p in $(pgrep -x slurmstepd || true); do
        case "$(readlink "/proc/$p/cwd" 2>/dev/null)" in "$STATE"/*) running "$p" && echo "$p" ;; esac
    done
}
descendants() { # pids of the given pids and all their descendants
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END { do { changed = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } } while (changed)
              for (p in keep) print p }'
}

# Running jobs would outlive slurmd: cancel them while the controller still answers, wait a little,
# then SIGKILL what is left of this cluster's job steps and their processes.
if [ -n "$(our_steps)" ]; then
    if [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF=$STATE/etc/slurm.conf
        jobs=$(timeout 5 squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            timeout 5 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [ -n "$(our_steps)" ] || break
                sleep 0.1
            done
        fi
    fi
    steps=$(our_steps)
    if [ -n "$steps" ]; then
        # shellcheck disable=SC2086
        pids=$(descendants $steps)
        echo "[slurm-down] killing leftover job processes:" $pids
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
fi

# Order: compute node, controller, accounting daemon, database, authentication.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done

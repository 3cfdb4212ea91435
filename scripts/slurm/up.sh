#!/usr/bin/env bash
# Start a real single-node SLURM cluster (with accounting and one fake GPU) on this machine.
#
# For CI and local testing on Debian 12 as root, without systemd. Idempotent: if the cluster
# started by an earlier run is still up and answering, it only says so; otherwise it stops
# whatever is left of it (down.sh) and starts everything afresh.
#
#   bash scripts/slurm/up.sh         # installs the Debian packages if missing, starts the daemons
#   bash scripts/slurm/down.sh       # stops exactly the daemons this script started
#
# Everything lives under ${AUTOPIPEC_SLURM_DIR:-/tmp/autopipec-slurm}: configs (etc/), logs (log/),
# pid files (run/), the MariaDB datadir (mysql/), slurmd spool (spool/) and the controller state
# (state/, wiped on every start, and so is the accounting database: job ids start again at 1).
#
# How clients find the config: the daemons get SLURM_CONF=${STATE}/etc/slurm.conf (gres.conf and
# slurmdbd.conf sit next to it). For clients, /etc/slurm/slurm.conf is made a symlink to that file,
# so plain `sbatch`/`sacct`/`scontrol`, and submitit calling them from Python subprocesses, work
# without any environment variable. ${STATE}/env.sh also exports SLURM_CONF for those who prefer it.
#
# Cluster "autopipec-ci", node "ci-node" (NodeAddr 127.0.0.1, all CPUs, Gres=gpu:1 backed by
# /dev/null, so `--gres=gpu:1` gives CUDA_VISIBLE_DEVICES=0), partitions "gpu" (default) and "cpu".
set -euo pipefail

T0=$(date +%s.%N)
STATE=${AUTOPIPEC_SLURM_DIR:-/tmp/autopipec-slurm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=autopipec-ci
NODE=ci-node
ACCOUNT=ci
DB_PORT=${AUTOPIPEC_SLURM_DB_PORT:-33061}
DB_PASS=autopipec-ci
WAIT_S=${AUTOPIPEC_SLURM_WAIT_S:-60}
ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
export SLURM_CONF=$ETC/slurm.conf
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

say() { echo "[slurm-up] $*"; }
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1 - $2}'; }

tails() {
    local f
    for f in "$LOG"/*.log; do
        [ -f "$f" ] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2
    done
}

die() {
    echo "[slurm-up] ERROR: $*" >&2
    tails
    exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local end=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || die "timed out after ${limit} s waiting for $what"
        sleep 0.2
    done
}

pid_alive() { # pid_alive NAME: the process in $RUN/NAME.pid is alive
    local pid
    pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

cluster_ready() {
    [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ] && sacct -n -X -S now-1minutes >/dev/null 2>&1
}

# ---------------------------------------------------------------- already up?
if pid_alive slurmd && pid_alive slurmctld && pid_alive slurmdbd && pid_alive mariadbd \
    && [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$ETC/slurm.conf" ] \
    && cluster_ready; then
    say "already running (state in $STATE); nothing to do"
    say "source $STATE/env.sh   # optional: /etc/slurm/slurm.conf points at the same config"
    exit 0
fi
# Something (or nothing) is left of an earlier start: stop it, start clean.
bash "$HERE/down.sh" >/dev/null

# ---------------------------------------------------------------- packages
need=()
for c in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
    command -v "$c" >/dev/null 2>&1 || need+=("$c")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing Debian packages (missing: ${need[*]})"
    TI=$(date +%s.%N)
    pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"${TMPDIR:-/tmp}/autopipec-slurm-apt.log" 2>&1; then
        apt-get update -q >>"${TMPDIR:-/tmp}/autopipec-slurm-apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"${TMPDIR:-/tmp}/autopipec-slurm-apt.log" 2>&1 \
            || { tail -n 30 "${TMPDIR:-/tmp}/autopipec-slurm-apt.log" >&2; echo "[slurm-up] ERROR: apt-get install failed" >&2; exit 1; }
    fi
    say "packages installed in $(echo "$(date +%s.%N) $TI" | awk '{printf "%.1f", $1 - $2}') s"
fi

# ---------------------------------------------------------------- folders and configs
rm -rf "$STATE/state" "$STATE/spool" "$RUN" "$LOG"
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/state" "$STATE/spool/$NODE"

CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
CTLD_HOST=$(uname -n)
CTLD_HOST=${CTLD_HOST%%.*} # slurmctld checks SlurmctldHost against its short host name

cat >"$ETC/slurm.conf" <<EOF
# Written by scripts/slurm/up.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$CTLD_HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Settings that work in a container (no cgroups, no systemd).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval: the main scheduler tests all pending jobs every 2 s (default 60 s). A job whose
# BeginTime has passed (a requeued job, see cred_expire) is started only by that periodic pass.
SchedulerParameters=batch_sched_delay=0,sched_interval=${AUTOPIPEC_SLURM_SCHED_INTERVAL:-2}
# A job whose dependency can never be met (afterok on a failed job) is cancelled, not left pending.
DependencyParameters=kill_invalid_depend
ReturnToService=2
# A finished job leaves squeue after 60 s; sacct (what submitit reads) keeps it.
MinJobAge=60
KillWait=10
InactiveLimit=0
# A requeued job (e.g. a submitit Checkpointable job at its time limit) gets BeginTime =
# requeue + cred_expire + 1 s (default cred_expire 120 s): the old job credential stays revoked
# that long, and starting it earlier (scontrol update StartTime=now) makes it FAIL at once with
# "Job credential revoked". cred_expire is also the lifetime of a step credential: 10 s is ample here.
AuthInfo=cred_expire=${AUTOPIPEC_SLURM_CRED_EXPIRE:-10}
# submitit reads job states only through sacct, so accounting is required.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=UNLIMITED State=UP
PartitionName=cpu Nodes=$NODE MaxTime=UNLIMITED State=UP
EOF

cat >"$ETC/gres.conf" <<EOF
# One fake GPU: without File= the node goes INVAL.
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF

cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chown root:root "$ETC/slurmdbd.conf"
chmod 600 "$ETC/slurmdbd.conf"

cat >"$STATE/env.sh" <<EOF
# Written by scripts/slurm/up.sh. /etc/slurm/slurm.conf points at the same file.
export SLURM_CONF=$ETC/slurm.conf
EOF

# Clients (sbatch, sacct, scontrol, submitit) read /etc/slurm/slurm.conf when SLURM_CONF is unset.
mkdir -p /etc/slurm
ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf

# ---------------------------------------------------------------- munge
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running (not started here, will not be stopped by down.sh)"
else
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    if id munge >/dev/null 2>&1; then MUSER=munge; else MUSER=root; fi
    chown "$MUSER:" /etc/munge/munge.key /etc/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$MUSER:" /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    if [ "$MUSER" = root ]; then
        munged --force </dev/null >>"$LOG/munged.log" 2>&1 || die "munged did not start"
    else
        runuser -u munge -- munged </dev/null >>"$LOG/munged.log" 2>&1 || die "munged did not start"
    fi
    wait_for 10 "munged pid file" test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$RUN/munged.pid"
    wait_for 10 "munged" bash -c 'munge -n </dev/null | unmunge'
fi

# ---------------------------------------------------------------- MariaDB (private instance)
DATADIR=$STATE/mysql
SOCK=$STATE/mysql.sock
if [ ! -d "$DATADIR/mysql" ]; then
    rm -rf "$DATADIR"
    mariadb-install-db --no-defaults --datadir="$DATADIR" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
fi
setsid mariadbd --no-defaults --datadir="$DATADIR" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
    --socket="$SOCK" --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadbd.log" --skip-name-resolve \
    --skip-log-bin --innodb-buffer-pool-size=256M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
MYSQL=(mariadb --no-defaults --socket="$SOCK" -uroot)
wait_for 30 "mariadbd" "${MYSQL[@]}" -e 'SELECT 1'
# A fresh accounting database on every start, to match the fresh controller state (job ids restart).
"${MYSQL[@]}" <<EOF || die "setting up the accounting database failed"
DROP DATABASE IF EXISTS slurm_acct_db;
CREATE DATABASE slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

# ---------------------------------------------------------------- slurmdbd, accounts
slurmdbd </dev/null >>"$LOG/slurmdbd.stdout" 2>&1 || die "slurmdbd did not start"
wait_for 30 "slurmdbd" sacctmgr -n show cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=ci Organization=ci >/dev/null \
    || die "sacctmgr add account failed"
sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null || die "sacctmgr add user failed"

# ---------------------------------------------------------------- slurmctld, slurmd
slurmctld </dev/null >>"$LOG/slurmctld.stdout" 2>&1 || die "slurmctld did not start"
wait_for 30 "slurmctld" scontrol ping
slurmd -N "$NODE" </dev/null >>"$LOG/slurmd.stdout" 2>&1 || die "slurmd did not start"

end=$(($(date +%s) + WAIT_S))
until cluster_ready; do
    if [ "$(date +%s)" -ge "$end" ]; then
        sinfo -N -l >&2 || true
        die "node $NODE not idle (or sacct not answering) after ${WAIT_S} s"
    fi
    # A node drained by an earlier run stays drained: resume it.
    case "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" in
        drain* | down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done

say "cluster $CLUSTER: node $NODE, partitions gpu (default) and cpu; state in $STATE"
say "config: $ETC/slurm.conf (also /etc/slurm/slurm.conf); optional: source $STATE/env.sh"
say "slurm ready in $(elapsed) s"

#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `hydra/launcher=slurm` and to test it.
#
#   bash scripts/slurm_local.sh start    # install slurm-wlm and munge if missing (root + apt-get),
#                                        # start munged, slurmctld and slurmd, wait for the node
#   export SLURM_CONF=$(bash scripts/slurm_local.sh conf)   # then sbatch, sinfo, bioexp train -m
#   bash scripts/slurm_local.sh status   # the node and the queue
#   bash scripts/slurm_local.sh stop     # stop the daemons and delete the cluster's folder
#
# Everything lives in one folder, $BIOEXP_SLURM_DIR (default /tmp/bioexp-slurm): slurm.conf, a
# private munge key and socket, state, spool and logs. The system's own munge and slurm
# configuration are left alone, so clients need SLURM_CONF to find this cluster. The node has the
# machine's cores and memory (`slurmd -C`) and one partition, `debug`. Jobs run as root, like the
# daemons (SlurmUser=root).
#
# Exit codes: 0 done; 3 the cluster cannot be started here (not root, no apt-get, packages not
# installable), with the reason on stderr; 1 anything else (the daemons' logs are printed).
set -euo pipefail

DIR=${BIOEXP_SLURM_DIR:-${TMPDIR:-/tmp}/bioexp-slurm}
PORT=${BIOEXP_SLURM_PORT:-6817}          # slurmctld's port; slurmd takes the next one
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket

say() { echo "slurm_local: $*" >&2; }
cannot() { say "cannot start a local SLURM cluster: $*"; exit 3; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || cannot "slurm-wlm and munge are not installed, and installing them \
needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed, and there \
is no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
            || cannot "apt-get install slurm-wlm munge failed"
    fi
}

running() {  # the pid in file $1 is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
    SLURM_CONF=$CONF sinfo -h -N -o %t 2>/dev/null | head -n 1
}

logs() {
    for log in "$DIR"/munge/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
        [ -f "$log" ] && { say "--- $log"; tail -n 20 "$log" >&2; }
    done
    return 0
}

write_conf() {
    local host node
    host=$(hostname -s)
    # The node as slurmd sees it (CPUs, sockets, cores, memory), reachable on the loopback.
    node=$(slurmd -C | head -n 1)
    node=${node/RealMemory=/NodeAddr=127.0.0.1 RealMemory=}
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster for trying and testing bioexp.
ClusterName=bioexp-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=30
MinJobAge=300
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_packages
    [ "$(id -u)" -eq 0 ] || cannot "the daemons run as root here (SlurmUser=root); run as root"
    if running "$DIR/slurmctld.pid"; then
        case "$(node_state)" in
            idle | mix | alloc) say "already running ($CONF)"; echo "$CONF"; return 0 ;;
        esac
    fi
    stop quiet
    local t0=$SECONDS
    mkdir -p "$DIR"/munge "$DIR"/state "$DIR"/spool
    chmod 700 "$DIR" "$DIR"/munge
    # A private munge daemon with its own key and socket, beside any system one.
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || { logs; say "munged did not start"; exit 1; }
    write_conf
    SLURM_CONF=$CONF slurmctld -c -f "$CONF" || { logs; say "slurmctld did not start"; exit 1; }
    SLURM_CONF=$CONF slurmd -f "$CONF" || { logs; say "slurmd did not start"; exit 1; }
    local state=""
    for _wait in $(seq 1 120); do
        state=$(node_state)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        logs
        say "the node did not become idle in 60 s (state: ${state:-unknown})"
        stop quiet
        exit 1
    fi
    say "cluster up in $((SECONDS - t0)) s; clients need: export SLURM_CONF=$CONF"
    echo "$CONF"
}

stop() {
    if [ -f "$CONF" ] && running "$DIR/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        SLURM_CONF=$CONF scontrol shutdown >/dev/null 2>&1 || true
    fi
    local pidfile i
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        for i in $(seq 1 40); do  # 10 s to go after shutdown or SIGTERM, then SIGKILL
            running "$pidfile" || break
            if [ "$i" -eq 1 ] || [ "$i" -eq 20 ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
            sleep 0.25
        done
        if running "$pidfile"; then kill -9 "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    rm -rf "$DIR"
    [ "${1:-}" = quiet ] || say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    conf) echo "$CONF" ;;
    status)
        if running "$DIR/slurmctld.pid"; then
            SLURM_CONF=$CONF sinfo
            SLURM_CONF=$CONF squeue
        else
            say "not running"
            exit 1
        fi
        ;;
    logs) logs ;;
    *) echo "usage: bash scripts/slurm_local.sh start|stop|status|conf|logs" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and demos (as root):
#   slurm/local-cluster.sh up|down|status
# munge, slurmctld and NODES (default 3) `slurmd -N nodeK` daemons, each its own node with
# its own port and NodeAddr=127.0.0.1, advertising GPUS_PER_NODE (default 8) placeholder GPUs
# (character devices like /dev/null), so GPU job scripts run unchanged on a CPU machine:
# Slurm sets CUDA_VISIBLE_DEVICES, torch finds no GPU and the launcher uses CPU + gloo.
# Needs Debian's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge).
set -euo pipefail

NODES=${NODES:-3}
CPUS=${CPUS_PER_NODE:-2}
GPUS=${GPUS_PER_NODE:-8}
PORT_BASE=${SLURMD_PORT_BASE:-17000}
CONF=/etc/slurm
STATE=/var/spool/slurmctld
LOGS=/var/log/slurm
HOST=$(hostname)

up() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || { echo "error: slurmctld/munged not found: apt-get install slurm-wlm munge" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || { echo "error: run as root (it starts system daemons)" >&2; exit 2; }
    down quiet
    # munge: a key, then the daemon
    [ -f /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged  # munged refuses root when its dirs belong to munge
    # placeholder GPU devices
    mkdir -p /var/lib/fakegpu
    for i in $(seq 0 $((GPUS - 1))); do [ -e /var/lib/fakegpu/gpu$i ] || mknod /var/lib/fakegpu/gpu$i c 1 3; done
    rm -rf "$STATE" && mkdir -p "$STATE" "$LOGS" "$CONF"
    {
        echo "ClusterName=local"
        echo "SlurmctldHost=$HOST"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "StateSaveLocation=$STATE"
        echo "SlurmdSpoolDir=/var/spool/slurmd/%n"
        echo "SlurmdPidFile=/var/run/slurmd-%n.pid"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "ReturnToService=2"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "MpiDefault=none"
        echo "GresTypes=gpu"
        echo "JobRequeue=1"
        # Notice a dead node within seconds (defaults: minutes) so failure tests stay short.
        echo "SlurmdTimeout=${SLURMD_TIMEOUT:-10}"
        # A requeued job waits out the job credential's lifetime before it may start again
        # (Slurm's default 120 s, at least 5). Kept at the default: with 30 s a requeued job
        # restarted on a node whose slurmd had just come back, and that slurmd terminated the
        # new run's step (same job and step id as the lost one); slurm/README.md.
        echo "AuthInfo=cred_expire=${CRED_EXPIRE:-120}"
        echo "KillWait=5"
        echo "MinJobAge=600"
        echo "SlurmctldLogFile=$LOGS/slurmctld.log"
        echo "SlurmdLogFile=$LOGS/slurmd-%n.log"
        for k in $(seq 1 "$NODES"); do
            echo "NodeName=node$k NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT_BASE + k)) CPUs=$CPUS RealMemory=10000 Gres=gpu:$GPUS"
        done
        echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF/slurm.conf"
    {
        echo "AutoDetect=off"
        echo "NodeName=node[1-$NODES] Name=gpu File=/var/lib/fakegpu/gpu[0-$((GPUS - 1))]"
    } > "$CONF/gres.conf"
    slurmctld -i
    for k in $(seq 1 "$NODES"); do
        mkdir -p "/var/spool/slurmd/node$k"
        slurmd -N "node$k"
    done
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u)" = "idle" ]; then status; return 0; fi
        sleep 0.5
    done
    echo "error: nodes did not become idle:" >&2; sinfo >&2 || true; exit 1
}

down() {
    scontrol shutdown >/dev/null 2>&1 || true
    sleep 0.5
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    [ "${1:-}" = quiet ] || echo "local cluster stopped"
}

status() {
    sinfo -o "%N %G %t"
    squeue
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

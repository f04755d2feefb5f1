#!/usr/bin/env bash
# The generic body of every job script (slurm/train_7b.sh and friends run it):
#   CONFIG=configs/x.yaml GPUS_PER_NODE=8 [SPARE_NODES=1] bash slurm/launch.sh [section.key=value ...]
# inside an allocation. One `srun` step per training node runs torchrun for that node's GPUs;
# the nodes meet through a c10d rendezvous on the first training node.
#
# What happens when things go wrong (docs: slurm/README.md):
#   configuration error  -> checked before anything starts (launcher --dry-run for this node's
#                           GPU, slurm/gpu.sh); exit 2, no requeue
#   pre-emption warning  -> (SIGUSR1 to this script, #SBATCH --signal=B:USR1@...) the workers get
#                           SIGUSR1, checkpoint the current step, and the job requeues itself
#   a node or process dies -> the survivors' collectives fail (parallel.collective_timeout_s at
#                           worst) and their step ends. Inside the same allocation (the job is
#                           submitted --no-kill, so Slurm keeps it): every node is probed, and the
#                           first SLURM_NNODES - SPARE_NODES healthy ones restart from the latest
#                           complete checkpoint, on a new rendezvous port. With too few healthy
#                           nodes (or MAX_RECOVERIES used up) the job requeues itself as before: at
#                           most MAX_REQUEUES times. If this script's own node dies, a watchdog
#                           step on another node requeues the job.
# Every decision is one line, stamped [t=<unix time>], so a recovery can be timed from the log.
set -uo pipefail

CONFIG=${CONFIG:?set CONFIG to a config file}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SPARE_NODES=${SPARE_NODES:-0}            # allocated nodes beyond the training nodes, taken when one dies
MAX_RECOVERIES=${MAX_RECOVERIES:-3}      # restarts inside one allocation after a failure
MAX_REQUEUES=${MAX_REQUEUES:-5}          # requeues after failures (pre-emptions do not count)
MAX_RESTARTS=${MAX_RESTARTS:-0}          # torchrun restarts of a node's workers (same nodes, same step)
PROBE_TIMEOUT=${PROBE_TIMEOUT:-5}        # seconds a healthy node takes to run `true` as a job step
REQUEUE_SETTLE=${REQUEUE_SETTLE:-60}     # seconds a requeued attempt waits for every node to pass a probe
RDZV_TIMEOUT=${RDZV_TIMEOUT:-120}        # seconds torchrun's agents wait for every training node to join
RDZV_READ_TIMEOUT=${RDZV_READ_TIMEOUT:-60}  # seconds an agent waits on one rendezvous store operation
PYTHON=${PYTHON:-python3}
source "$(dirname "${BASH_SOURCE[0]}")/gpu.sh"  # the GPU the dry run plans for (LAUNCHER_GPU, nvidia-smi)
cd "${LAUNCHER_DIR:-${SLURM_SUBMIT_DIR:-.}}"

say() { echo "[t=$(date +%s.%3N)] $*"; }

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
need=$((SLURM_NNODES - SPARE_NODES))
requeue_count=${SLURM_RESTART_COUNT:-0}
if [ "$need" -lt 1 ]; then
    say "configuration error: SPARE_NODES=$SPARE_NODES leaves no training node of $SLURM_NNODES: ask for more" \
        "nodes (sbatch --nodes) or fewer spares; not starting, not requeueing"
    exit 2
fi
world=$((need * GPUS_PER_NODE))
say "job $SLURM_JOB_ID attempt $requeue_count: $SLURM_NNODES nodes (${nodes[*]}), training on $need" \
    "x $GPUS_PER_NODE = $world processes, $SPARE_NODES spare, config $CONFIG $*"

# A configuration error is never worth a retry: check it before anything starts, for this
# node's GPU (slurm/gpu.sh: $LAUNCHER_GPU, else nvidia-smi's name, else h100, said as assumed).
if ! dry_run_check "$world" "$@"; then
    say "configuration error: not starting, not requeueing"
    exit 2
fi

preempted=0
on_preemption() {
    preempted=1
    say "pre-emption warning: asking the workers to checkpoint"
    # SIGUSR1 to the job's steps (not to this script): torchrun forwards it to the workers
    # (--signals-to-handle), each finishes its step, saves a checkpoint and exits 75, and
    # torchrun waits --shutdown-timeout for them. (SIGTERM to srun would kill the step instead.)
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap on_preemption USR1

node_addr() {  # a node's address as Slurm knows it (NodeAddr), else its name
    local addr
    addr=$(scontrol show node "$1" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    echo "${addr:-$1}"
}

healthy_nodes() {  # the allocation's nodes that run `true` as a job step within PROBE_TIMEOUT, in order
    local node pids=() ok=()
    for node in "${nodes[@]}"; do
        timeout --kill-after=1 "$PROBE_TIMEOUT" srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" \
            --job-name=probe true > /dev/null 2>&1 &
        pids+=($!)
    done
    for i in "${!nodes[@]}"; do
        wait "${pids[$i]}" && ok+=("${nodes[$i]}")
    done
    echo "${ok[*]}"
}

# With --no-kill, Slurm keeps the job when the node running this script dies: it drops that
# node from the job and lets the rest sit idle until the time limit (measured: slurm/README.md).
# A watchdog step on another node requeues the job once this node has left it.
# It acts only on the attempt that started it, while that attempt runs: after a requeue the job
# passes through COMPLETING with some nodes already released, which is no node failure.
WATCHDOG='while sleep "$2"; do
    job=$(scontrol show job "$SLURM_JOB_ID" -o)
    [[ " $job " == *" JobState=RUNNING "* && " $job " == *" Restarts=$3 "* ]] || continue
    list=$(sed -n "s/.* NodeList=\([^ ]*\).*/\1/p" <<< "$job")
    [ -z "$list" ] || scontrol show hostnames "$list" | grep -qx "$1" && continue
    scontrol requeue "$SLURM_JOB_ID" || scancel "$SLURM_JOB_ID"  # first: no srun may be left to print
    echo "[t=$(date +%s.%3N)] watchdog on $SLURMD_NODENAME: $1 (the batch script) left the job: requeued"
    exit 0
done'
batch_host=${SLURMD_NODENAME:-$(hostname -s)}
watchdog="" watchdog_node=""
ensure_watchdog() {  # $@: the healthy nodes; (re)starts the watchdog on the first that is not this one
    local node
    if [ -n "$watchdog" ] && kill -0 "$watchdog" 2>/dev/null && [[ " $* " == *" $watchdog_node "* ]]; then
        return
    fi
    [ -n "$watchdog" ] && kill -KILL "$watchdog" 2>/dev/null
    watchdog="" watchdog_node=""
    for node in "$@"; do
        [ "$node" = "$batch_host" ] && continue
        srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" --job-name=watchdog \
            bash -c "$WATCHDOG" watchdog "$batch_host" "${WATCHDOG_INTERVAL:-10}" "$requeue_count" &
        watchdog=$! watchdog_node=$node
        return
    done
}

recovery=0
steps=()  # one srun per training node, this attempt
step_nodes=()
# The overrides ("$@") are needed inside start_steps, whose own "$@" is the node list.
overrides=("$@")
start_steps() {
    local addr port node
    addr=${MASTER_ADDR:-$(node_addr "$1")}
    # A new port (and rendezvous id) per attempt: the last attempt's store may still hold it.
    port=$((${MASTER_PORT:-20000 + (SLURM_JOB_ID * 16 + requeue_count * 4) % 20000} + recovery))
    if [ "$recovery" = 0 ]; then
        say "start: training on $* (rendezvous $addr:$port)"
    else
        say "restart $recovery: training on $* (rendezvous $addr:$port)"
    fi
    steps=()
    step_nodes=("$@")
    for node in "$@"; do
        srun --nodes=1 --ntasks=1 --nodelist="$node" --kill-on-bad-exit=0 --job-name="train.$recovery" \
            "$PYTHON" -m torch.distributed.run --nnodes "$need" --nproc_per_node "$GPUS_PER_NODE" \
            --rdzv_backend c10d --rdzv_endpoint "$addr:$port" --rdzv_id "$SLURM_JOB_ID.$requeue_count.$recovery" \
            --rdzv_conf "join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_READ_TIMEOUT" \
            --max-restarts "$MAX_RESTARTS" \
            --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
            -m launcher.train --config "$CONFIG" "${overrides[@]}" &
        steps+=($!)
    done
}

# Waits for this attempt's steps. rc: 0 when every step finished cleanly, else the exit code of
# the first step that failed (failed_node: its node). A node that dies takes its srun with it
# only once Slurm marks it DOWN (SlurmdTimeout), so the first failed step is what counts.
watch_steps() {
    local i done=() left
    rc=0 failed_node=""
    while :; do
        left=0
        for i in "${!steps[@]}"; do
            [ -n "${done[$i]:-}" ] && continue
            if kill -0 "${steps[$i]}" 2>/dev/null; then
                left=$((left + 1))
                continue
            fi
            wait "${steps[$i]}"
            done[$i]=$?
            if [ "${done[$i]}" != 0 ] && [ -z "$failed_node" ]; then
                rc=${done[$i]} failed_node=${step_nodes[$i]}
            fi
        done
        [ "$left" = 0 ] && return
        # A failure ends the attempt; during a pre-emption the others are still checkpointing.
        [ -n "$failed_node" ] && [ "$preempted" = 0 ] && return
        sleep 0.2 & wait $!  # (a trapped signal interrupts `wait`, not `sleep`)
    done
}

end_steps() {  # asks Slurm to kill the attempt's steps, without waiting: a step on a dead node
    local ids  # keeps scancel waiting ~10 s for that node's slurmd, which never answers
    ids=$(squeue -h -s -j "$SLURM_JOB_ID" -o "%i %j" | awk -v name="train.$recovery" '$2 == name {print $1}')
    [ -n "$ids" ] && timeout 60 scancel --signal=KILL $ids > /dev/null 2>&1 &
}

forget_steps() {  # the attempt's sruns that still wait (the dead node's: it never reports)
    for pid in "${steps[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait "${steps[@]}" 2>/dev/null
}

requeue_or_give_up() {  # $1: why
    if [ "$requeue_count" -lt "$MAX_REQUEUES" ]; then
        say "$1: requeueing job $SLURM_JOB_ID (attempt $((requeue_count + 1)) of $MAX_REQUEUES)"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    say "$1, and $MAX_REQUEUES requeues are used up: giving up"
    exit 1
}

# A requeued job keeps its id, and its nodes may still be busy with the last attempt's steps
# for a moment: a step started then is refused ("Requested node configuration is not
# available"; seen in CI, where it cost a second requeue). Wait for every node to run a
# probe step first, at most REQUEUE_SETTLE seconds; past that the failure path below decides.
if [ "$requeue_count" -gt 0 ]; then
    settle_until=$(( $(date +%s) + REQUEUE_SETTLE ))
    until [ "$(healthy_nodes)" = "${nodes[*]}" ] || [ "$(date +%s)" -ge "$settle_until" ]; do
        sleep 2
    done
fi
ensure_watchdog "${nodes[@]}"
start_steps "${nodes[@]:0:$need}"
while :; do
    watch_steps
    if [ "$rc" = 0 ] && [ "$preempted" = 0 ]; then
        say "training finished"
        exit 0
    fi
    if [ "$preempted" = 1 ]; then
        say "checkpointed after the pre-emption warning: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    say "failure noticed: the step on $failed_node ended (exit $rc)"
    end_steps
    alive=($(healthy_nodes))
    forget_steps
    say "healthy nodes: ${alive[*]:-none} (${#alive[@]} of ${#nodes[@]}, $need needed)"
    if [ "${#alive[@]}" -lt "$need" ]; then
        requeue_or_give_up "too few healthy nodes"
    fi
    if [ "$preempted" = 1 ]; then  # the warning came while the nodes were probed: no new steps
        say "pre-emption warning during the recovery: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [ "$recovery" -ge "$MAX_RECOVERIES" ]; then
        requeue_or_give_up "$MAX_RECOVERIES recoveries inside this allocation are used up"
    fi
    recovery=$((recovery + 1))
    ensure_watchdog "${alive[@]}"
    start_steps "${alive[@]:0:$need}"
done

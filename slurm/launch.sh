#!/usr/bin/env bash
# The generic body of every job script (slurm/train_7b.sh and friends run it):
#   CONFIG=configs/x.yaml GPUS_PER_NODE=8 bash slurm/launch.sh [section.key=value ...]
# inside an allocation. One `srun` task per node runs torchrun for that node's GPUs; the
# nodes meet through a c10d rendezvous on the first node.
#
# What happens when things go wrong (docs: slurm/README.md):
#   configuration error  -> checked before anything starts (launcher --dry-run); exit 2, no requeue
#   pre-emption warning  -> (SIGUSR1 to this script, #SBATCH --signal=B:USR1@...) the workers get
#                           SIGTERM, checkpoint the current step, and the job requeues itself
#   a node or process dies -> the survivors' collectives fail (parallel.collective_timeout_s at
#                           worst), the step ends, and the job requeues itself; the new allocation
#                           resumes from the latest complete checkpoint. At most MAX_REQUEUES times.
set -uo pipefail

CONFIG=${CONFIG:?set CONFIG to a config file}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_REQUEUES=${MAX_REQUEUES:-5}          # requeues after failures (pre-emptions do not count)
MAX_RESTARTS=${MAX_RESTARTS:-0}          # torchrun restarts inside one allocation
PYTHON=${PYTHON:-python3}
cd "${LAUNCHER_DIR:-${SLURM_SUBMIT_DIR:-.}}"

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
first=${nodes[0]}
# The first node's address as Slurm knows it (NodeAddr), else its name.
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
MASTER_ADDR=${MASTER_ADDR:-$first}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
attempt=${SLURM_RESTART_COUNT:-0}
world=$((SLURM_NNODES * GPUS_PER_NODE))
echo "job $SLURM_JOB_ID attempt $attempt: ${SLURM_NNODES} nodes (${nodes[*]}) x $GPUS_PER_NODE = $world processes," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG $*"

# A configuration error is never worth a retry: check it before anything starts.
if ! "$PYTHON" -m launcher.train --config "$CONFIG" --dry-run --world-size "$world" "$@" > /dev/null; then
    echo "configuration error: not starting, not requeueing"
    exit 2
fi

preempted=0
on_preemption() {
    preempted=1
    echo "pre-emption warning: asking the workers to checkpoint"
    # SIGUSR1 to the job's steps (not to this script): torchrun forwards it to the workers
    # (--signals-to-handle), each finishes its step, saves a checkpoint and exits 75, and
    # torchrun waits --shutdown-timeout for them. (SIGTERM to srun would kill the step instead.)
    scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap on_preemption USR1

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --max-restarts "$MAX_RESTARTS" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
    -m launcher.train --config "$CONFIG" "$@" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for srun itself
    rc=0
    wait "$srun_pid" || rc=$?
done

if [ "$rc" = 0 ] && [ "$preempted" = 0 ]; then
    echo "training finished"
    exit 0
fi
if [ "$preempted" = 1 ]; then
    echo "checkpointed after the pre-emption warning: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ "$attempt" -lt "$MAX_REQUEUES" ]; then
    echo "training step failed (exit $rc): requeueing job $SLURM_JOB_ID (attempt $((attempt + 1)) of $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "training step failed (exit $rc) and $MAX_REQUEUES requeues are used up: giving up"
exit 1

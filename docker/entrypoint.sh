#!/usr/bin/env bash
# Container entrypoint: sane defaults for multi-process training, then run the command as given
# (`docker run IMAGE torchrun --nproc_per_node 8 -m launcher.train ...`).
set -euo pipefail
# One OpenMP thread per process unless the user says otherwise (8 ranks x all cores thrash).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Fail NCCL collectives with an error instead of hanging when a peer dies.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
exec "$@"

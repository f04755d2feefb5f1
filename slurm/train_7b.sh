#!/usr/bin/env bash
# Llama-2-7B (configs/llama_7b.yaml) on 4 nodes x 8 GPUs:  sbatch slurm/train_7b.sh [section.key=value ...]
# Job logs go to logs/ (create it first: mkdir -p logs). With a spare node to recover onto:
#   SPARE_NODES=1 sbatch --nodes=5 slurm/train_7b.sh
# Small test on other hardware:  CONFIG=configs/default.yaml GPUS_PER_NODE=2 sbatch --nodes=2 slurm/train_7b.sh
#SBATCH --job-name=llama7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --no-kill                         # a dead node does not end the job: launch.sh restarts on the others
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out            # stdout and stderr; the directory must exist
export CONFIG=${CONFIG:-configs/llama_7b.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec bash "${LAUNCHER_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"

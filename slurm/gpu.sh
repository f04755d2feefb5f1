# The GPU the pre-launch dry run plans for, sourced by slurm/launch.sh (and by the tests):
#   planned_gpu     sets PLANNED_GPU (a planner preset of parallel/hardware.py, or what
#                   LAUNCHER_GPU says) and PLANNED_GPU_FROM (where that came from)
#   dry_run_check WORLD [section.key=value ...]
#                   `launcher.train --dry-run` of $CONFIG for WORLD ranks of that GPU
# LAUNCHER_GPU wins (a preset name such as h200, or a device name); else the name nvidia-smi
# reports for this node's first GPU, mapped to a preset; else h100, said as assumed. A GPU
# with no preset plans as an H100 (what a launch assumes for its figures, too), said so.

planned_gpu() {
    local name key
    if [ -n "${LAUNCHER_GPU:-}" ]; then
        PLANNED_GPU=$LAUNCHER_GPU
        PLANNED_GPU_FROM="LAUNCHER_GPU"
        return
    fi
    name=""
    if command -v nvidia-smi > /dev/null 2>&1; then
        name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1)
    fi
    if [ -z "$name" ]; then
        PLANNED_GPU=h100
        PLANNED_GPU_FROM="assumed: no nvidia-smi GPU name here; set LAUNCHER_GPU to plan for another"
        return
    fi
    # the preset table lives in parallel/hardware.py: ask it rather than keep a copy here
    if key=$("${PYTHON:-python3}" -c 'import sys
from parallel.hardware import PRESETS, preset
hw = preset(sys.argv[1])
print(next(k for k, v in PRESETS.items() if v is hw))' "$name" 2> /dev/null); then
        PLANNED_GPU=$key
        PLANNED_GPU_FROM="nvidia-smi: $name"
    else
        PLANNED_GPU=h100
        PLANNED_GPU_FROM="nvidia-smi: $name has no planner preset, H100 figures assumed; set LAUNCHER_GPU to choose"
    fi
}

dry_run_check() {
    local world=$1
    shift
    planned_gpu
    echo "[t=$(date +%s.%3N)] dry run for $world x $PLANNED_GPU ($PLANNED_GPU_FROM)"
    "${PYTHON:-python3}" -m launcher.train --config "$CONFIG" --dry-run --world-size "$world" \
        --gpu "$PLANNED_GPU" "$@" > /dev/null
}

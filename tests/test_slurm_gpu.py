"""slurm/launch.sh's dry run plans for the node's GPU (slurm/gpu.sh): LAUNCHER_GPU when set,
else what nvidia-smi names, else an H100, said as assumed. Llama-2-70B on 16 GPUs fits an
H200 and not an H100, so the dry run's verdict shows which GPU it was given. The node's GPU
is a stand-in: an `nvidia-smi` on PATH that prints a name, as the real one does."""

import os
import subprocess
from pathlib import Path

import pytest
from launch import WORKDIR, base_env


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> Path:
    """A directory with an nvidia-smi that answers `--query-gpu=name --format=csv,noheader`
    as on an H200 node (one line per GPU)."""
    root = tmp_path_factory.mktemp("bin")
    tool = root / "nvidia-smi"
    tool.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=name" ] || exit 9\nprintf "NVIDIA H200\\nNVIDIA H200\\n"\n')
    tool.chmod(0o755)
    return root


def dry_run_check(path: str, **env: str) -> subprocess.CompletedProcess:
    """What launch.sh runs before starting anything, with its CONFIG and world size."""
    return bash("dry_run_check 16", path, CONFIG="configs/llama_70b.yaml", **env)


def bash(command: str, path: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**{k: v for k, v in base_env().items() if k != "LAUNCHER_GPU"}, "PATH": path, **env}
    return subprocess.run(["bash", "-c", f"source slurm/gpu.sh && {command}"], cwd=WORKDIR, env=environ,
                          capture_output=True, text=True, timeout=180)


def _path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and not (Path(d) / "nvidia-smi").exists())


def test_the_dry_run_plans_for_the_gpu_nvidia_smi_names(fake_bin):
    detected = dry_run_check(f"{fake_bin}{os.pathsep}{_path_without_nvidia_smi()}")
    assert detected.returncode == 0, detected.stderr
    assert "dry run for 16 x h200 (nvidia-smi: NVIDIA H200)" in detected.stdout


def test_launcher_gpu_wins_over_nvidia_smi(fake_bin):
    chosen = dry_run_check(f"{fake_bin}{os.pathsep}{_path_without_nvidia_smi()}", LAUNCHER_GPU="h100")
    assert "dry run for 16 x h100 (LAUNCHER_GPU)" in chosen.stdout
    assert chosen.returncode == 2 and "(H100-SXM5-80GB)" in chosen.stderr, chosen.stderr  # 70B on 16 H100s: no fit


def test_without_either_it_says_it_assumed_an_h100():
    assumed = dry_run_check(_path_without_nvidia_smi())
    assert "dry run for 16 x h100 (assumed: no nvidia-smi GPU name here" in assumed.stdout
    assert assumed.returncode == 2 and assumed.stderr.count("\n") == 1, assumed.stderr


def test_a_gpu_without_a_preset_plans_as_an_h100_and_says_so(tmp_path):
    (tmp_path / "nvidia-smi").write_text('#!/bin/sh\necho "Tesla V100-SXM2-32GB"\n')
    (tmp_path / "nvidia-smi").chmod(0o755)
    shown = bash('planned_gpu; echo "$PLANNED_GPU|$PLANNED_GPU_FROM"', f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert shown.stdout.strip() == ("h100|nvidia-smi: Tesla V100-SXM2-32GB has no planner preset, H100 figures "
                                    "assumed; set LAUNCHER_GPU to choose"), shown.stderr

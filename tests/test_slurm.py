"""slurm/train_7b.sh on a real Slurm cluster started on this machine (slurm/local-cluster.sh,
three nodes): two nodes x two processes, pre-emption, configuration errors that are not retried,
and a node's death: recovered on a spare node inside the allocation, or, with too few nodes
left or the batch script's node gone, by requeueing the job."""

import importlib.util
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from launch import REPO, read_events, read_metrics, read_records
from launch import WORKDIR  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_recovery", REPO / "bench" / "recovery.py")
recovery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recovery)  # node_processes, kill_node, timeline, breakdown: shared with the benchmark

TINY = ["parallel.tensor=1", "parallel.pipeline=2", "train.log_every=1", "train.eval_every=0", "schedule.warmup_steps=2"]


def _have_slurm() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch")) and os.geteuid() == 0


@pytest.fixture(scope="module")
def cluster():
    if not _have_slurm():
        if os.environ.get("CI") == "true":
            pytest.fail("Slurm is not installed or not root: .ci/run installs slurm-wlm and munge")
        pytest.skip("needs root and Debian's slurm-wlm + munge (apt-get install slurm-wlm munge)")
    # A 30 s credential lifetime instead of Slurm's 120 s: the pre-emption test's requeued job
    # starts 90 s sooner. Safe here: it is the only test whose requeued job runs, and no slurmd
    # is restarted under it (slurm/README.md: why the shipped cluster keeps 120 s). The
    # node-failure tests cancel their requeued jobs at once.
    up = subprocess.run(["bash", "slurm/local-cluster.sh", "up"], cwd=WORKDIR, capture_output=True, text=True, timeout=180,
                        env={**os.environ, "CRED_EXPIRE": "30"})
    assert up.returncode == 0, up.stdout + up.stderr
    assert "node[1-3] gpu:8 idle" in up.stdout
    yield
    subprocess.run(["bash", "slurm/local-cluster.sh", "down"], cwd=WORKDIR, capture_output=True, timeout=120)


def sbatch(tmp_path: Path, *overrides: str, wait: bool = True, config: str = "configs/default.yaml", nodes: int = 2,
           spare: int = 0) -> str:
    env = {**os.environ, "CONFIG": config, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "SPARE_NODES": str(spare)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--cpus-per-task=1", "--gpus-per-node=2", "--time=15",
           f"--output={tmp_path}/job-%j.out", f"--chdir={WORKDIR}", *(["--wait"] if wait else []),
           "slurm/train_7b.sh", *overrides, f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=WORKDIR, env=env, capture_output=True, text=True, timeout=600)
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


def test_bad_config_fails_fast_in_the_job_log_and_is_not_requeued(cluster, tmp_path):
    job = sbatch(tmp_path, *TINY, "model.hiden=64")
    assert wait_for_job(job) == "FAILED"
    log = job_log(tmp_path, job)
    assert "config error: model.hiden: unknown key (did you mean 'hidden'?)" in log
    assert "not requeueing" in log and "Traceback" not in log
    assert job_field(job, "Restarts") == "0" and job_field(job, "ExitCode") == "2:0"


def test_sbatch_on_two_nodes_checkpoints_on_the_preemption_warning_requeues_and_finishes(cluster, tmp_path):
    """`sbatch slurm/train_7b.sh` on two nodes (4 ranks, c10d rendezvous over both), the
    pre-emption warning mid-run, the requeue and the finish."""
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
    for launch in read_events(run, "launch"):  # both attempts: 2 ranks on each node
        assert launch["world_size"] == 4 and sorted(launch["nodes"]) == ["node1", "node1", "node2", "node2"]
    log = job_log(tmp_path, job)
    assert f"job {job} attempt 0: 2 nodes (node1 node2), training on 2 x 2 = 4 processes, 0 spare" in log
    # c10d rendezvous numbers the agents in the order they join: either node may hold rank 0
    assert "nodes node1 x2, node2 x2" in log or "nodes node2 x2, node1 x2" in log
    assert "pre-emption warning: asking the workers to checkpoint" in log
    assert f"checkpointed after the pre-emption warning: requeueing job {job}" in log
    assert f"job {job} attempt 1:" in log and "training finished" in log


def _wait_for_step(job: str, run: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (run / "metrics.jsonl").exists() or not read_metrics(run) or read_metrics(run)[-1]["step"] < step:
        assert time.time() < deadline, f"job {job} did not reach step {step}: {job_field(job, 'JobState')}"
        time.sleep(0.1)


def test_node_failure_recovers_on_the_spare_node_inside_the_allocation(cluster, tmp_path, capsys):
    """Three nodes, one spare: node2 dies mid-step; node1 + node3 resume from the latest
    complete checkpoint in the same job (no requeue) and finish every step."""
    job = sbatch(tmp_path, *TINY, "train.steps=16", "checkpoint.every=5", "parallel.collective_timeout_s=30",
                 wait=False, nodes=3, spare=1)
    run = tmp_path / "run"
    _wait_for_step(job, run, 7)
    killed_at = recovery.kill_node("node2")
    killed_step = read_metrics(run)[-1]["step"]
    try:
        assert wait_for_job(job, timeout=300) == "COMPLETED", job_log(tmp_path, job)
    finally:
        subprocess.run(["slurmd", "-N", "node2"], check=True)  # node2 back for the tests after this one

    assert job_field(job, "Restarts") == "0"  # the same allocation: Slurm did not requeue it, nor did the script
    resumes = read_events(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == (killed_step // 5) * 5  # the latest complete checkpoint
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 17))  # no step missing after the resume
    assert [m["tokens_seen"] for m in metrics] == [s * 16 * 128 for s in range(1, 17)]
    launches = read_events(run, "launch")
    assert sorted(launches[0]["nodes"]) == ["node1", "node1", "node2", "node2"]
    assert sorted(launches[1]["nodes"]) == ["node1", "node1", "node3", "node3"] and launches[1]["attempt"] == 0
    log = job_log(tmp_path, job)
    assert f"job {job} attempt 0: 3 nodes (node1 node2 node3), training on 2 x 2 = 4 processes, 1 spare" in log
    assert "failure noticed: the step on node" in log
    assert "healthy nodes: node1 node3 (2 of 3, 2 needed)" in log
    assert "restart 1: training on node1 node3" in log and "training finished" in log and "requeueing" not in log

    # The breakdown, each phase after the one before it.
    took = recovery.breakdown(recovery.timeline(log, read_records(run), killed_at))
    phases = ["noticed", "probed", "restart", "started", "group_ready", "set_up", "loaded", "first_step"]
    assert list(took) == phases, took
    assert [took[p] for p in phases] == sorted(took[p] for p in phases), took
    assert took["first_step"] < 120, took  # 20-60 s here; a requeued job alone waits cred_expire, 120 s
    with capsys.disabled():
        print("\nin-allocation recovery, s after the kill: " + ", ".join(f"{k} {v}" for k, v in took.items()))


def test_too_few_healthy_nodes_requeue_the_job(cluster, tmp_path, capsys):
    """Two nodes, no spare: node2 dies; node1 alone cannot train, so the job requeues itself.
    (The requeued job's resume from the checkpoint is the pre-emption test's: the same
    `scontrol requeue`. Waiting for it here would add Slurm's 120 s credential wait again.)"""
    import psutil

    job = sbatch(tmp_path, *TINY, "train.steps=40", "checkpoint.every=5", "parallel.collective_timeout_s=30",
                 wait=False)
    run = tmp_path / "run"
    _wait_for_step(job, run, 3)
    survivors = [p for p in psutil.process_iter() if _env(p).get("SLURMD_NODENAME") == "node1"
                 and "launcher.train" in " ".join(_cmdline(p))]
    killed_at = recovery.kill_node("node2")
    try:
        _, alive = psutil.wait_procs(survivors, timeout=90)  # node1 must not hang in a collective
        assert not alive, f"node1 processes still alive 90 s after node2 died: {[p.pid for p in alive]}"
        node1_exit_s = time.time() - killed_at
        deadline = time.time() + 60
        while job_field(job, "Restarts") != "1":
            assert time.time() < deadline, job_log(tmp_path, job)
            time.sleep(0.5)
    finally:
        subprocess.run(["slurmd", "-N", "node2"], check=True)
        subprocess.run(["scancel", job])
    log = job_log(tmp_path, job)
    assert "healthy nodes: node1 (1 of 2, 2 needed)" in log
    assert f"too few healthy nodes: requeueing job {job} (attempt 1 of 5)" in log
    took = recovery.breakdown(recovery.timeline(log, read_records(run), killed_at))
    with capsys.disabled():
        print(f"\nrequeue: node1 processes exited {node1_exit_s:.1f} s after the kill; "
              + ", ".join(f"{k} {v}" for k, v in took.items()))


def test_batch_node_failure_is_requeued_by_the_watchdog(cluster, tmp_path):
    """node1 runs the batch script and dies. With --no-kill Slurm only drops node1 from the job
    and would leave node2 + node3 idle until the time limit; the watchdog step on node2
    requeues the job instead. (Last: it leaves a requeued job behind, cancelled here.)"""
    job = sbatch(tmp_path, *TINY, "train.steps=40", "parallel.collective_timeout_s=30", wait=False, nodes=3, spare=1)
    _wait_for_step(job, tmp_path / "run", 3)
    killed_at = recovery.kill_node("node1")
    try:
        while job_field(job, "Restarts") != "1":  # Slurm drops node1 after SlurmdTimeout (10 s) + its ping cycle
            # 300 s: alone it requeues in ~60 s; under the full suite's load on 2 cores (two
            # xdist workers) the Slurm daemons' ping cycle ran past 90 s in three CI runs in a
            # row, and past 180 s once (not yet explained: see the closing note of issue 27).
            assert time.time() < killed_at + 300, (f"not requeued 300 s after node1 died: {job_field(job, 'JobState')}\n"
                                                   f"{job_log(tmp_path, job)}")
            time.sleep(0.5)
    finally:
        subprocess.run(["slurmd", "-N", "node1"], check=True)
        subprocess.run(["scancel", job])


def _env(proc) -> dict:
    try:
        return proc.environ()
    except Exception:  # noqa: BLE001 - processes come and go
        return {}


def _cmdline(proc) -> list[str]:
    """A process's command line, or [] when it ended between listing and reading (seen in CI:
    a short-lived helper of the node exited after its environment was read)."""
    try:
        return proc.cmdline()
    except Exception:  # noqa: BLE001 - processes come and go, as in _env
        return []

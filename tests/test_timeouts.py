"""parallel.collective_timeout_s bounds every process group: ours (tp, dp, pp), DeepSpeed's own
(pipeline grid) and the world. A peer that never joins makes the others fail, not hang."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from distributed import run_distributed
from launch import base_env, torchrun_cmd

from launcher.ds.pipeline import deepspeed_topology
from parallel.layout import Layout
from parallel.topology import build_process_groups
from launch import WORKDIR  # noqa: E402

TIMEOUT_S = 3.0
MARGIN_S = 12.0  # 8 processes on a couple of cores: scheduling, not the timeout, is the slack
VICTIM = 7  # coordinates (pp 1, dp 1, tp 1): one peer in each of its tp, dp and pp groups


def _group_timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _collectives_without_a_peer(rank, world_size):
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    layout = Layout(world_size=world_size, tp=2, pp=2, dp=2, micro_batch=1, global_batch=2)
    ours = build_process_groups(layout, rank, TIMEOUT_S)
    grid = PipelineParallelGrid(topology=deepspeed_topology(layout))  # DeepSpeed's own new_group calls
    cases = {"tp": (ours.tp_group, ours.tp_ranks), "dp": (ours.dp_group, ours.dp_ranks),
             "pp": (ours.pp_group, ours.pp_ranks),
             "deepspeed pipe": (grid.get_pipe_parallel_group(), grid.pp_group),
             "deepspeed data": (grid.get_data_parallel_group(), grid.dp_group),
             "deepspeed slice": (grid.get_slice_parallel_group(), grid.slice_group)}
    timeouts = {name: _group_timeout(group) for name, (group, _) in cases.items()}
    timeouts["world"] = _group_timeout(dist.group.WORLD)
    timeouts["deepspeed model"] = _group_timeout(grid.get_model_parallel_group())
    # Keeps the ranks in step between cases: a rank whose collective timed out arrives
    # TIMEOUT_S late, which the 3 s groups would not forgive.
    sync = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=120))
    outcomes = {}
    for name, (group, ranks) in cases.items():
        dist.barrier(group=sync)
        if rank == VICTIM:
            continue  # the dead peer: never joins
        if timeouts[name] != timedelta(seconds=TIMEOUT_S):
            outcomes[name] = (VICTIM in ranks, f"not tried: the group's timeout is {timeouts[name]}", 0.0)
            continue  # it would hang for that long
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            outcome = "ok"
        except RuntimeError as err:
            outcome = f"failed: {str(err).splitlines()[0][:200]}"
        outcomes[name] = (VICTIM in ranks, outcome, time.monotonic() - start)
    dist.barrier(group=sync)
    return timeouts, outcomes


def test_every_group_times_out_without_a_peer():
    results = run_distributed(_collectives_without_a_peer, 8, timeout_s=TIMEOUT_S)
    for rank, (_, outcomes) in enumerate(results):
        print(rank, {name: f"{outcome[:40]} {seconds:.2f}s" for name, (_, outcome, seconds) in outcomes.items()})
    for rank, (timeouts, outcomes) in enumerate(results):
        assert set(timeouts.values()) == {timedelta(seconds=TIMEOUT_S)}, (rank, timeouts)
        for name, (with_victim, outcome, seconds) in outcomes.items():
            where = f"rank {rank}, {name} group"
            if with_victim:
                assert outcome.startswith("failed"), (where, outcome)
                assert TIMEOUT_S - 0.5 <= seconds <= TIMEOUT_S + MARGIN_S, (where, seconds, outcome)
            else:
                assert outcome == "ok", (where, outcome)
    # every kind of group was tried with the victim in it by someone
    assert {name for _, outcomes in results for name, (v, _, _) in outcomes.items() if v} == set(results[0][1])


# --------------------------------------------------------------------------------------
# End to end: torchrun, tensor parallel over 2 ranks, one worker stopped mid-training
# --------------------------------------------------------------------------------------

E2E_TIMEOUT_S = 10
E2E_MARGIN_S = 50


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _env_of(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"torchrun exited {proc.returncode} before the first step"
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step record in {metrics} after {limit_s} s")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_stopped_tensor_parallel_peer_ends_the_job_within_the_timeout(tmp_path):
    """SIGSTOP rank 1 of a tp=2 job: rank 0 blocks in a tensor-parallel all-reduce of the
    forward pass, times out after collective_timeout_s, exits non-zero; torchrun then ends
    the stopped worker and exits non-zero. Bounded by the timeout plus a margin."""
    run_dir = tmp_path / "run"
    cmd = [*torchrun_cmd(2), "parallel.tensor=2", "parallel.pipeline=1", "zero.stage=0",
           f"parallel.collective_timeout_s={E2E_TIMEOUT_S}", "train.steps=1000", "train.log_every=1",
           "train.eval_every=0", f"run.dir={run_dir}"]
    log = (tmp_path / "torchrun.log").open("w")
    proc = subprocess.Popen(cmd, cwd=WORKDIR, env=base_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    workers: dict[int, int] = {}
    try:
        _wait_for_step(run_dir, proc, 300)
        workers = {int(_env_of(pid)["RANK"]): pid for pid in _children(proc.pid)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        rank0_gone = None  # when rank 0 itself exited: the launcher's own exit, before torchrun's clean-up
        while proc.poll() is None and time.monotonic() - stopped < E2E_TIMEOUT_S + E2E_MARGIN_S:
            if rank0_gone is None and not _alive(workers[0]):
                rank0_gone = round(time.monotonic() - stopped, 1)
                # What torchrun would do 30 s later (its grace period for a worker that ignores
                # SIGTERM, as a stopped one does): the stopped peer is the dead one, not under test.
                os.kill(workers[1], signal.SIGKILL)
            time.sleep(0.1)
        elapsed = time.monotonic() - stopped
        text = (tmp_path / "torchrun.log").read_text()
        assert proc.poll() is not None, (f"torchrun still running {elapsed:.0f} s after rank 1 was stopped "
                                         f"(rank 0 exited after {rank0_gone} s); log:\n{text[-4000:]}")
        print(f"rank 0 exited {rank0_gone} s and torchrun (exit {proc.returncode}) {elapsed:.1f} s after SIGSTOP "
              f"(timeout {E2E_TIMEOUT_S} s)")
        assert proc.returncode != 0, text[-4000:]
        # Rank 0 failed on its own, from the timeout, and did not hang in its teardown
        # (engine.ds.destroy, destroy_process_group): torchrun reports its exit code.
        assert f"Timed out waiting {E2E_TIMEOUT_S * 1000}ms" in text, text[-4000:]
        assert rank0_gone is not None and E2E_TIMEOUT_S - 1 <= rank0_gone <= E2E_TIMEOUT_S + 15, rank0_gone
        assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 1 ", text), text[-3000:]
        assert not [pid for pid in workers.values() if _alive(pid)], "a worker outlived torchrun"
    finally:
        for pid in workers.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's own session: it and any worker left
            proc.wait()
        log.close()

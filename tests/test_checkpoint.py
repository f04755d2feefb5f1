"""Fault-tolerant checkpoints with real processes and real kills: bit-exact restart under
torchrun, crashes mid-save, corrupt files, signals, and resuming on another data degree."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from launch import (
    base_env,
    losses,
    python_cmd,
    read_events,
    read_metrics,
    read_records,
    run_cli,
    torchrun_cmd,
    train,
)
from launch import WORKDIR  # noqa: E402

BATCH = 8  # sequences per step: the smallest that dp 4 with micro_batch 2 takes
FAST = ["train.eval_every=0", "train.log_every=1", "schedule.warmup_steps=2", f"parallel.global_batch={BATCH}"]
SINGLE = ["parallel.tensor=1", "parallel.pipeline=1"]
PP2_DP2 = ["parallel.tensor=1", "parallel.pipeline=2", "parallel.data=2", "zero.stage=1"]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"exited early with {proc.returncode}: {proc.communicate()[1][-3000:]}"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step and "loss" in r for r in _safe_records(path)):
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def _safe_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def model_tensors(ckpt: Path) -> dict:
    """Every tensor of the model and optimizer files of a checkpoint, by file and key."""
    out = {}
    for path in sorted(ckpt.glob("*.pt")):
        state = torch.load(path, weights_only=False, map_location="cpu")

        def walk(prefix, node):
            if torch.is_tensor(node):
                out[prefix] = node
            elif isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}", v)
            elif isinstance(node, (list, tuple)):
                for i, v in enumerate(node):
                    walk(f"{prefix}[{i}]", v)

        walk(path.name, state)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(torchrun_cmd(4), run_dir, *FAST, *PP2_DP2, "train.steps=40", "checkpoint.every=10")
    return run_dir


def test_sigkill_one_worker_torchrun_restarts_and_resumes_bit_exact(uninterrupted, tmp_path, capsys):
    """pp 2 x dp 2, 40 steps, checkpoint every 10: SIGKILL one worker after step 24; torchrun
    (--max-restarts 1) restarts the group, which resumes from step 20; losses of every step
    and the step-40 weights and optimizer state equal the uninterrupted run's bit for bit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "launcher.train", *FAST, *PP2_DP2,
           "train.steps=40", "checkpoint.every=10", f"run.dir={tmp_path}"]
    agent = subprocess.Popen(cmd, cwd=WORKDIR, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 24, agent)
    workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "launcher.train" in " ".join(p.cmdline())]
    victim = next(p for p in workers if p.environ().get("RANK") == "3")
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, err = agent.communicate(timeout=600)
    assert agent.returncode == 0, err[-5000:]

    resumes = read_events(tmp_path, "resume")
    assert [r["step"] for r in resumes] == [20], resumes
    first_resumed = next(r for r in read_records(tmp_path) if r.get("step") == 21 and r["time"] > killed_at)
    with capsys.disabled():
        print(f"\nrecovery: SIGKILL -> first resumed step (21) logged in {first_resumed['time'] - killed_at:.1f} s")

    ours, reference = read_metrics(tmp_path), read_metrics(uninterrupted)
    assert [m["step"] for m in ours] == list(range(1, 41))
    assert losses(ours) == losses(reference)  # bit for bit
    assert [m["grad_norm"] for m in ours] == [m["grad_norm"] for m in reference]
    assert ours[-1]["tokens_seen"] == reference[-1]["tokens_seen"] == 40 * BATCH * 128
    a, b = model_tensors(tmp_path / "checkpoints/step-00000040"), model_tensors(uninterrupted / "checkpoints/step-00000040")
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        if a[key].numel() == b[key].numel() == 1:  # DeepSpeed restores AdamW's 0-d step as shape [1]
            assert a[key].item() == b[key].item(), key
        else:
            assert torch.equal(a[key], b[key]), key


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    args = [*FAST, *SINGLE, "train.steps=30", "checkpoint.every=10"]
    run_cli(python_cmd(), tmp_path, *args, env=base_env(LAUNCHER_FAULT_KILL_SAVE="20:3"), expect_rc=-signal.SIGKILL)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000010"
    assert not (root / "step-00000020").exists()
    assert (root / ".partial/step-00000020").is_dir() and not (root / ".partial/step-00000020/manifest.json").exists()

    result = run_cli(python_cmd(), tmp_path, *args)
    assert [r["step"] for r in read_events(tmp_path, "resume")] == [10]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 31))
    assert (root / "latest").read_text().strip() == "step-00000030"
    assert not (root / ".partial/step-00000020").exists()  # the abandoned save is cleaned up
    assert "done: 30 steps" in result.stdout


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two")
    train(python_cmd(), run_dir, *FAST, *SINGLE, "train.steps=20", "checkpoint.every=10")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000010", "step-00000020"]
    return run_dir


def test_truncated_file_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    victim = max((run_dir / "checkpoints/step-00000020").glob("*.pt"), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    result = run_cli(python_cmd(), run_dir, *FAST, *SINGLE, "train.steps=22", "checkpoint.every=10")
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: checkpoint step-00000020 skipped: {victim}: size {size // 2}, manifest says {size}"]
    assert [r["step"] for r in read_events(run_dir, "resume")] == [10]


def test_flipped_byte_is_caught_by_the_checksum(two_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    victim = sorted((run_dir / "checkpoints/step-00000020").glob("*.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run_cli(python_cmd(), run_dir, *FAST, *SINGLE, "train.steps=21", "checkpoint.every=10")
    assert f"warning: checkpoint step-00000020 skipped: {victim}: checksum mismatch" in result.stdout
    assert [r["step"] for r in read_events(run_dir, "resume")] == [10]


def test_sigterm_checkpoints_the_current_step_and_exits_75(tmp_path):
    proc = subprocess.Popen([*python_cmd(), *FAST, *SINGLE, "train.steps=100000", f"run.dir={tmp_path}"], cwd=WORKDIR,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stop = read_events(tmp_path, "stop")[-1]
    assert stop["signal"] == "SIGTERM" and stop["exit_code"] == 75
    assert (tmp_path / f"checkpoints/step-{stop['step']:08d}/manifest.json").exists()
    assert read_metrics(tmp_path)[-1]["step"] == stop["step"]
    assert f"stopped by SIGTERM at step {stop['step']}: checkpoint saved; exit 75" in out


def test_sigusr1_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Two srun-style tasks (pp 2); only rank 1 gets Slurm's pre-emption warning."""
    procs = []
    for rank in range(2):
        env = base_env(SLURM_JOB_ID="4711", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                       SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost")
        procs.append(subprocess.Popen([*python_cmd(), *FAST, "parallel.tensor=1", "parallel.pipeline=2",
                                       "train.steps=100000", f"run.dir={tmp_path}"], cwd=WORKDIR, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    wait_for_step(tmp_path, 3, procs[0])
    procs[1].send_signal(signal.SIGUSR1)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    stop = read_events(tmp_path, "stop")[-1]
    assert (tmp_path / f"checkpoints/step-{stop['step']:08d}/manifest.json").exists()
    assert f"stopped by a signal on another rank at step {stop['step']}" in outputs[0][0]


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp2")
    train(torchrun_cmd(2), run_dir, *FAST, *SINGLE, "zero.stage=1", "train.steps=14", "checkpoint.every=10")
    return run_dir


@pytest.mark.parametrize("nproc", [1, 4], ids=["dp1", "dp4"])
def test_resume_dp2_checkpoint_on_another_data_degree(dp2_run, tmp_path, nproc):
    cmd = python_cmd() if nproc == 1 else torchrun_cmd(nproc)
    metrics = train(cmd, tmp_path, *FAST, *SINGLE, "zero.stage=1", "train.steps=14",
                    f"checkpoint.resume={dp2_run / 'checkpoints/step-00000010'}")
    resume = read_events(tmp_path, "resume")[0]
    assert (resume["step"], resume["saved_dp"], resume["dp"]) == (10, 2, nproc)
    reference = {m["step"]: m for m in read_metrics(dp2_run)}
    assert [m["step"] for m in metrics] == [11, 12, 13, 14]
    for m in metrics:  # same samples, same optimizer state: the loss curve continues
        assert abs(m["loss"] - reference[m["step"]]["loss"]) < 1e-4, (m["step"], m["loss"], reference[m["step"]]["loss"])
        assert m["tokens_seen"] == reference[m["step"]]["tokens_seen"] == m["step"] * BATCH * 128  # no gap, no overlap


def test_bf16_zero1_resumes_on_another_data_degree_by_resharding(tmp_path):
    """bf16 with ZeRO 0/1 trains through DeepSpeed's bf16 optimizer (fp32 gradients), whose
    own loader cannot re-partition its shards for another dp: the checkpoint is resharded at
    load (launcher/checkpoint/reshard.py) with one notice, and step 3 continues the dp 2 run."""
    args = [*FAST, *SINGLE, "zero.stage=1", "precision.dtype=bf16", "train.steps=3", "checkpoint.every=2"]
    dp2 = train(torchrun_cmd(2), tmp_path / "dp2", *args)
    result = run_cli(python_cmd(), tmp_path / "dp1", *args, f"checkpoint.resume={tmp_path / 'dp2/checkpoints/step-00000002'}")
    assert ("saved with tensor 1 x pipeline 1 x data 2, ZeRO 1, bf16: resharded to tensor 1 x pipeline 1 x data 1, "
            "ZeRO 1, bf16 at load") in result.stdout
    resumed = read_metrics(tmp_path / "dp1")
    assert [m["step"] for m in resumed] == [3] and read_events(tmp_path / "dp1", "resume")[0]["resharded"]
    assert abs(resumed[0]["loss"] - dp2[2]["loss"]) < 2e-2, (resumed[0]["loss"], dp2[2]["loss"])  # bf16 rounding


def _cli(*args):
    return subprocess.run([*python_cmd(), *args], cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=120)


def test_resume_modes_and_refusals(two_checkpoints, tmp_path):
    """Refusals happen before any process group: one line, exit 2. (The fixture used ZeRO 1.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    cases = [
        (["checkpoint.resume=none"], "checkpoint.resume: none, but"),
        (["model.hidden=64"], "model.hidden: differs from checkpoint"),
        (["parallel.global_batch=32"], "global_batch: differs from checkpoint"),
        (["zero.stage=3"], "zero.stage: checkpoint"),
        (["checkpoint.resume=/no/such/checkpoint"], "checkpoint.resume: expected auto, required, none or a checkpoint"),
    ]
    for extra, message in cases:
        result = _cli(*FAST, *SINGLE, f"run.dir={run_dir}", *extra)
        assert result.returncode == 2, (extra, result.stdout[-2000:], result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    dry = _cli(*FAST, *SINGLE, "zero.stage=3", f"run.dir={run_dir}", "--dry-run")
    assert dry.returncode == 2 and dry.stderr.startswith("config error: zero.stage: checkpoint ")  # as at launch
    other_layout = _cli(*FAST, "parallel.tensor=2", "parallel.pipeline=1", f"run.dir={run_dir}", "--dry-run",
                        "--world-size", "2")
    assert other_layout.returncode == 0, other_layout.stderr  # resharded at load (tests/test_reshard.py)
    empty = _cli(*FAST, *SINGLE, f"run.dir={tmp_path / 'empty'}", "checkpoint.resume=required")
    assert empty.returncode == 2 and "checkpoint.resume: required, but" in empty.stderr


def test_overwrite_starts_over_and_keeps_the_old_records(two_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    metrics = train(python_cmd(), run_dir, *FAST, *SINGLE, "train.steps=3", "checkpoint.resume=none",
                    "checkpoint.overwrite=true")
    assert read_events(run_dir, "resume") == []
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert (run_dir / "metrics.jsonl").read_text().startswith(before)  # appended to, never truncated
    assert [m["step"] for m in metrics] == [1, 2, 3]  # the new attempt's records supersede steps 1-20
    assert [e["step"] for e in read_events(run_dir, "launch")] == [0, 0]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_bad_newer_checkpoint_never_pushes_a_good_one_out(two_checkpoints, tmp_path):
    """step-20 corrupt, step-99 abandoned (no manifest), keep_last 1: the run resumes from
    step 10, and its step-15 save keeps step 15 (the newest good one); the bad newer ones
    are set aside in .abandoned/, not counted and not deleted."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"
    _corrupt(sorted((root / "step-00000020").glob("*.pt"))[0])
    shutil.copytree(root / "step-00000010", root / "step-00000099")
    (root / "step-00000099/manifest.json").unlink()
    args = [*FAST, *SINGLE, "checkpoint.every=5", "checkpoint.keep_last=1"]
    train(python_cmd(), run_dir, *args, "train.steps=15")
    assert [e["step"] for e in read_events(run_dir, "resume")] == [10]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000015"]
    assert sorted(p.name for p in (root / ".abandoned").iterdir()) == ["step-00000020", "step-00000099"]
    assert (root / "latest").read_text().strip() == "step-00000015"
    train(python_cmd(), run_dir, *args, "train.steps=16")
    assert [e["step"] for e in read_events(run_dir, "resume")] == [10, 15]


def test_rewinding_to_an_older_checkpoint_keeps_the_new_timeline(two_checkpoints, tmp_path):
    """Resume by path from step 10 while a good step 20 exists, keep_last 1: the step-15 save
    is kept and `auto` continues from it; step 20 (the left timeline) is set aside, not
    deleted, and not resumed from."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"
    args = [*FAST, *SINGLE, "checkpoint.every=5", "checkpoint.keep_last=1"]
    train(python_cmd(), run_dir, *args, "train.steps=15", f"checkpoint.resume={root / 'step-00000010'}")
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000015"]
    assert (root / ".abandoned/step-00000020/manifest.json").exists()
    train(python_cmd(), run_dir, *args, "train.steps=16")
    assert [e["step"] for e in read_events(run_dir, "resume")] == [10, 15]


def test_auto_resume_refuses_when_no_checkpoint_verifies(two_checkpoints, tmp_path):
    """Checkpoints exist but none verifies: exit 2 naming the newest and its bad file, not a
    silent start from step 0 over the run's history (which stays untouched)."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    victims = [sorted((run_dir / f"checkpoints/step-000000{s}").glob("*.pt"))[0] for s in ("10", "20")]
    for victim in victims:
        _corrupt(victim)
    before = (run_dir / "metrics.jsonl").read_text()
    result = _cli(*FAST, *SINGLE, f"run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"config error: checkpoint.resume: auto, but no checkpoint verifies (newest {run_dir}/checkpoints/step-00000020: "
        f"{victims[1]}: checksum mismatch); resume an older one with checkpoint.resume=PATH, or start over with "
        "checkpoint.resume=none checkpoint.overwrite=true"]
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_checkpoint_cannot_execute_code(two_checkpoints, tmp_path):
    """Files are loaded with torch.load(weights_only=True): a pickle that would run a command
    (planted with a matching manifest entry, as an attacker would) is refused, not run."""
    import xxhash

    for name in ("rng/rank-00000.pt", "mp_rank_00_model_states.pt"):  # ours, DeepSpeed's
        run_dir = tmp_path / name.replace("/", "_")
        shutil.copytree(two_checkpoints, run_dir)
        ckpt = run_dir / "checkpoints/step-00000020"
        marker = tmp_path / f"pwned-{ckpt.name}-{name.replace('/', '_')}"

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"payload": Exploit()}, ckpt / name)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        for entry in manifest["files"]:
            if entry["file"] == name:
                entry.update(size=(ckpt / name).stat().st_size, xxh3=xxhash.xxh3_64((ckpt / name).read_bytes()).hexdigest())
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        result = _cli(*FAST, *SINGLE, "train.steps=21", f"run.dir={run_dir}")
        assert not marker.exists()
        if name.startswith("rng/"):  # ours: refused unread, the resume goes on from the seed, with a warning
            assert result.returncode == 0, result.stderr[-2000:]
            assert f"{ckpt / name}: not plain data (an older checkpoint), refused unread" in result.stdout
        else:  # DeepSpeed's weights: nothing to go on with
            assert result.returncode != 0
            assert "weights_only" in result.stderr or "Unsupported global" in result.stderr, result.stderr[-2000:]


def test_keep_last_retention(tmp_path):
    train(python_cmd(), tmp_path, *FAST, *SINGLE, "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-00000008"
    leftovers = [name for name in os.listdir(tmp_path / "checkpoints/.partial") if name.startswith("step-")]
    assert leftovers == []  # (DeepSpeed also drops its zero_to_fp32.py helper scripts there)


def test_async_save_publishes_complete_checkpoints(tmp_path):
    """checkpoint.async: flush/checksum/publish in the background; the checkpoints are as
    complete as synchronous ones: resuming from one continues bit for bit."""
    first = tmp_path / "async"
    reference = train(python_cmd(), first, *FAST, *SINGLE, "train.steps=12", "checkpoint.every=4",
                      "checkpoint.async=true", "checkpoint.keep_last=3")
    assert [e["background"] for e in read_events(first, "checkpoint")] == [True, True, True]
    root = first / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000004", "step-00000008", "step-00000012"]
    assert all((p / "manifest.json").exists() for p in root.glob("step-*"))
    resumed = train(python_cmd(), tmp_path / "resumed", *FAST, *SINGLE, "train.steps=12",
                    f"checkpoint.resume={root / 'step-00000008'}")
    assert losses(resumed) == losses(reference)[8:]


@pytest.mark.parametrize("run", ["two_checkpoints", "dp2_run", "uninterrupted"])
def test_manifest_hashes_computed_while_writing_match_the_files(run, request):
    """Every rank hashes its files as it writes them (no reading back): the manifest of each
    checkpoint (1 process; dp 2 ZeRO 1 shards; pp 2 x dp 2 layer files) lists exactly the
    files on disk, each with the size and xxh3 of the file as it is on disk."""
    from launcher.checkpoint.store import checksum_file

    for ckpt in sorted((request.getfixturevalue(run) / "checkpoints").glob("step-*")):
        entries = json.loads((ckpt / "manifest.json").read_text())["files"]
        on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert [e["file"] for e in entries] == on_disk
        for entry in entries:
            path = ckpt / entry["file"]
            assert (entry["size"], entry["xxh3"]) == (path.stat().st_size, checksum_file(path)), path

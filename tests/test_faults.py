"""Faults at any moment (issue 17, item 4): a seeded loop of SIGKILLs of a torchrun job, each
at a random moment of a chosen phase (mid-step, mid-save, mid-publish, during the load of a
resume); every time the run resumes from the newest checkpoint that completed, no step is
lost, and the final weights equal an uninterrupted run's bit for bit.

How a kill lands in a phase: steps and saves of the tiny model take milliseconds, so the
killer does not guess with delays alone. It freezes every worker (SIGSTOP) at random
moments, reads what is on disk (and, for the resume, which files the workers hold open),
and kills only when the frozen state is the phase it wants; otherwise it lets them go on
(SIGCONT) and samples again. Freezing the group first makes the kill of several processes
one instant, and tells exactly what a kill interrupted:

    step     nothing of a save in flight (no current .partial/<tag>, publish finished)
    save     .partial/<tag> of this attempt exists, shares of the checksums not all in
             (and rank 0 is not removing them: a state that could be either is resampled)
    publish  all shares in, or the manifest/rename/`latest`/retention of rank 0 not done
    resume   the attempt logged its `launch` (checkpoint chosen and verified), not yet its
             `resume`, and a worker has a file of the checkpoint open (DeepSpeed's load)

Victims: one random worker (torchrun restarts the group), every worker (torchrun restarts
the group), or the whole node (torchrun itself and its workers: the test starts a new
torchrun, as a requeue would). Each torchrun job alternates checkpoint.async, so the
publish is killed in the training thread (sync) and in the background thread (async).

The second test pins one schedule the loop rarely meets on one machine (rank 1 slower than
rank 0): a rank killed before its checksum share must not leave rank 0 waiting for it."""

import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil
import torch
from launch import (
    base_env,
    losses,
    read_events,
    read_metrics,
    torchrun_cmd,
    train,
)
from test_checkpoint import model_tensors
from launch import WORKDIR  # noqa: E402

SEED = 17
KILLS = 20
PHASES = ("step", "save", "publish", "resume")
WORLD = 2
KEEP_LAST = 2
STEPS = 150  # enough that 20 kills (each after 0-0.3 s of training) never reach the end
# pipeline 2 (one layer per stage), the smallest model that exercises the path: a save
# writes ~15 files of < 300 kB, a step takes ~30 ms on a loaded 2-core machine
TINY = ["parallel.tensor=1", "parallel.pipeline=2", "zero.stage=1", "model.layers=2", "model.hidden=32",
        "model.heads=2", "model.kv_heads=1", "model.ffn=64", "model.seq_len=16", "parallel.global_batch=4",
        "parallel.micro_batch=1", "train.eval_every=0", "train.log_every=1", "schedule.warmup_steps=2",
        f"train.steps={STEPS}", "checkpoint.every=1", f"checkpoint.keep_last={KEEP_LAST}"]
TAG_RE = re.compile(r"^step-(\d{8})$")


# --------------------------------------------------------------------------------------
# What is on disk, read while the workers are frozen
# --------------------------------------------------------------------------------------


def published(root: Path) -> list[int]:
    """Steps of the published checkpoints (renamed into place, manifest inside), oldest first."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := TAG_RE.match(p.name)) and (p / "manifest.json").exists())


def _touched_since(path: Path, since: float) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return max(st.st_mtime, st.st_ctime) >= since


def save_phase(root: Path, attempt_start: float, publisher: int) -> tuple[str, Optional[int]]:
    """('save' | 'publish' | 'step', the step of the save in flight) for the current
    attempt, or ('unclear', step) when the frozen state does not say which. `publisher`:
    the pid of rank 0. Leftovers of killed attempts (an abandoned .partial/<tag>, a stale
    `latest`) are older than the attempt and do not count."""
    done = published(root)
    partial_root = root / ".partial"
    in_flight = sorted((p for p in partial_root.iterdir() if TAG_RE.match(p.name) and _touched_since(p, attempt_start)
                        and (not done or int(p.name[5:]) > done[-1])), reverse=True) if partial_root.is_dir() else []
    for partial in in_flight:
        step, parts, state = int(partial.name[5:]), partial / ".parts", partial / "launcher_state.json"
        if not state.exists():
            return "save", step  # DeepSpeed's files, the RNG states: being written
        if not parts.is_dir():
            return "publish", step  # rank 0 has collected and removed the shares
        shares = [p.name for p in parts.iterdir()]
        if len([n for n in shares if re.fullmatch(r"rank-\d{5}\.json", n)]) == WORLD:
            return "publish", step  # rank 0 collects the shares next, writes the manifest, renames
        # Shares missing: not written yet (save), or rank 0 is removing them (publish:
        # shutil.rmtree holds the directory open; so does fsync_path after a rank wrote its
        # own share, hence "unclear" then). Emptied: .parts changed after the state file.
        if not shares:
            changed, written = parts.stat().st_mtime_ns, state.stat().st_mtime_ns
            return ("save" if changed < written else "publish" if changed > written else "unclear"), step
        return ("unclear" if open_files([publisher], str(parts)) else "save"), step
    if done and _touched_since(root / f"step-{done[-1]:08d}", attempt_start):
        latest = (root / "latest").read_text().strip() if (root / "latest").exists() else ""
        if latest != f"step-{done[-1]:08d}" or len([p for p in root.iterdir() if TAG_RE.match(p.name)]) > KEEP_LAST:
            return "publish", done[-1]  # renamed; `latest` or retention not done yet
    return "step", None


def open_files(pids: list[int], prefix: str) -> list[str]:
    """Paths starting with `prefix` that these processes hold open right now."""
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith(prefix):
                found.append(target)
    return found


class Metrics:
    """metrics.jsonl read from an offset on: the records of the attempts after a kill."""

    def __init__(self, path: Path):
        self.path = path

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, offset: int) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read()
        out = []
        for line in data.split(b"\n")[:-1]:  # the last piece: empty, or a line being written
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


# --------------------------------------------------------------------------------------
# The job and its workers
# --------------------------------------------------------------------------------------


@dataclass
class Kill:
    phase: str
    victim: str  # "rank 0", "rank 1", "group" or "node"
    job: int
    async_save: bool
    newest_at_kill: Optional[int]  # newest published checkpoint at the moment of the kill
    in_flight: Optional[int]  # the step of the save in flight, if any
    detail: str = ""
    expected: Optional[int] = None  # newest published once every killed process was gone
    offset: int = 0  # metrics.jsonl size then: what the next attempts write comes after
    killed_at: float = 0.0  # time.time() of the SIGKILL
    gone_at: float = 0.0  # time.time() when every killed process was gone


@dataclass
class Job:
    """One torchrun (an agent and its worker group, restarted after each worker failure)."""

    index: int
    run_dir: Path
    log_dir: Path
    extra: tuple = ()  # overrides after TINY's
    async_save: bool = field(init=False)
    agent: subprocess.Popen = field(init=False)

    def __post_init__(self):
        self.async_save = self.index % 2 == 1
        log = open(self.log_dir / f"torchrun-{self.index}.log", "w")
        cmd = [*torchrun_cmd(WORLD)]
        cmd[cmd.index("--nproc_per_node"):cmd.index("--nproc_per_node")] = ["--max-restarts", "100",
                                                                            "--monitor-interval", "0.1"]
        self.agent = subprocess.Popen([*cmd, *TINY, f"checkpoint.async={str(self.async_save).lower()}",
                                       f"run.dir={self.run_dir}", *self.extra], cwd=WORKDIR, env=base_env(), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.agent.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in children:
            try:
                # (a child forked by torchrun, not yet exec'd, has torchrun's command line, not RANK)
                if ("launcher.train" in " ".join(p.cmdline()) and "RANK" in p.environ()
                        and p.status() != psutil.STATUS_ZOMBIE):
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def tail(self) -> str:
        return (self.log_dir / f"torchrun-{self.index}.log").read_text()[-6000:]


def freeze(procs: list[psutil.Process]) -> None:
    for p in procs:
        _signal(p, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    for p in procs:  # SIGSTOP is asynchronous: wait until each is really stopped
        while time.monotonic() < deadline:
            try:
                if p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                    break
            except psutil.NoSuchProcess:
                break


def thaw(procs: list[psutil.Process]) -> None:
    for p in procs:
        _signal(p, signal.SIGCONT)


def _signal(p: psutil.Process, sig) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def wait_for(what: str, check, job: Job, timeout: float = 120, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if job.agent.poll() is not None:
            raise AssertionError(f"torchrun exited ({job.agent.returncode}) while waiting for {what}:\n{job.tail()}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (a hang?):\n{job.tail()}")


# --------------------------------------------------------------------------------------
# The killer
# --------------------------------------------------------------------------------------


class Killer:
    def __init__(self, rng: random.Random, run_dir: Path, log_dir: Path):
        self.rng, self.run_dir, self.log_dir = rng, run_dir, log_dir
        self.root = run_dir / "checkpoints"
        self.metrics = Metrics(run_dir / "metrics.jsonl")
        self.kills: list[Kill] = []
        self.misses = 0  # resume phases the sampling did not catch (the load was over first)
        self.jobs = [Job(0, run_dir, log_dir)]
        self.ranks: dict[int, str] = {}  # worker pid -> RANK
        self.seen: list[psutil.Process] = []  # every worker, to clean up after a failure

    @property
    def job(self) -> Job:
        return self.jobs[-1]

    def attempt(self) -> tuple[list[psutil.Process], float, int]:
        """The current attempt's workers, when the previous one was gone (whatever on disk
        is older belongs to killed attempts), and where its records begin in metrics.jsonl."""
        last = self.kills[-1] if self.kills else Kill("", "", 0, False, None, None)
        workers = wait_for("the worker group", lambda: (w := self.job.workers()) and len(w) == WORLD and w, self.job)
        for w in workers:
            self.ranks[w.pid] = w.environ()["RANK"]
        self.seen += workers
        return workers, last.gone_at, last.offset

    def kill_in(self, wanted: str) -> None:
        workers, started, offset = self.attempt()
        if wanted == "resume":
            if self._kill_during_load(workers, offset):
                return
            self.misses += 1  # the load finished between two samples: take another phase this time
            wanted = self.rng.choice(PHASES[:3])
        self._kill_in_training(wanted, workers, started, offset)

    def _kill_during_load(self, workers: list[psutil.Process], offset: int) -> bool:
        """Sample while the workers load the checkpoint (after the attempt's `launch` record,
        before its `resume` record); kill on the first sample that has a file of it open."""
        def events() -> list[Optional[str]]:
            return [r.get("event") for r in self.metrics.since(offset)]

        launched = wait_for("the attempt's launch record", lambda: "launch" in events() and events(), self.job,
                            interval=0.02)
        if "resume" in launched or not published(self.root):
            return False  # nothing to load (a fresh start) or already loaded
        pids = [w.pid for w in workers]
        deadline, size, polls = time.monotonic() + 120, self.metrics.size(), 0
        while time.monotonic() < deadline:
            if open_files(pids, f"{self.root}/step-"):
                freeze(workers)
                files = open_files(pids, f"{self.root}/step-")
                if files and "resume" not in events():
                    self._kill(workers, "resume", detail=f"open: {Path(files[0]).name}")
                    return True
                thaw(workers)
            polls += 1
            if polls % 30 == 0:  # every ~10 ms: a new record (the resume), or torchrun gone
                if self.metrics.size() != size and "resume" in events():
                    return False
                if self.job.agent.poll() is not None:
                    raise AssertionError(f"torchrun exited during the load:\n{self.job.tail()}")
            time.sleep(0.0003)
        raise AssertionError(f"no resume record 120 s after launch (a hang?):\n{self.job.tail()}")

    def _kill_in_training(self, wanted: str, workers: list[psutil.Process], started: float, offset: int) -> None:
        wait_for("the attempt's first step", lambda: any("loss" in r for r in self.metrics.since(offset)), self.job,
                 interval=0.02)
        time.sleep(self.rng.uniform(0, 0.3))  # a random step of this attempt, then sample
        publisher = next(w.pid for w in workers if self.ranks[w.pid] == "0")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            freeze(workers)
            phase, step = save_phase(self.root, started, publisher)
            if phase == wanted:
                self._kill(workers, phase, in_flight=step)
                return
            thaw(workers)
            if self.job.agent.poll() is not None:
                raise AssertionError(f"torchrun exited before a kill in phase {wanted}:\n{self.job.tail()}")
            time.sleep(self.rng.uniform(0, 0.004))
        raise AssertionError(f"phase {wanted} not seen in 120 s of sampling")

    def _kill(self, workers: list[psutil.Process], phase: str, in_flight: Optional[int] = None,
              detail: str = "") -> None:
        """Kill the victim(s) of the frozen group, let the rest go on; wait until every old
        worker is gone, then note what a resume must start from."""
        if phase == "publish" and not any(k.phase == "publish" and k.victim != "rank 1" for k in self.kills):
            victim = "rank 0"  # the publisher dies mid-publish at least once, whatever the draws
        else:
            victim = self.rng.choice(["rank 0", "rank 1", "group", "node"])
        done = published(self.root)
        kill = Kill(phase, victim, self.job.index, self.job.async_save, done[-1] if done else None, in_flight, detail)
        if victim == "node":
            os.killpg(self.job.agent.pid, signal.SIGKILL)  # torchrun and every worker (its session)
        for w in workers:
            if victim in ("group", "node") or self.ranks[w.pid] == victim[-1]:
                _signal(w, signal.SIGKILL)
        kill.killed_at = time.time()
        thaw(workers)
        _, alive = psutil.wait_procs(workers, timeout=90)
        assert not alive, f"after the kill ({kill}), workers {[p.pid for p in alive]} still run 90 s later (a hang)"
        done = published(self.root)
        kill.expected, kill.offset, kill.gone_at = (done[-1] if done else None), self.metrics.size(), time.time()
        self.kills.append(kill)
        if victim == "node":
            self.job.agent.wait(timeout=60)
            self.jobs.append(Job(len(self.jobs), self.run_dir, self.log_dir))


def test_random_moment_kills_resume_from_the_newest_checkpoint_bit_exact(tmp_path, capsys):
    """>= 20 seeded kills, every phase hit; each attempt after a kill starts from the newest
    published checkpoint; steps 1..STEPS all logged, losses and step-STEPS weights and
    optimizer state equal the uninterrupted run's bit for bit."""
    started = time.monotonic()
    reference_dir = tmp_path / "uninterrupted"
    reference = train(torchrun_cmd(WORLD), reference_dir, *TINY)
    reference_s = time.monotonic() - started

    rng = random.Random(SEED)
    plan = [phase for _ in range(KILLS // len(PHASES)) for phase in PHASES]
    rng.shuffle(plan)
    run_dir = tmp_path / "faulted"
    killer = Killer(rng, run_dir, tmp_path)
    try:
        for wanted in plan:
            killer.kill_in(wanted)
        while "resume" not in {k.phase for k in killer.kills}:  # every load was missed: try again
            assert killer.misses < 10, "the load of a resume was never caught (10 tries)"
            killer.kill_in("resume")
        rc = killer.job.agent.wait(timeout=300)
    finally:  # after a failure: nothing of the job outlives the test
        for job in killer.jobs:
            if job.agent.poll() is None:
                os.killpg(job.agent.pid, signal.SIGKILL)
        for worker in [*killer.seen, *killer.job.workers()]:
            _signal(worker, signal.SIGKILL)
    assert rc == 0, killer.job.tail()
    total_s = time.monotonic() - started

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    with capsys.disabled():
        print(f"\n{len(killer.kills)} kills ({killer.misses} loads missed) in {len(killer.jobs)} torchrun jobs, "
              f"{total_s:.0f} s (uninterrupted run {reference_s:.0f} s):")
        for i, k in enumerate(killer.kills):
            end = killer.kills[i + 1].offset if i + 1 < len(killer.kills) else None
            resumed = [r["time"] for r in _records_between(run_dir, k.offset, end) if r.get("event") == "resume"]
            timing = f"{k.gone_at - k.killed_at:4.1f} s to exit" + (
                f", resumed {resumed[0] - k.gone_at:4.1f} s later" if resumed else "")
            print(f"  {i:2d} {k.phase:8s} {k.victim:7s} job {k.job} {'async' if k.async_save else 'sync '} newest "
                  f"{k.newest_at_kill} in flight {k.in_flight} -> resume {k.expected} ({timing}) {k.detail}")

    # every kill: the next attempts start from the newest checkpoint published by then
    for i, kill in enumerate(killer.kills):
        end = killer.kills[i + 1].offset if i + 1 < len(killer.kills) else None
        after = [r for r in _records_between(run_dir, kill.offset, end) if r.get("event") in ("launch", "resume")]
        assert after, f"kill {i} ({kill}): no attempt started after it"
        assert kill.expected is not None or kill.newest_at_kill is None
        if kill.newest_at_kill is not None:
            assert kill.expected >= kill.newest_at_kill, f"kill {i}: a published checkpoint vanished ({kill})"
        if kill.victim != "rank 1":  # the publisher died with it: nothing was published after the kill
            assert kill.expected == kill.newest_at_kill, kill
        for record in after:  # launch: the checkpoint chosen; resume: the checkpoint loaded
            assert record["step"] == (kill.expected or 0), f"kill {i} ({kill}): {record}"
        if i + 1 == len(killer.kills) or killer.kills[i + 1].phase != "resume":
            assert [r["event"] for r in after][-2:] == ["launch", "resume"] or kill.expected is None, (i, after)

    assert {k.phase for k in killer.kills} == set(PHASES)
    assert any(k.phase == "publish" and k.victim != "rank 1" for k in killer.kills), "the publisher never died"
    assert len(killer.kills) >= KILLS

    # no step lost, every step bit for bit the uninterrupted run's, and so the final weights
    ours = read_metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    assert losses(ours) == losses(reference)
    assert [m["grad_norm"] for m in ours] == [m["grad_norm"] for m in reference]
    last = f"checkpoints/step-{STEPS:08d}"
    a, b = model_tensors(run_dir / last), model_tensors(reference_dir / last)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        if a[key].numel() == b[key].numel() == 1:  # DeepSpeed restores AdamW's 0-d step as shape [1]
            assert a[key].item() == b[key].item(), key
        else:
            assert torch.equal(a[key], b[key]), key
    assert sum(r.get("event") == "resume" for r in records) >= KILLS - sum(k.phase == "resume" for k in killer.kills)


def _records_between(run_dir: Path, start: int, end: Optional[int]) -> list[dict]:
    with open(run_dir / "metrics.jsonl", "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_a_rank_killed_before_its_checksum_share_does_not_stall_rank_0(tmp_path):
    """Synchronous saves: rank 1 is frozen after a save's files are written, before its
    checksum share; rank 0 writes its own share and waits for the others; rank 1 is killed.
    Rank 0 exits at once (a collective reports the dead peer) and the restarted group resumes
    from the newest checkpoint. It used to poll for the share until
    parallel.collective_timeout_s, deaf to torchrun's SIGTERM (StopSignal takes it), until
    torchrun's SIGKILL 30 s later."""
    job = Job(0, tmp_path / "run", tmp_path, extra=("train.steps=40",))
    root = tmp_path / "run/checkpoints"
    try:
        workers = wait_for("the worker group", lambda: (w := job.workers()) and len(w) == WORLD and w, job)
        rank0, rank1 = sorted(workers, key=lambda w: w.environ()["RANK"])
        deadline = time.monotonic() + 120
        while True:  # watch every save: the moment its files are written and rank 1's share is not
            assert time.monotonic() < deadline and job.agent.poll() is None, f"never caught:\n{job.tail()}"
            # (not the first save: a published checkpoint must exist for the restart to resume from)
            partial = next((p for p in root.glob(".partial/step-*") if (p / "launcher_state.json").exists()
                            and not (p / ".parts/rank-00001.json").exists()), None) if published(root) else None
            if partial is None:
                time.sleep(0.0002)
                continue
            freeze(workers)
            if save_phase(root, 0, rank0.pid)[0] == "save" and not (partial / ".parts/rank-00001.json").exists():
                thaw([rank0])  # rank 1 stays frozen; rank 0 goes on to its share, then waits for rank 1's
                share = partial / ".parts/rank-00000.json"
                until = time.monotonic() + 2
                while not share.exists() and time.monotonic() < until:
                    time.sleep(0.001)
                if share.exists():
                    break  # else rank 0 waits in the barrier before the shares: try the next save
            thaw(workers)
            while partial.exists():
                time.sleep(0.001)
        time.sleep(0.3)
        newest = published(root)[-1]
        _signal(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, alive = psutil.wait_procs([rank0], timeout=60)
        exit_s = time.monotonic() - killed
        assert not alive and exit_s < 10, f"rank 0 still ran {exit_s:.1f} s after rank 1 died"
        assert job.agent.wait(timeout=300) == 0, job.tail()
    finally:
        if job.agent.poll() is None:
            os.killpg(job.agent.pid, signal.SIGKILL)
        for worker in job.workers():
            _signal(worker, signal.SIGKILL)
    assert [r["step"] for r in read_events(tmp_path / "run", "resume")] == [newest]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 41))

"""Time from a node's death to the first resumed training step under Slurm, with a breakdown.

    python bench/recovery.py [--runs spare requeue] [--dir DIR] [section.key=value ...]
    python bench/recovery.py --from DIR     # the table again, from a DIR an earlier run left
                                            # (bench/recovery_runs: the run in docs/BENCHMARKS.md)

Starts the local Slurm cluster (slurm/local-cluster.sh, three nodes; root and Debian's
slurm-wlm + munge), then for each run submits slurm/train_7b.sh with 2 processes per node
on a tiny model, waits for step 12, and SIGKILLs node2's slurmd and every process of the
job on node2 (its slurmstepd, torchrun, workers), as a machine that loses power would:

  spare    3 nodes, SPARE_NODES=1: the job restarts on node1 + node3 inside its allocation
  requeue  2 nodes, no spare: too few healthy nodes, the job requeues itself; node2's slurmd
           is started again once the job has asked for the requeue

The breakdown comes from the batch script's stamped lines ([t=...] failure noticed,
healthy nodes, restart, requeue) and the workers' metrics.jsonl (the launch event's
`started` and `group_ready`, its own time = set-up done, the resume event = checkpoint
loaded, the first resumed step's record). Every figure is seconds after the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["parallel.tensor=1", "parallel.pipeline=2", "train.log_every=1", "train.eval_every=0",
        "schedule.warmup_steps=2", "checkpoint.every=5", "parallel.collective_timeout_s=30"]
RUNS = {"spare": (3, 1), "requeue": (2, 0)}  # nodes, SPARE_NODES
KILL_AT_STEP = 12
PHASES = [  # (label, key in the timeline)
    ("failure noticed (a step ended)", "noticed"),
    ("healthy nodes found (probes)", "probed"),
    ("job requeued", "requeued"),
    ("requeued job started", "job_started"),
    ("restart (srun + torchrun started)", "restart"),
    ("worker processes started", "started"),
    ("process group ready", "group_ready"),
    ("set-up done (engine, data)", "set_up"),
    ("checkpoint loaded", "loaded"),
    ("first resumed step", "first_step"),
]


def node_processes(node: str) -> list:
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


def kill_node(node: str) -> float:
    """SIGKILL node's slurmd and its job processes as a dying machine would: none of them may
    act on another's death; the time of the kill. Two ways a piecemeal kill went wrong in CI:

    - killed in pid order, a slurmstepd outlived its batch script by a moment and told
      slurmctld the script died of signal 9: the job ended FAILED instead of losing a node;
    - frozen (SIGSTOP) and then killed parents first, the batch script's stopped sruns were
      left an orphaned process group, which the kernel sends SIGHUP and SIGCONT: they woke
      and cancelled their steps, the watchdog's on another node among them.

    So: every victim is frozen first, then killed deepest in the process tree first, so that
    no process is left stopped when its parent dies."""
    victims = node_processes(node)
    assert any("slurmd" in " ".join(p.cmdline()) for p in victims), f"no slurmd for {node}: is the cluster up?"
    depth = {p.pid: _depth(p) for p in victims}
    killed_at = time.time()
    for action, order in (("suspend", victims), ("kill", sorted(victims, key=lambda p: -depth[p.pid]))):
        for proc in order:
            try:
                getattr(proc, action)()
            except Exception:  # noqa: BLE001 - it may have exited on its own
                pass
    return killed_at


def _depth(proc) -> int:
    try:
        return len(proc.parents())
    except Exception:  # noqa: BLE001 - it may have exited
        return 0


def stamps(job_log: str) -> list[tuple[float, str]]:
    """The batch script's [t=<unix time>] lines, in order."""
    return [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^\[t=([\d.]+)\] (.*)$", job_log, re.MULTILINE)]


def timeline(job_log: str, records: list[dict], killed_at: float) -> dict:
    """Absolute times of the recovery's phases (PHASES keys) after a kill at killed_at."""
    t: dict = {"kill": killed_at}
    for when, text in stamps(job_log):
        if when < killed_at:
            continue
        for key, start in (("noticed", "failure noticed"), ("probed", "healthy nodes"),
                           ("requeued", "too few healthy nodes"), ("job_started", "job "),
                           ("restart", ("start:", "restart "))):
            if text.startswith(start) and key not in t:
                t[key] = when
    launch = next((r for r in records if r.get("event") == "launch" and r["time"] > killed_at), None)
    resume = next((r for r in records if r.get("event") == "resume" and r["time"] > killed_at), None)
    if launch:
        t.update(started=launch.get("started"), group_ready=launch.get("group_ready"), set_up=launch["time"])
    if resume:
        t["loaded"] = resume["time"]
        t["resumed_from"] = resume["step"]
        t["first_step"] = next((r["time"] for r in records if r.get("loss") is not None and r["time"] > resume["time"]
                                and r["step"] == resume["step"] + 1), None)
    return t


def breakdown(t: dict) -> dict:
    """Seconds after the kill for each phase the timeline has."""
    return {key: round(t[key] - t["kill"], 1) for _, key in PHASES if t.get(key) is not None}


def sbatch(out: Path, nodes: int, spare: int, overrides: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(CONFIG="configs/default.yaml", GPUS_PER_NODE="2", OMP_NUM_THREADS="1", SPARE_NODES=str(spare))
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--cpus-per-task=1", "--gpus-per-node=2", "--time=15",
           f"--output={out}/job-%j.out", f"--chdir={REPO}", "slurm/train_7b.sh", *overrides, f"run.dir={out / 'run'}"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip().split(";")[0]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"\bJobState=(\S+)", out)
    return match.group(1) if match else ""


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [r["step"] for r in map(json.loads, lines) if r.get("loss") is not None]
    return steps[-1] if steps else 0


def one_run(name: str, out: Path, overrides: list[str]) -> dict:
    nodes, spare = RUNS[name]
    out.mkdir(parents=True, exist_ok=True)
    job = sbatch(out, nodes, spare, [*TINY, "train.steps=24", *overrides])
    deadline = time.time() + 300
    while last_step(out / "run") < KILL_AT_STEP:
        assert time.time() < deadline and job_state(job) in ("PENDING", "RUNNING", ""), f"job {job} did not train"
        time.sleep(0.1)
    killed_at = kill_node("node2")
    log = out / f"job-{job}.out"
    if name == "requeue":  # the node comes back once the job has asked to be requeued
        while "too few healthy nodes" not in log.read_text():
            assert time.time() < killed_at + 300, "the job did not notice the failure"
            time.sleep(0.2)
    else:
        while job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED"):
            assert time.time() < killed_at + 600, f"job {job} did not finish"
            time.sleep(0.5)
    subprocess.run(["slurmd", "-N", "node2"], check=True)
    while job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.time() < killed_at + 600, f"job {job} did not finish"
        time.sleep(0.5)
    (out / "killed.json").write_text(json.dumps({"job": job, "killed_at": killed_at, "run": name}))
    return analyse(out)


def analyse(out: Path) -> dict:
    meta = json.loads((out / "killed.json").read_text())
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    t = timeline((out / f"job-{meta['job']}.out").read_text(), records, meta["killed_at"])
    return {"run": meta["run"], "resumed_from": t.get("resumed_from"), **breakdown(t)}


def table(results: list[dict]) -> str:
    lines = ["| after the kill, s | " + " | ".join(r["run"] for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for label, key in PHASES:
        if any(key in r for r in results):
            lines.append(f"| {label} | " + " | ".join(f"{r[key]:.1f}" if key in r else "-" for r in results) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--dir", type=Path, help="where the job logs and runs go (default: a temporary directory)")
    parser.add_argument("--from", dest="previous", type=Path, help="print the table of an earlier --dir")
    args, overrides = parser.parse_known_args()
    if args.previous:
        results = [analyse(args.previous / name) for name in RUNS if (args.previous / name / "killed.json").exists()]
    else:
        root = args.dir or Path(tempfile.mkdtemp(prefix="recovery-"))
        up = subprocess.run(["bash", "slurm/local-cluster.sh", "up"], cwd=REPO, env={**os.environ, "NODES": "3"},
                            capture_output=True, text=True)
        if up.returncode != 0:
            print(up.stdout + up.stderr, file=sys.stderr)
            return 1
        try:
            results = [one_run(name, root / name, overrides) for name in args.runs]
        finally:
            subprocess.run(["bash", "slurm/local-cluster.sh", "down"], cwd=REPO, capture_output=True)
        print(f"runs in {root}")
    print(table(results))
    for r in results:
        print(f"{r['run']}: first resumed step {r.get('first_step', float('nan')):.1f} s after the kill "
              f"(resumed from step {r['resumed_from']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

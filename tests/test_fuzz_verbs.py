"""Bad input to any verb, all of it: property-based fuzzing of every command's arguments, and
of damaged checkpoints and prepared datasets read by the verbs that read them.

The contract (launcher/errors.py, launcher/cli.py): whatever the arguments and whatever is
on disk, a verb ends with exit 0, or with exit 2 and exactly one stderr line
`config error: <key>: <message>`: never a traceback, never exit 1; and a verb that fails
leaves nothing behind (no half-written export, no report directory, no run directory).

One real checkpoint (one process, one step of a tiny model) and one prepared dataset are
made once; every example damages a copy: a file truncated at an offset, deleted, swapped
with another, bytes flipped, or replaced by garbage, and, for checkpoints, the same with
the manifest rewritten to match ("sealed": what a bug in the writer, or a hand-made
checkpoint, would give; the verbs must still refuse it in one line, not crash inside
torch.load). Everything runs in this process (`main(argv)`), except the one resume, which
needs a process group. Fixed seed, no example database: the same examples on every run;
`FUZZ_SCALE=20` runs 20x as many.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from launch import base_env, python_cmd, run_cli, train

from launcher.checkpoint.store import MANIFEST, checksum_file, manifest_files

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
# hidden 32, 2 heads sharing 1 kv head, 1 layer, seq 16: a checkpoint of ~0.5 MB
TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.kv_heads=1", "model.ffn=64", "model.seq_len=16",
        "parallel.tensor=1", "parallel.pipeline=1", "parallel.micro_batch=1", "parallel.global_batch=1",
        "schedule.warmup_steps=1", "train.eval_every=0", "train.log_every=1", "checkpoint.every=1",
        "precision.dtype=fp32"]
STEP = "checkpoints/step-00000001"


def fuzz_settings(examples: int):
    return settings(derandomize=True, database=None, deadline=None, max_examples=max(1, int(examples * SCALE)),
                    suppress_health_check=list(HealthCheck), print_blob=False)


# --------------------------------------------------------------------------------------
# One checkpoint, one prepared dataset, a few things that are neither
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz_verbs")
    train(python_cmd(), root / "run", *TINY, "train.steps=1")
    shutil.rmtree(root / "run" / "checkpoints" / ".partial", ignore_errors=True)
    docs = [" ".join(f"w{(i * 7 + j) % 13}" for j in range(30)) for i in range(40)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare = ["--input", str(root / "docs.jsonl"), "--tokenizer", "byte", "--workers", "1", "--chunk-mb", "0.002"]
    code, _, err = call("prepare", [*prepare, "--out", str(root / "dataset")])
    assert code == 0, err
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 3)
    (root / "empty").mkdir()
    (root / "out").mkdir()  # where the fuzzed commands may write; emptied after every example
    paths = {"run": root / "run", "ckpt": root / "run" / STEP, "dataset": root / "dataset", "docs": root / "docs.jsonl",
             "garbage": root / "garbage.bin", "empty": root / "empty", "missing": root / "missing",
             "under_file": root / "garbage.bin" / "x", "metrics": root / "run" / "metrics.jsonl", "out": root / "out",
             "new": root / "out" / "new", "deep": root / "out" / "a" / "b" / "c"}
    return {"root": root, "prepare": prepare, **{k: str(v) for k, v in paths.items()}}


def call(verb: str, argv: list[str]) -> tuple[int, str, str]:
    """launcher.<verb>.main(argv) in this process: (exit code, stdout, stderr)."""
    main = importlib.import_module(f"launcher.{verb}").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help, or a usage error already printed
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(code, err: str) -> str:
    assert code == 2, (code, err[-3000:])
    lines = err.splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("config error: ") and lines[0].isprintable(), lines[0]
    key, sep, message = lines[0].removeprefix("config error: ").partition(": ")
    assert sep and key.strip() and message.strip(), lines[0]
    return lines[0]


def clean_outcome(code, err: str) -> str:
    """Exit 0, or exit 2 and one line; returns the error line ('' on success)."""
    assert code in (0, 2), (code, err[-3000:])
    return one_error_line(code, err) if code == 2 else ""


def tree(path: str | Path) -> dict[str, int]:
    root = Path(path)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def empty_out(world: dict) -> list[str]:
    """What the example left in out/ (and clear it for the next one)."""
    left = sorted(os.listdir(world["out"]))
    for name in left:
        path = Path(world["out"]) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return left


# --------------------------------------------------------------------------------------
# Arguments: every verb's options, with values of every kind
# --------------------------------------------------------------------------------------

short_text = st.text(st.characters(max_codepoint=0x17f), max_size=8)
PATHS = ["run", "ckpt", "dataset", "docs", "garbage", "empty", "missing", "under_file", "metrics", "new", "deep", "out"]
path = st.one_of(st.sampled_from(PATHS).map(lambda name: "{" + name + "}"), short_text,
                 st.sampled_from(["", ".", "/", "-", "--", "/dev/null", "{run}/checkpoints", "{dataset}/shards",
                                  "{ckpt}/manifest.json", "{docs}*", "{root}/*.jsonl", "\udcff"]))
# Where a command may write: under out/ (the working directory while fuzzing), or nowhere it
# can (under a file). Never an input: `export --overwrite` replaces whatever --out names.
out_path = st.one_of(st.sampled_from(["{new}", "{deep}", "{out}", "{under_file}", "{new}/", "{out}/x\ny"]),
                     short_text.filter(lambda s: s.strip(". /") and not s.startswith(("/", "~"))))
number = st.one_of(st.sampled_from(["0", "-1", "1", "2", "3", "0.5", "1e-30", "nan", "inf", "-inf", "1e999", "x", "",
                                    "99999999999999999999999", "0x10", " 1", "1_000"]), short_text)
small_int = st.sampled_from(["0", "-1", "1", "2", "3", "x", "", "1.5", "99999999999999999999999"])
override = st.one_of(
    st.sampled_from(["data.path={dataset}", "data.path={garbage}", "data.path={empty}", "data.path={missing}",
                     "checkpoint.resume={ckpt}", "checkpoint.resume={run}", "checkpoint.resume={garbage}",
                     "checkpoint.resume={empty}", "model.init_from={run}", "model.init_from={garbage}",
                     "data.tokenizer={garbage}", "data.tokenizer={dataset}", "run.dir={under_file}", "run.dir={new}",
                     "model.layers=1", "parallel.tensor=1", "parallel.pipeline=1", "=", "a=b", "model.layers",
                     "checkpoint.dir={garbage}", "data.val_path={dataset}"]),
    st.builds("{}={}".format, short_text, short_text))
unknown = st.one_of(st.sampled_from(["--bogus", "-x", "--", "---", "--help=1", "-", "--config=", "--out=", "-h"]),
                    short_text.map(lambda s: "--" + s))

OPTIONS = {  # verb: (options with a value: their values, flags)
    "train": ({"--config": path, "--world-size": small_int, "--gpu": st.sampled_from(["h100", "a100", "x", ""])},
              ["--force", "--print-config"]),
    "plan": ({"--config": path, "--nodes": small_int, "--gpus-per-node": small_int, "--gpu": short_text,
              "--gpu-memory": st.sampled_from(["24GB", "0", "-5", "nan", "1e999GB", "x", "80 GiB", ""]),
              "--efficiency": number, "--intra-node-gbps": number, "--inter-node-gbps": number,
              "--pcie-gbps": number, "--top": small_int}, ["--json", "--list-gpus"]),
    "prepare": ({"--input": path, "--tokenizer": st.one_of(path, st.just("byte")), "--out": out_path,
                 "--text-field": short_text, "--workers": st.sampled_from(["0", "-1", "1", "x", ""]),
                 "--max-bad": small_int, "--eod-token": short_text, "--chunk-mb": number}, []),
    "export": ({"--checkpoint": path, "--out": out_path, "--dtype": st.sampled_from(["bf16", "fp16", "fp32", "int8", ""]),
                "--max-shard-gb": number}, ["--overwrite"]),
    "generate": ({"--checkpoint": path, "--hf": path, "--prompt": st.one_of(short_text, st.just("hi")),
                  "--max-new-tokens": st.sampled_from(["0", "-1", "1", "2", "x", "", "1e3"]),
                  "--temperature": number, "--top-p": number, "--seed": st.one_of(small_int, st.just(str(2 ** 64))),
                  "--device": st.sampled_from(["cpu", "cuda", "tpu", ""]),
                  "--dtype": st.sampled_from(["fp32", "bf16", "fp16", "fp64"])}, ["--json"]),
    "report": ({"--out": out_path, "--compare": path}, []),
}
POSITIONAL = {"train": override, "plan": override, "report": path}
# Options a command that succeeds must not take from the fuzzer: a valid one would start work
# that is not a quick check (a training run, a long generation, a prepare of many workers).
ALWAYS = {"train": ["--dry-run"], "generate": ["--max-new-tokens", "2"], "report": ["--out", "{new}"]}


@st.composite
def command_lines(draw, verb: str) -> list[str]:
    valued, flags = OPTIONS[verb]
    argv = list(ALWAYS.get(verb, []))
    for name in draw(st.lists(st.sampled_from(sorted(valued)), max_size=5, unique=True)):
        argv += [name] if draw(st.integers(0, 15)) == 0 else [name, draw(valued[name])]  # now and then no value
    argv += draw(st.lists(st.sampled_from(flags), max_size=2, unique=True)) if flags else []
    if verb in POSITIONAL:
        argv += draw(st.lists(POSITIONAL[verb], max_size=3))
    if draw(st.integers(0, 5)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(unknown))
    return draw(st.permutations(argv)) if draw(st.booleans()) and verb in ("train", "plan") else argv


def fill(argv: list[str], world: dict) -> list[str]:
    return [_format(a, world) for a in argv]


def _format(text: str, world: dict) -> str:
    try:
        return text.format(**world)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):  # the fuzzer's own braces
        return text


def check_any_command_line(world: dict, verb: str, argv: list[str]) -> None:
    before = tree(world["root"] / "run"), tree(world["dataset"])
    with contextlib.chdir(world["out"]):
        code, _, err = call(verb, fill(argv, world))
    left = empty_out(world)
    if clean_outcome(code, err):
        assert not left, (argv, left)  # a refusal leaves nothing behind
    assert (tree(world["root"] / "run"), tree(world["dataset"])) == before  # the inputs are only read


@pytest.mark.parametrize("verb", list(OPTIONS))
def test_any_command_line_is_exit_0_or_one_line_exit_2(world, verb):
    @fuzz_settings(40)
    @given(argv=command_lines(verb))
    def fuzz(argv):
        check_any_command_line(world, verb, argv)

    fuzz()


@pytest.mark.parametrize("verb, argv, expected", [
    ("export", ["--checkpoint", "{run}", "--out", "{under_file}"], "config error: --out: "),
    ("export", ["--checkpoint", "{run}", "--out", "{new}", "--max-shard-gb", "nan"], "config error: --max-shard-gb: "),
    ("export", ["--checkpoint", "{run}", "--out", "{new}", "--max-shard-gb", "inf"], "config error: --max-shard-gb: "),
    ("report", ["{run}", "--out", "{garbage}"], "config error: --out: "),
    ("report", ["{run}", "--out", "{under_file}"], "config error: --out: "),
    ("generate", ["--checkpoint", "{run}", "--prompt", "hi", "--seed", str(2 ** 70)], "config error: --seed: "),
    ("generate", ["--checkpoint", "{run}", "--prompt", "caf\udcc3"], "config error: --prompt: "),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_what_the_fuzzer_found(world, verb, argv, expected):
    """Each was a traceback (exit 1) before: a file where --out's directory goes, a shard
    size or seed too large to convert, a prompt of bytes that are not UTF-8 (argv's
    surrogate escapes)."""
    code, _, err = call(verb, fill(argv, world))
    assert one_error_line(code, err).startswith(expected)
    assert not empty_out(world)


def test_export_creates_parents_and_removes_them_again_on_failure(world, tmp_path):
    """--out a/b/c: the parents are made for the export and gone again when it fails."""
    damaged = tmp_path / "run"
    shutil.copytree(world["run"], damaged)
    state = damaged / STEP / "launcher_state.json"
    state.write_text("{}")
    seal(damaged / STEP)
    code, _, err = call("export", ["--checkpoint", str(damaged), "--out", world["deep"]])
    assert str(state) in one_error_line(code, err)
    assert not empty_out(world)
    code, _, err = call("export", ["--checkpoint", world["run"], "--out", world["deep"]])
    assert code == 0 and (Path(world["deep"]) / "model.safetensors").is_file(), err
    assert empty_out(world) == ["a"]


# --------------------------------------------------------------------------------------
# Damaged checkpoints: export, generate, and a resume
# --------------------------------------------------------------------------------------

DAMAGES = ["truncate", "delete", "swap", "flip", "garbage"]


def damage(root: Path, victim: str, how: str, offset: float, other: str) -> list[Path]:
    """Damage root/victim; returns the files changed."""
    path, partner = root / victim, root / other
    data = path.read_bytes()
    at = min(int(offset * len(data)), max(0, len(data) - 1))
    if how == "truncate":
        path.write_bytes(data[:at])
    elif how == "delete":
        path.unlink()
    elif how == "swap":
        path.write_bytes(partner.read_bytes())
        partner.write_bytes(data)
        return [path, partner]
    elif how == "flip":
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:] if data else b"\xff")
    else:
        path.write_bytes(bytes((i * 131 + 7) % 256 for i in range(len(data))))
    return [path]


def seal(ckpt: Path) -> None:
    """A manifest that matches the files as they are now (each damaged file verifies)."""
    files = [{"file": str(p.relative_to(ckpt)), "size": p.stat().st_size, "xxh3": checksum_file(p)}
             for p in manifest_files(ckpt)]
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}))


@st.composite
def checkpoint_damage(draw, files: list[str]):
    victim = draw(st.sampled_from(files))
    return (victim, draw(st.sampled_from(DAMAGES)), draw(st.floats(0, 1)),
            draw(st.sampled_from([f for f in files if f != victim])), draw(st.booleans()))


@pytest.fixture(scope="module")
def checkpoint_files(world) -> list[str]:
    return sorted(tree(world["ckpt"]))


def test_damaged_checkpoint_is_one_line_naming_the_file(world, checkpoint_files, tmp_path_factory):
    @fuzz_settings(40)
    @given(case=checkpoint_damage(checkpoint_files), verb=st.sampled_from(["export", "generate"]))
    def fuzz(case, verb):
        victim, how, offset, other, sealed = case
        root = tmp_path_factory.mktemp("damaged")
        shutil.copytree(world["run"], root / "run", ignore=shutil.ignore_patterns("data"))
        ckpt = root / "run" / STEP
        changed = damage(ckpt, victim, how, offset, other)
        sealed = sealed and MANIFEST not in (victim, other)
        if sealed:
            seal(ckpt)
        argv = ["--checkpoint", str(root / "run"), "--prompt", "hi", "--max-new-tokens", "2"] if verb == "generate" \
            else ["--checkpoint", str(root / "run"), "--out", str(root / "hf")]
        code, _, err = call(verb, argv)
        line = clean_outcome(code, err)
        if not sealed and not (victim == MANIFEST and how == "flip"):
            # the manifest says what each file was: any change is found, and named
            assert line and any(str(p) in line for p in changed), (case, line)
        if line:
            assert str(ckpt) in line, line  # names the file, or at least the checkpoint
            assert sorted(os.listdir(root)) == ["run"]  # no --out, no partial directory
        shutil.rmtree(root)

    fuzz()


def test_resume_from_a_damaged_checkpoint_is_one_line_and_starts_nothing(world, tmp_path):
    """A launch (a process group of one) told to resume a checkpoint with a truncated file:
    the verification names the file; no run directory is made."""
    copy = tmp_path / "resume_from"
    shutil.copytree(world["run"], copy, ignore=shutil.ignore_patterns("data"))
    victim = max((copy / STEP).rglob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    result = run_cli(python_cmd(), tmp_path / "new_run", *TINY, "train.steps=2", f"checkpoint.resume={copy}",
                     env=base_env(), timeout=300, expect_rc=2)
    line = one_error_line(2, result.stderr)
    assert line.startswith("config error: checkpoint.resume: ") and f"{victim}: size 100, manifest says" in line
    assert not (tmp_path / "new_run").exists()


# --------------------------------------------------------------------------------------
# Damaged prepared datasets: train (its checks before anything starts) and prepare again
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_files(world) -> list[str]:
    return sorted(tree(world["dataset"]))


def test_damaged_dataset_is_one_line_naming_the_file(world, dataset_files, tmp_path_factory):
    """`train --dry-run` runs the launch's data checks (manifest, every shard's sizes and
    boundary index); a re-run of the same `prepare` says "already prepared" only when it
    still is. A flipped byte inside a shard's tokens is not found before training (the
    shards are never read or hashed up front): there, exit 0 is right."""
    @fuzz_settings(40)
    @given(victim=st.sampled_from(dataset_files), how=st.sampled_from(DAMAGES), offset=st.floats(0, 1),
           other=st.sampled_from(dataset_files), verb=st.sampled_from(["train", "prepare"]))
    def fuzz(victim, how, offset, other, verb):
        root = tmp_path_factory.mktemp("damaged_data")
        shutil.copytree(world["dataset"], root / "dataset")
        before = (root / "dataset" / victim).read_bytes()
        changed = [] if victim == other and how == "swap" else damage(root / "dataset", victim, how, offset, other)
        argv = ([*world["prepare"], "--out", str(root / "dataset")] if verb == "prepare" else
                ["--dry-run", "--world-size", "1", *TINY, f"data.path={root / 'dataset'}", f"run.dir={root / 'run'}"])
        code, _, err = call(verb, argv)
        line = clean_outcome(code, err)
        resized = changed and (not changed[0].exists() or changed[0].stat().st_size != len(before))
        if verb == "train" and resized and victim.endswith((".bin", ".idx", MANIFEST)):
            assert line and any(str(p) in line or p.name == MANIFEST for p in changed), (victim, how, line)
        if line:
            assert str(root / "dataset") in line, line
        assert not (root / "run").exists()
        shutil.rmtree(root)

    fuzz()

"""Malformed input, all of it: property-based fuzzing of the launcher's front door.

Config files (raw bytes, broken YAML, YAML built from the real schema with keys dropped,
added and given values of every type), `section.key=value` overrides and --world-size go
through `launcher.train.main(["--dry-run", ...])` in this process. Every case must end
with exit 0, or exit 2 and exactly one stderr line `config error: <key>: <message>` that
names a key (or --config / --world-size / the override as typed): never a traceback, never
a hang. A dry run runs every check the launch runs (launcher/training/preflight.py), so a config that
passes here does not fail at launch with a configuration error.

Fixed seed (`derandomize`), no example database: the same examples on every run, a few
hundred per property. `FUZZ_SCALE=20 python -m pytest tests/test_config_fuzz.py` runs 20x
as many (a longer hunt).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import os
import re
import signal
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from launcher.config.load import load_config
from launcher.config.schema import Config
from launcher.train import main
from parallel.costs import ItemCost
from parallel.partition import (
    MemoryModel,
    PartitionError,
    balanced,
    minmax_split,
    monotone_minmax_split,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = (REPO / "configs" / "default.yaml").read_text()
BASE = yaml.safe_load(DEFAULT_TEXT)
SECTIONS = [f.name for f in dataclasses.fields(Config)]
DEEPSPEED_KEYS = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "zero_optimization", "zero_optimization.stage", "bf16", "bf16.enabled",
                  "fp16", "fp16.loss_scale", "steps_per_print", "optimizer", "scheduler", "wall_clock_breakdown",
                  "communication_data_type", "prescale_gradients", "activation_checkpointing", "flops_profiler",
                  "zero_optimization.reduce_bucket_size", "data_types", "seq_parallel_communication_data_type"]

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
CPU_SECONDS = 20  # per example: a case that computes longer than this is a hang


def fuzz_settings(examples: int):
    return settings(derandomize=True, database=None, deadline=None, max_examples=max(1, int(examples * SCALE)),
                    suppress_health_check=list(HealthCheck), print_blob=False)


# --------------------------------------------------------------------------------------
# Running main in this process and judging what it printed
# --------------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _on_cpu_limit(signum, frame):
    raise Hang(f"more than {CPU_SECONDS} s of CPU")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory of its own (runs/, checkpoints are looked up relative to the cwd), and
    an environment where WORLD_SIZE cannot change what --world-size asks for."""
    path = tmp_path_factory.mktemp("fuzz")
    saved_cwd, saved_ws = os.getcwd(), os.environ.pop("WORLD_SIZE", None)
    os.chdir(path)
    previous = signal.signal(signal.SIGVTALRM, _on_cpu_limit)  # CPU time: leaves pytest-timeout's SIGALRM alone
    yield path
    signal.signal(signal.SIGVTALRM, previous)
    os.chdir(saved_cwd)
    if saved_ws is not None:
        os.environ["WORLD_SIZE"] = saved_ws


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    signal.setitimer(signal.ITIMER_VIRTUAL, CPU_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
    return code, out.getvalue(), err.getvalue()


def _event(text: str) -> None:
    """Outcome counts for `pytest --hypothesis-show-statistics`."""
    if currently_in_test_context():
        event(text)


KEY_ROOTS = set(SECTIONS) | {"--config", "--world-size", "WORLD_SIZE"}


def assert_one_line_error(err: str) -> str:
    """stderr is exactly one line `config error: <key>: <message>` naming a key."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("config error: "), line
    assert line.isprintable(), line  # control characters from the input come back escaped
    body = line[len("config error: "):]
    key, sep, message = body.partition(": ")
    assert sep and key.strip() and message.strip(), line
    root = re.split(r"[.\[]", key, maxsplit=1)[0]
    # A known key (section.key, deepspeed.*, --config, --world-size), or the user's own
    # unknown key / malformed override, quoted back as typed.
    assert root in KEY_ROOTS or any(word in message for word in ("unknown key", "override", "option")), line
    _event(f"exit 2: {key if root in KEY_ROOTS else '<unknown key or bad override>'}")
    return line


def assert_clean_outcome(argv: list[str]) -> tuple[int, str]:
    """Exit 0 with the plan printed, or exit 2 and one line naming a key."""
    code, out, err = run_main(argv)  # any exception escaping main is the bug found
    assert code in (0, 2), (code, err)
    if code == 2:
        return code, assert_one_line_error(err)
    assert out.startswith("config ") and "\nlayout " in out, out
    assert not err, err
    _event("exit 0")
    return code, out


def write_config(workdir: Path, text: bytes | str, name: str = "fuzz.yaml") -> Path:
    path = workdir / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def dry_run(workdir: Path, text: bytes | str | None, overrides=(), world_size=None) -> tuple[int, str]:
    argv = ["--dry-run"]
    if world_size is not None:
        argv += ["--world-size", str(world_size)]
    if text is not None:
        argv += ["--config", str(write_config(workdir, text))]
    return assert_clean_outcome([*argv, *overrides])


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

SPECIAL_INTS = [0, -1, 1, 2, 3, 4, 8, 16, 64, 256, 1024, 1025, 4096, 10**6, 2**31, 2**32, 2**63 - 1, 2**63, -2**63 - 1,
                10**30, -10**30, int("f" * 300, 16)]
SPECIAL_FLOATS = [0.0, -0.0, 1e-300, 5e-324, 1e308, 1.7976931348623157e308, -1.0, 0.5, 1.0, 0.999999, 2.0,
                  math.inf, -math.inf, math.nan, 1e-8, 3e-4, 1e7, 1e7 + 1]
STRINGS = ["auto", "none", "fp16", "bf16", "fp32", "powersgd", "balanced", "uniform", "parameters", "type:Attention",
           "type:(", "type:", "type:.*", "lion", "adamw", "online", "offline", "disabled", "embedded", "required", "",
           " ", "\n", "\x00", "a\x00b", "1e999", "3e-4", "nan", "-1", "0x10", "~", "/", ".", "..", "/etc", "/dev/null",
           "runs", "fuzz.yaml", "2024-01-01"]
short_text = st.text(st.characters(max_codepoint=0x17f), max_size=10)
any_text = st.one_of(short_text, short_text, st.text(max_size=8))  # now and then all of Unicode

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(SPECIAL_INTS), st.integers(-10, 300), st.integers(),
    st.sampled_from(SPECIAL_FLOATS), st.floats(), any_text, st.sampled_from(STRINGS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(short_text, st.integers(-2, 2), st.booleans(), st.none()), inner, max_size=4)),
    max_leaves=8)


def _typed(tp) -> st.SearchStrategy:
    """Values of the annotation's own type, edge values first: these pass the type check and
    reach the later checks (layout, partitioner, DeepSpeed's parser)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _typed(a) for a in typing.get_args(tp)])
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is list:
        return st.lists(_typed(typing.get_args(tp)[0]), max_size=3)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(-2, 70))
    if tp is float:
        return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(), st.floats(0, 2))
    if tp is str:
        return st.one_of(st.sampled_from(STRINGS), short_text)
    return values


def _hints(cls, prefix="") -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        name = f"{prefix}{f.name.rstrip('_')}"
        if dataclasses.is_dataclass(tp):
            out.update(_hints(tp, name + "."))
        elif name != "deepspeed":
            out[name] = tp
    return out


TYPED = {key: _typed(tp) for key, tp in _hints(Config).items()}
REAL_KEYS = sorted(TYPED)
typed_mutation = st.sampled_from(REAL_KEYS).flatmap(lambda key: st.tuples(st.just("set"), st.just(key), TYPED[key]))


def _set(raw: dict, dotted: str, value) -> None:
    node, parts = raw, dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _drop(raw: dict, dotted: str) -> None:
    node, parts = raw, dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


mutation = st.one_of(
    typed_mutation, typed_mutation, typed_mutation,
    st.tuples(st.just("set"), st.sampled_from(REAL_KEYS), values),
    st.tuples(st.just("drop"), st.sampled_from(REAL_KEYS + SECTIONS), st.none()),
    st.tuples(st.just("set"), st.sampled_from(SECTIONS), values),  # a whole section replaced
    st.tuples(st.just("set"), st.builds("{}.{}".format, st.sampled_from(SECTIONS), st.text(
        st.characters(max_codepoint=0x17f, exclude_characters="."), min_size=1, max_size=8)), values),  # unknown key
    st.tuples(st.just("set"), st.builds("deepspeed.{}".format, st.sampled_from(DEEPSPEED_KEYS)), values),
)


@st.composite
def schema_configs(draw, mutations=mutation, max_mutations=4) -> dict:
    raw = copy.deepcopy(BASE)
    for op, key, value in draw(st.lists(mutations, min_size=1, max_size=max_mutations)):
        if op == "set":
            _set(raw, key, value)
        else:
            _drop(raw, key)
    if draw(st.integers(0, 9)) == 7:  # a non-string key somewhere
        raw[draw(st.sampled_from([1, None, True, 2.5]))] = draw(scalars)
    return raw


SNIPPETS = [
    "", "---\n", "...\n", "~\n", "[]\n", "- model\n- train\n", "just a string\n", "42\n", "3.5\n", "true\n",
    "model:\n\tlayers: 4\n",  # a tab
    "model: {layers: 4\n",  # unclosed flow mapping
    "model:\n  layers: 4\n model: 3\n",  # bad indentation
    "model:\n  layers: 4\nmodel:\n  layers: 2\n",  # duplicate key
    "1: 2\n", "? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "null: 1\n", "true: 1\n", "model:\n  1: 2\n",
    "model:\n  layers: !!python/object/apply:os.system ['true']\n",
    "!!python/object/new:dict {}\n", "model: !!binary aGVsbG8=\n", "model:\n  layers: !!float 4\n",
    "model:\n  layers: !custom 4\n", "%YAML 1.1\n---\nmodel: {}\n", "%TAG ! tag:x,2000:\n---\n!a {}\n",
    "model:\n  layers: " + "9" * 5000 + "\n",  # more digits than int() converts
    "model:\n  layers: 0x" + "f" * 2000 + "\n",
    "optimizer:\n  lr: 0x" + "f" * 300 + "\n",  # an int too large for a float
    "optimizer:\n  lr: .nan\n", "optimizer:\n  lr: -.inf\n", "model:\n  rope_theta: .inf\n",
    "optimizer:\n  betas: &a [*a, 0.9]\n",  # a recursive list
    "deepspeed: &a {x: *a}\n",  # a recursive mapping
    "model: &m {layers: 4}\nparallel: *m\n",
    "\ufeffmodel: {}\n",  # BOM
    "model: {layers: 4}\x00\n", "model:\n  layers: \"\\ud800\"\n",
    "[" * 5000 + "]" * 5000 + "\n",  # deep nesting
    "model:\n  layers: " + "[" * 3000 + "]" * 3000 + "\n",
    "deepspeed: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n",
]


def _bomb(levels: int, where: str) -> str:
    """"Billion laughs": 9**levels strings from a few hundred bytes of aliases, as the value
    of `where` (the anchors are defined inside the value itself, a list of the levels)."""
    nodes = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    nodes += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    *sections, key = where.split(".")
    head = "".join(f"{'  ' * depth}{name}:\n" for depth, name in enumerate(sections))
    return f"{head}{'  ' * len(sections)}{key}: [{', '.join(nodes)}]\n"


def _dict_bomb(levels: int, where: str) -> str:
    """The same with mappings: `deepspeed: {x0: {...}, x1: {k0: *x0, ..., k8: *x0}, ...}`."""
    nodes = ["x0: &x0 {a: lol, b: lol, c: lol, d: lol, e: lol, f: lol, g: lol, h: lol, i: lol}"]
    nodes += [f"x{i}: &x{i} {{{', '.join(f'k{k}: *x{i - 1}' for k in range(9))}}}" for i in range(1, levels)]
    return f"{where}: {{{', '.join(nodes)}}}\n"


BOMBS = [_bomb(9, "model.layers"), _bomb(9, "optimizer.betas"), _bomb(9, "logging.wandb"),
         _bomb(9, "logging.wandb.tags"), _bomb(9, "deepspeed.x"), _bomb(9, "run.name"), _bomb(9, "train"),
         _dict_bomb(9, "deepspeed"), _dict_bomb(9, "model")]


@st.composite
def mutated_text(draw) -> bytes:
    """default.yaml's own bytes with a few random edits."""
    data = bytearray(DEFAULT_TEXT.encode())
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.one_of(st.binary(min_size=1, max_size=4),
                               st.sampled_from([b"\t", b"\n", b":", b"- ", b"[", b"{", b"&a ", b"*a", b"!!", b"\xff",
                                                b"#", b"'", b'"', b"? ", b"|", b">", b"%", b"@", b"`", b"\x00"])))
        if edit == "insert":
            data[pos:pos] = chunk
        elif edit == "delete":
            del data[pos:pos + len(chunk)]
        else:
            data[pos:pos + len(chunk)] = chunk
    return bytes(data)


raw_files = st.one_of(st.binary(max_size=300), mutated_text(), st.sampled_from(SNIPPETS),
                      st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))

path_part = st.one_of(st.sampled_from(sorted({part for key in REAL_KEYS for part in key.split(".")})), any_text,
                      st.just(""))
dotted = st.one_of(st.sampled_from(REAL_KEYS + [f"deepspeed.{k}" for k in DEEPSPEED_KEYS]),
                   st.lists(path_part, min_size=1, max_size=4).map(".".join))


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


value_text = st.one_of(
    any_text, st.sampled_from(SPECIAL_INTS + SPECIAL_FLOATS).map(str), st.sampled_from(STRINGS), values.map(_flow),
    st.sampled_from(["", " ", "null", "~", "[1, 2", "{a: 1", "{a: 1}", "[0.9, 0.95]", "&a [*a]", "*a",
                     "!!python/object:os.system x", "1e999", ".nan", ".inf", "-.inf", "0x" + "f" * 300,
                     "9" * 5000, "a=b", "==", "key: value", "- 1", "'quoted'", "\"\\ud800\"", "\t1", "1\n2",
                     "[" * 2000, "!!binary aGk=", "2024-01-01"]))
typed_override = st.sampled_from(REAL_KEYS).flatmap(
    lambda key: TYPED[key].map(lambda v: f"{key}={_flow(v)}"))
overrides = st.lists(st.one_of(
    typed_override, typed_override, st.builds("{}={}".format, dotted, value_text),
    st.sampled_from(["parallel.tensor", "=", "=1", ".=1", "a.=1", ".a=1", "a..b=1", "model=1", "model.layers.x=1",
                     " = ", "model.layers==2", "model.layers=2=3", "deepspeed=1", "deepspeed.a.b=1", "model. layers=2",
                     "logging.wandb=1", "logging.wandb.mode.x=1"])), max_size=3)
world_sizes = st.one_of(st.none(), st.sampled_from([0, -1, 1, 2, 3, 4, 6, 8, 16, 64, 512, 10**6, 2**31, 10**30]),
                        st.integers(-3, 40))


# --------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------


@fuzz_settings(150)
@given(text=raw_files, world_size=world_sizes)
def test_any_bytes_as_config_file(workdir, text, world_size):
    dry_run(workdir, text, world_size=world_size)


@fuzz_settings(250)
@given(raw=schema_configs(), extra=overrides, world_size=world_sizes)
def test_schema_mutations(workdir, raw, extra, world_size):
    dry_run(workdir, yaml.safe_dump(raw, sort_keys=False), overrides=extra, world_size=world_size)


@fuzz_settings(100)
@given(extra=overrides, world_size=world_sizes)
def test_overrides_on_the_default_config(workdir, extra, world_size):
    dry_run(workdir, None, overrides=extra, world_size=world_size)


@fuzz_settings(100)
@given(raw=schema_configs(), extra=overrides)
def test_print_config_round_trips(workdir, raw, extra):
    """--print-config prints YAML that loads back to the very config a launch would run: the
    loaded one with nothing left to decide (or one line, exit 2)."""
    from launcher.training.launch import dry_run_world_size, resolved_config

    path = write_config(workdir, yaml.safe_dump(raw, sort_keys=False))
    code, out, err = run_main(["--print-config", "--config", str(path), *extra])
    assert code in (0, 2), (code, err)
    if code == 2:
        assert_one_line_error(err)
        return
    assert not err, err
    _event("exit 0")
    given = load_config(path, extra)
    resolved = resolved_config(given, dry_run_world_size(given, None, "h100"), "h100")
    assert load_config(write_config(workdir, out, "printed.yaml")) == resolved


@pytest.fixture(scope="module")
def launch_stub(workdir):
    """The real launch path of main up to `train()`: the launcher environment says how many
    ranks there are, the device (and its memory, for the planner's fit check) is the GPU a
    dry run assumes, and `train` is not called."""
    from launcher.planning.cluster import assumed_cluster
    from launcher.planning.precision import ASSUMED_GPU
    from launcher.training import launch, loop

    ranks = {"world_size": 1, "rank": 0, "local_rank": 0, "local_world_size": 1}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "discover", lambda *args, **kwargs: types.SimpleNamespace(**ranks))
        patch.setattr(launch, "detect_device_support", lambda: ASSUMED_GPU)
        patch.setattr(launch, "detect_cluster", lambda world_size, local_world_size, device: assumed_cluster(world_size))
        patch.setattr(loop, "train", lambda *args, **kwargs: 0)
        yield ranks


@fuzz_settings(100)
@given(raw=schema_configs(typed_mutation, 2), extra=st.lists(typed_override, max_size=1),
       world_size=st.sampled_from([1, 2, 4, 8, 16, 32]))
def test_a_dry_run_that_passes_launches(workdir, launch_stub, raw, extra, world_size):
    """`--dry-run --world-size N` and a launch of N ranks run the same checks: the same exit
    code, the same error line."""
    path = str(write_config(workdir, yaml.safe_dump(raw, sort_keys=False)))
    dry_code, _ = dry_run(workdir, None, ["--config", path, *extra], world_size=world_size)
    launch_stub["world_size"] = world_size
    code, _, err = run_main(["--config", path, *extra])
    dry_err = run_main(["--dry-run", "--world-size", str(world_size), "--config", path, *extra])[2]
    assert (code, err) == (dry_code, dry_err)


# --------------------------------------------------------------------------------------
# The command line itself (launcher/train.py's parse_args and main)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--world-size", "four"], ["--world-size", "1.5"], ["--world-size"],
                                  ["--config"], ["--bogus"], ["-x=1"]], ids=str)
def test_usage_errors_are_one_line(workdir, argv):
    code, _, err = run_main(["--dry-run", *argv])
    assert code == 2
    assert_one_line_error(err)


def test_world_size_zero_is_refused(workdir):
    code, _, err = run_main(["--dry-run", "--world-size", "0"])
    assert code == 2
    assert assert_one_line_error(err).startswith("config error: --world-size: must be >= 1, got 0")


def test_bad_world_size_environment_is_one_line(workdir):
    os.environ["WORLD_SIZE"] = "four"
    try:
        code, _, err = run_main(["--dry-run"])
    finally:
        del os.environ["WORLD_SIZE"]
    assert code == 2
    assert "WORLD_SIZE" in assert_one_line_error(err)


@pytest.mark.parametrize("index", range(len(BOMBS)))
def test_alias_bombs_are_cheap(workdir, index):
    """Aliases make a YAML document a graph: nothing may walk (or print) it as a tree."""
    dry_run(workdir, BOMBS[index])


# --------------------------------------------------------------------------------------
# The partitioner the fuzzer made fast: the same boundaries as the reference DP
# --------------------------------------------------------------------------------------


@st.composite
def partition_problems(draw):
    n = draw(st.integers(1, 14))
    stages = draw(st.integers(1, n + 1))
    small = st.integers(0, 6) if draw(st.booleans()) else st.integers(0, 1000)  # small: many ties
    costs = [ItemCost(f"i{k}", "mlp", 0, draw(small), draw(small), draw(small)) for k in range(n)]
    memory = MemoryModel(stages=stages, grad_accum=draw(st.integers(1, 6)), bytes_per_param=draw(
        st.sampled_from([1.0, 2.5, 16.0])))
    cap = draw(st.one_of(st.none(), st.floats(0, 20000)))
    return costs, stages, memory, cap


@fuzz_settings(300)
@given(problem=partition_problems())
def test_fast_balanced_split_equals_the_reference_dp(problem):
    costs, stages, memory, cap = problem
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c.flops_per_token)
    cost = lambda s, i, j: prefix[j] - prefix[i]  # noqa: E731
    fits = (lambda s, i, j: True) if cap is None else (  # noqa: E731
        lambda s, i, j: memory.stage_bytes(costs, s, i, j) <= cap)
    expected = minmax_split(len(costs), stages, cost, fits)
    assert monotone_minmax_split(len(costs), stages, cost, None if cap is None else fits) == expected
    if stages <= len(costs):
        if expected is None:
            with pytest.raises(PartitionError, match="fits"):
                balanced(costs, stages, memory, cap)
        else:
            assert balanced(costs, stages, memory, cap) == expected

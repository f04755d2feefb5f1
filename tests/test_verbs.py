"""The commands as a newcomer meets them: `python -m launcher` lists every verb, and each
verb's --help answers without importing torch or DeepSpeed (the verbs are thin shells that
import the library lazily, launcher/<verb>.py)."""

import importlib
import json
import subprocess
import sys

import pytest

from launcher.__main__ import VERBS
from launch import WORKDIR  # noqa: E402

HEAVY = ("torch", "deepspeed", "transformers", "matplotlib")


def test_python_m_launcher_lists_every_verb():
    result = subprocess.run([sys.executable, "-m", "launcher"], cwd=WORKDIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == [verb for verb, _ in VERBS]
    for verb in listed:
        assert callable(importlib.import_module(f"launcher.{verb}").main)


@pytest.mark.parametrize("verb", ["train", "plan", "prepare", "export", "generate", "report"])
def test_help_imports_no_heavy_library(verb):
    code = (f"import sys\nfrom launcher.{verb} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=WORKDIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_export_offers_the_dtypes_the_reader_writes():
    from launcher.checkpoint.reader import DTYPES
    from launcher.export import DTYPE_CHOICES

    assert DTYPE_CHOICES == tuple(sorted(DTYPES))


@pytest.mark.parametrize("verb, argv, line", [
    ("generate", ["--prompt", "hi"], "config error: --checkpoint or --hf: give one of them"),
    ("generate", ["--hf", "x"], "config error: --prompt: required"),
    ("train", ["--world-size", "four"], "config error: --world-size: invalid int value: 'four'"),
])
def test_a_usage_mistake_is_said_once_in_one_line(capsys, verb, argv, line):
    code = importlib.import_module(f"launcher.{verb}").main(argv) if verb == "train" else None
    if verb != "train":
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(f"launcher.{verb}").main(argv)
        code = exited.value.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(line)
    assert err.count(line.split(": ", 2)[-1]) == 1  # not repeated


def test_overrides_and_options_mix_in_any_order(capsys):
    from launcher.train import main

    argv = ["parallel.tensor=1", "--dry-run", "parallel.pipeline=1", "--world-size", "1"]
    assert main(argv) == 0
    assert "world 1 = tp 1 x pp 1 x dp 1" in capsys.readouterr().out


def test_report_without_a_step_to_plot_is_one_line_exit_2(tmp_path, capsys):
    from launcher.report import main

    assert main([]) == 2
    assert capsys.readouterr().err == "config error: run_dir: required (python -m launcher.report --help)\n"
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"config error: run_dir: no metrics.jsonl in {tmp_path}\n"
    (tmp_path / "metrics.jsonl").write_text('{"event": "launch", "step": 0}\n')  # started, nothing logged yet
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no step record yet" in err
    assert not (tmp_path / "report").exists()


def test_plan_says_the_range_it_takes_and_mixes_overrides_and_options(capsys):
    from launcher.plan import main

    assert main(["--efficiency", "2"]) == 2
    assert capsys.readouterr().err == ("config error: --efficiency: out of range: 2.0 (expected 0 < efficiency <= 1, "
                                       "the share of peak FLOP/s a step reaches)\n")
    assert main(["model.layers=2", "--gpus-per-node", "8", "parallel.tensor=1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"]["tp"] == 1 and report["layout"]["pp"] == 2  # both overrides taken

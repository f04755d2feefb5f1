"""The commands as a newcomer meets them: `python -m launcher` lists every verb, and each
verb's --help answers without importing torch or DeepSpeed (the verbs are thin shells that
import the library lazily, launcher/<verb>.py)."""

import importlib
import subprocess
import sys

import pytest
from conftest import REPO

from launcher.__main__ import VERBS

HEAVY = ("torch", "deepspeed", "transformers")


def test_python_m_launcher_lists_every_verb():
    result = subprocess.run([sys.executable, "-m", "launcher"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == [verb for verb, _ in VERBS]
    for verb in listed:
        assert callable(importlib.import_module(f"launcher.{verb}").main)


@pytest.mark.parametrize("verb", ["train", "plan", "prepare", "export", "generate"])
def test_help_imports_no_heavy_library(verb):
    code = (f"import sys\nfrom launcher.{verb} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_export_offers_the_dtypes_the_reader_writes():
    from launcher.checkpoint.reader import DTYPES
    from launcher.export import DTYPE_CHOICES

    assert DTYPE_CHOICES == tuple(sorted(DTYPES))

"""DeepSpeed's seams (launcher/ds/seams.py): every DeepSpeed name they replace, override or
call exists in the installed DeepSpeed, none is touched outside that module, and another
DeepSpeed version is refused at start, in one line naming them."""

import ast
import configparser
import subprocess
import sys

import pytest
from conftest import REPO

from launcher.ds import seams
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError


@pytest.mark.parametrize("seam", seams.SEAMS, ids=lambda s: f"{s.function}:{s.touches.rsplit('.', 1)[-1]}")
def test_each_seam_names_a_deepspeed_attribute_that_exists(seam):
    assert seams.seam_target_present(seam.touches), f"{seam.touches} is gone from DeepSpeed {seams.installed_deepspeed()}"
    assert callable(getattr(seams, seam.function)), seam.function
    assert seam.how in ("replaces", "overrides", "calls", "reads")


def test_the_presence_check_sees_a_missing_name():
    assert not seams.seam_target_present("deepspeed.runtime.engine.DeepSpeedEngine._no_such_method")
    assert not seams.seam_target_present("deepspeed.runtime.no_such_module.Thing.attr")
    assert seams.seam_target_present("deepspeed.runtime.engine.DeepSpeedEngine.load_checkpoint")
    # an instance attribute DeepSpeed assigns in __init__ counts as present
    assert seams.seam_target_present("deepspeed.runtime.engine.DeepSpeedEngine.seq_dp_world_size")


def test_the_pinned_deepspeed_is_the_checked_one():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    pins = [line.strip() for line in setup["options"]["install_requires"].splitlines() if "deepspeed" in line]
    assert pins == [f"deepspeed=={seams.TESTED_DEEPSPEED}"]
    assert seams.installed_deepspeed() == seams.TESTED_DEEPSPEED


def test_another_deepspeed_is_refused_naming_the_seams(monkeypatch):
    monkeypatch.delenv(seams.UNCHECKED_ENV, raising=False)
    seams.check_deepspeed_version(seams.TESTED_DEEPSPEED)  # the checked one passes
    with pytest.raises(ConfigError) as refused:
        seams.check_deepspeed_version("0.20.0")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("deepspeed: version 0.20.0")
    for seam in seams.SEAMS:
        assert seam.function in message
    monkeypatch.setenv(seams.UNCHECKED_ENV, "1")  # the user ran this test on that version
    seams.check_deepspeed_version("0.20.0")


def test_a_launch_on_another_deepspeed_exits_2_before_anything_starts(monkeypatch, capsys):
    from launcher.train import main

    monkeypatch.delenv(seams.UNCHECKED_ENV, raising=False)
    monkeypatch.setattr(seams, "installed_deepspeed", lambda: "0.20.0")
    assert main(["--dry-run", "--world-size", "1"]) == CONFIG_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config error: deepspeed: version 0.20.0" in err


def test_no_deepspeed_internal_is_touched_outside_the_seams_module():
    """Code (not comments or docstrings) reads the private names the seams touch, or assigns
    any seam's attribute, in launcher/ds/seams.py only."""
    attributes = {s.touches.rsplit(".", 1)[-1] for s in seams.SEAMS}
    private = {a for a in attributes if a.startswith("_")}
    offenders = []
    for path in sorted((REPO / "launcher").rglob("*.py")) + sorted((REPO / "parallel").rglob("*.py")):
        if path == REPO / "launcher" / "ds" / "seams.py":
            continue
        tree = ast.parse(path.read_text())
        assigned = {id(t) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (node.attr in private or
                                                    (node.attr in attributes and id(node) in assigned)):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_muon_stand_ins_spare_the_compile_and_refuse_to_be_used():
    """skip_compile_imports (called by build_engine when model.compile is off) keeps DeepSpeed's
    Muon modules, which run torch.compile at import, from loading; the stand-ins answer the
    questions DeepSpeed asks of a non-Muon optimizer and refuse to do Muon's work."""
    code = ("import sys, torch; from launcher.ds.seams import skip_compile_imports; skip_compile_imports(); "
            "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam; "
            "from deepspeed.runtime.zero.muon.original_muon import muon_update; "
            "assert not isinstance(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), MuonWithAuxAdam); "
            "assert not any(hasattr(sys.modules[m], '__file__') for m in sys.modules if '.muon.' in m), 'the real module loaded'\n"
            "try: muon_update(None, None)\n"
            "except RuntimeError as e: print(e)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no launcher optimizer is Muon" in result.stdout

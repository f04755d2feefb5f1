"""What a resume takes and says. `checkpoint.resume: PATH` takes a checkpoint, or a run
directory (as export and generate do): the run's published checkpoints are then tried newest
first, as its own resume would. A resume that changes the learning-rate schedule says so."""

import pytest

from launcher.checkpoint.store import MANIFEST, STATE, resume_candidates
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.training.preflight import check_explicit_resume


def _checkpoint(path, files=(STATE, MANIFEST)):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_a_run_directory_or_a_checkpoint_or_a_root(tmp_path):
    run = tmp_path / "run"
    older = _checkpoint(run / "checkpoints" / "step-00000002")
    newer = _checkpoint(run / "checkpoints" / "step-00000010")
    own = tmp_path / "own"
    assert resume_candidates(own, run) == [newer, older]  # a run directory
    assert resume_candidates(own, run / "checkpoints") == [newer, older]  # its checkpoint root
    assert resume_candidates(own, older) == [older]  # one checkpoint: that one only
    assert resume_candidates(run / "checkpoints", None) == [newer, older]  # auto: the run's own


def test_the_launch_check_takes_a_run_directory_and_refuses_other_directories(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "step-00000004")
    half = _checkpoint(tmp_path / "half", files=(MANIFEST,))
    cfg = Config()
    for path in (run, run / "checkpoints" / "step-00000004"):
        cfg.checkpoint.resume = str(path)
        check_explicit_resume(cfg)
    for path, missing in ((tmp_path / "empty", STATE), (half, STATE)):
        path.mkdir(exist_ok=True)
        cfg.checkpoint.resume = str(path)
        with pytest.raises(ConfigError, match=rf"^checkpoint.resume: {path} is not a checkpoint \(no {missing}\) "
                                              "nor a run directory with checkpoints"):
            check_explicit_resume(cfg)


def test_a_changed_schedule_is_said_in_one_line():
    from launcher.checkpoint.state import fingerprint
    from launcher.training.optim import lr_at, schedule_change

    cfg = Config()
    cfg.train.steps, cfg.schedule.warmup_steps, cfg.optimizer.lr, cfg.schedule.min_lr = 60, 10, 3e-3, 1e-4
    saved = fingerprint(cfg)["schedule"]
    assert schedule_change(saved, cfg, 60) is None  # the same schedule: nothing to say
    assert schedule_change(None, cfg, 60) is None  # a checkpoint from before schedules were recorded
    cfg.train.steps = 100
    note = schedule_change(saved, cfg, 60)
    now, was = lr_at(61, 3e-3, cfg.schedule, 100), lr_at(61, 3e-3, cfg.schedule, 60)
    assert note == (f"train.steps 60 -> 100 since the checkpoint: the learning-rate schedule now follows the new "
                    f"values, step 61 runs at lr {now:.3g} (the saved schedule would give {was:.3g}); "
                    "docs/CHECKPOINTS.md")
    assert now > was  # a longer run decays more slowly


def test_the_dry_run_says_which_checkpoint_a_launch_would_resume_from(tmp_path):
    from launcher.training.launch import resume_line

    cfg = Config()
    cfg.checkpoint.dir = str(tmp_path / "checkpoints")
    assert resume_line(cfg) == f"resume     nothing to resume under {tmp_path / 'checkpoints'}: a fresh start"
    _checkpoint(tmp_path / "checkpoints" / "step-00000003")
    newest = _checkpoint(tmp_path / "checkpoints" / "step-00000007")
    assert resume_line(cfg) == f"resume     {newest} (step 7) if it verifies at launch, else an older one of 2"
    cfg.checkpoint.resume = "none"
    assert resume_line(cfg) == "resume     none: a fresh start (checkpoint.resume: none)"

"""The suite runs beside a user's run and leaves it alone (the guard is in tests/conftest.py)."""

from pathlib import Path

from conftest import REPO, WORKDIR


def test_the_session_runs_in_a_scratch_directory_beside_a_user_run():
    assert Path.cwd() == WORKDIR
    decoy = Path("runs") / "default" / "config.yaml"
    assert decoy.is_file() and not decoy.resolve().is_relative_to(REPO)
    assert Path("configs/default.yaml").resolve() == REPO / "configs" / "default.yaml"

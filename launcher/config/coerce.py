"""Type-hint coercion: a raw YAML mapping -> the schema's dataclasses, checked against their
annotations (scalars, literals, optionals and unions, lists, nested sections, the free-form
`deepspeed:` block).

A mistake is a one-line `ConfigError` naming the key, with "did you mean" for an unknown
one. Numbers are finite, integers fit 64 bits, and the `deepspeed:` block is bounded in
size and depth, so a YAML alias graph ("billion laughs") is refused before anything walks it.

Why not pydantic: its errors are multi-line tables and it has no "did you mean"; the
type-checking we need (scalars, literals, lists, nested dataclasses) is ~80 lines here.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import re
import types
import typing
from typing import Any, Literal, Union

from launcher.config.schema import ModelConfig
from launcher.errors import ConfigError, show_value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


INT64 = 2**63  # every integer ends up in an int64 (torch, numpy, DeepSpeed's C++ side)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def finite_float(value: Any, key: str) -> float:
    """Every float in the config is a size, rate or time: nan and +-inf cannot train."""
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(key, f"expected a finite number, got {show_value(value)} (too large for a float)") from None
    if not math.isfinite(number):
        raise ConfigError(key, f"expected a finite number, got {show_value(value)}")
    return number


# The `deepspeed:` pass-through block becomes DeepSpeed's JSON config: a tree of mappings
# with string keys, lists and JSON scalars. Its size is bounded (DeepSpeed's own configs have
# a few dozen keys) so that a YAML alias graph ("billion laughs") is refused before anything
# walks it as a tree.
_DEEPSPEED_BLOCK_NODES = 10_000
_DEEPSPEED_BLOCK_DEPTH = 32


def _check_json_like(value: Any, key: str) -> None:
    budget = [_DEEPSPEED_BLOCK_NODES]
    open_nodes: set[int] = set()  # the containers on the path from the root: a YAML alias loop

    def walk(node: Any, path: str, depth: int) -> None:
        if id(node) in open_nodes:
            raise ConfigError(path, "contains itself (a YAML alias inside its own anchor)")
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(key, f"more than {_DEEPSPEED_BLOCK_NODES} values (YAML aliases repeated?): "
                              "a DeepSpeed config is a few dozen keys")
        if depth > _DEEPSPEED_BLOCK_DEPTH:
            raise ConfigError(path, f"nested more than {_DEEPSPEED_BLOCK_DEPTH} levels deep")
        if isinstance(node, (dict, list)):
            open_nodes.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if isinstance(node, dict) and not isinstance(k, str):
                    raise ConfigError(f"{path}.{show_value(k)}", "DeepSpeed config keys must be strings (quote it)")
                walk(v, f"{path}.{k}" if isinstance(node, dict) else f"{path}[{k}]", depth + 1)
            open_nodes.discard(id(node))
        elif isinstance(node, float):
            finite_float(node, path)
        elif isinstance(node, int) and not -INT64 <= node < INT64:
            raise ConfigError(path, f"{show_value(node)} is out of range (a 64-bit integer)")
        elif node is not None and not isinstance(node, (str, int)):  # bool is an int
            raise ConfigError(path, f"expected a JSON value (mapping, list, string, number, true/false, null), "
                              f"got {show_value(node)}")

    walk(value, key, 0)


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return the typed value or raise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce_value(value, arm, key)
            except ConfigError as err:
                errors.append(err)
        # The value has the right type for an arm but a wrong value (nan for a float): say so.
        specific = [e for e in errors if "finite" in e.message]
        if specific:
            raise specific[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {show_value(value)}")
    if origin is Literal:
        if type(value) in {type(a) for a in typing.get_args(tp)} and value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {show_value(value)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {show_value(value)}")
        return [coerce_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return finite_float(value, key)  # PyYAML (YAML 1.1) reads `3e-4` as a string; accept what users mean
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp} for {key}")
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {show_value(value)}")
    if tp is int and not -INT64 <= value < INT64:
        raise ConfigError(key, f"{show_value(value)} is out of range (a 64-bit integer)")
    if tp is dict:
        _check_json_like(value, key)
    return finite_float(value, key) if tp is float else value


def _unknown_key(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
    return ConfigError(key, f"unknown key{hint}")


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<top level>", f"expected a mapping, got {show_value(raw)}")
    hints = typing.get_type_hints(cls)
    names = [yaml_name(f.name) for f in dataclasses.fields(cls)]
    values = {}
    for name, value in raw.items():
        shown = name if isinstance(name, str) else show_value(name)  # YAML keys may be numbers, null, true
        key = f"{prefix}.{shown}" if prefix else shown
        field_name = f"{name}_" if isinstance(name, str) and keyword.iskeyword(name) else name
        if not isinstance(name, str) or field_name not in hints:
            raise _unknown_key(key, shown, names)
        values[field_name] = coerce_value(value, hints[field_name], key)
    return cls(**values)


def yaml_name(field_name: str) -> str:
    """A field named after a Python keyword (`async_`) is spelled without the underscore in YAML."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def model_config(values: dict, key: str = "model") -> ModelConfig:
    """A ModelConfig from plain values (a checkpoint's fingerprint, a Hugging Face
    config.json's), type-checked as the config file's model section is."""
    return build_section(ModelConfig, values, key)

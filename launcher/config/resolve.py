"""Resolving `auto` after parsing, the step of config loading that reads files from disk.

`model.init_from` fills the model keys that are `auto` or left out from a Hugging Face
directory's config.json (launcher/formats/hf_config.py) and, when data.tokenizer is left
out, points it at the directory's tokenizer.json; `model.vocab: auto` becomes the
tokenizer's size padded for tensor parallelism (launcher/formats/tokenizer.py). The parallel
degrees' `auto` is not resolved here: the planner picks them at launch, for the world size.
"""

from __future__ import annotations

import typing
from pathlib import Path

from launcher.config.checks import check_positive
from launcher.config.coerce import coerce_value
from launcher.config.schema import Config, ModelConfig
from launcher.errors import ConfigError
from launcher.formats.hf_config import hf_model_values

# The model keys `auto` reads from model.init_from's config.json (launcher/formats/hf_config.py).
AUTO_MODEL_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len", "rope_theta", "rope_scaling",
                   "norm_eps", "tie_embeddings")


def resolve_init_from(cfg: Config, raw: dict) -> None:
    """`model.init_from`: the model keys that are `auto` or left out take the directory's
    config.json values, a data.tokenizer left out its tokenizer.json (or SentencePiece tokenizer.model). Without init_from,
    `auto` is an error (except model.vocab's, from the tokenizer)."""
    m = cfg.model
    if m.init_from is None:
        for name in AUTO_MODEL_KEYS:
            if name != "vocab" and getattr(m, name) == "auto":
                raise ConfigError(f"model.{name}", "auto reads a Hugging Face config.json: set model.init_from "
                                  "to the model directory, or give a value")
        return
    if not m.init_from.strip():
        raise ConfigError("model.init_from", "empty: give a Hugging Face model directory, or null")
    values = hf_model_values(Path(m.init_from))
    given = raw.get("model") or {}
    hints = typing.get_type_hints(ModelConfig)
    for name in AUTO_MODEL_KEYS:
        if name not in given or getattr(m, name) == "auto":
            setattr(m, name, coerce_value(values[name], hints[name], f"model.{name}"))
            if name == "vocab" and cfg.parallel.tensor != "auto":  # even vocabulary-parallel shards
                check_positive("parallel.tensor", cfg.parallel.tensor)
                m.vocab = -(-m.vocab // cfg.parallel.tensor) * cfg.parallel.tensor
    _resolve_moe(m, values, "moe" in given)
    if "tokenizer" not in (raw.get("data") or {}) and any(
            (Path(m.init_from) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        cfg.data.tokenizer = m.init_from


def _resolve_moe(m: ModelConfig, values: dict, given: bool) -> None:
    """model.moe from a Mixtral config.json when left out; when given, its shape (experts,
    top_k, ffn, no shared experts, no dense first layers, softmax router) must be the
    directory's; balancing and capacity are the run's own choice."""
    theirs = values["moe"]
    if not given:
        m.moe = None if theirs is None else coerce_value(theirs, typing.get_type_hints(ModelConfig)["moe"], "model.moe")
        return
    if m.moe is not None and theirs is None:
        raise ConfigError("model.moe", f"{m.init_from} is a dense Llama: model.moe must be left out (or null)")
    if m.moe is None:
        if theirs is not None:
            raise ConfigError("model.moe", f"null, but {m.init_from} is a Mixture of Experts (Mixtral)")
        return
    for name in ("experts", "top_k", "ffn", "shared_experts", "first_dense", "router"):
        if getattr(m.moe, name) != theirs[name]:
            raise ConfigError(f"model.moe.{name}", f"{getattr(m.moe, name)!r}, but {m.init_from}'s config.json "
                              f"gives {theirs[name]!r} (leave model.moe out to take the directory's)")


def resolve_vocab(cfg: Config) -> None:
    """`model.vocab: auto` -> the tokenizer's size padded for tensor parallelism."""
    if cfg.model.vocab != "auto":
        return
    # lazy: the tokenizer module pulls in numpy, which `plan --help` does not need
    from launcher.formats.tokenizer import load_tokenizer, padded_vocab

    tp = 1 if cfg.parallel.tensor == "auto" else cfg.parallel.tensor  # auto picks a tp dividing the vocabulary
    check_positive("parallel.tensor", tp)
    cfg.model.vocab = padded_vocab(load_tokenizer(cfg.data.tokenizer).vocab_size, tp)

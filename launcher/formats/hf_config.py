"""A Hugging Face Llama or Mixtral directory's config.json -> our model keys (`hf_model_values`), for
`model.init_from`'s `auto` keys and `launcher.generate --hf`.

An architecture launcher.model does not compute (another model_type or activation, biases,
RoPE scaling other than Llama 3.1's, another head_dim) is refused in one line naming the
file and field. The safetensors weights beside it are read by launcher/hf/weights.py, which
shares `CONFIG`, `INDEX` and `read_hf_config` from here. A vocabulary padded beyond the
directory's (model.vocab above config.json's vocab_size, for tensor parallelism:
launcher/config/resolve.py) gets zero rows on import; those ids are never inputs nor
targets, and `launcher.export` trims them off again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from launcher.errors import ConfigError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"

# our model key: config.json key (what `auto` reads)
HF_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "ffn": "intermediate_size", "vocab": "vocab_size",
           "seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
           "tie_embeddings": "tie_word_embeddings"}
_INT_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len")


def read_hf_config(directory: Path, key: str = "model.init_from") -> dict:
    path = Path(directory) / CONFIG
    if not Path(directory).is_dir():
        raise ConfigError(key, f"{directory}: not a directory (expected a Hugging Face model directory "
                          f"with {CONFIG} and *.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(key, f"{directory}: no {CONFIG} (not a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(key, f"{path}: not readable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(key, f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(raw: dict, path: Path, key: str) -> tuple[Any, Optional[dict]]:
    """(rope_theta, rope_scaling), from transformers 4's `rope_theta` + `rope_scaling` or 5's
    `rope_parameters`. Plain RoPE and Llama 3.1's `llama3` scaling are what launcher.model
    computes; `linear`, `dynamic`, `yarn` and the rest are refused."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if isinstance(params, dict):
        scaling = scaling or params
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        theta = raw.get("rope_theta", 10000.0)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(key, f"{path}: RoPE scaling {kind!r} is not supported (plain RoPE or 'llama3')")
    missing = [f for f in _LLAMA3_FIELDS if f not in scaling]
    if missing:
        raise ConfigError(key, f"{path}: llama3 RoPE scaling without {missing[0]}")
    return theta, {"rope_type": "llama3", **{f: scaling[f] for f in _LLAMA3_FIELDS}}


def hf_model_values(directory: Path, key: str = "model.init_from") -> dict:
    """Our model keys read from the directory's config.json, checked to be an architecture
    launcher.model computes; one-line ConfigError naming the file and field otherwise."""
    raw = read_hf_config(directory, key)
    path = Path(directory) / CONFIG
    model_type = raw.get("model_type")
    if model_type not in ("llama", "mixtral"):
        raise ConfigError(key, f"{path}: model_type {model_type!r}, expected 'llama' (LlamaForCausalLM) or "
                          "'mixtral' (MixtralForCausalLM)")
    for field, allowed in (("hidden_act", ("silu", "swish")), ("attention_bias", (False, None)),
                           ("mlp_bias", (False, None))):
        if raw.get(field) not in allowed:
            raise ConfigError(key, f"{path}: {field}={raw.get(field)!r} is not supported "
                              f"(launcher.model computes {allowed[0]!r})")
    values = {ours: raw.get(theirs) for ours, theirs in HF_KEYS.items()}
    values["rope_theta"], values["rope_scaling"] = _rope(raw, path, key)
    if values["kv_heads"] is None:
        values["kv_heads"] = values["heads"]
    values["norm_eps"] = raw.get("rms_norm_eps", 1e-6)
    values["tie_embeddings"] = raw.get("tie_word_embeddings", False)
    for ours in _INT_KEYS:
        value = values[ours]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(key, f"{path}: {HF_KEYS[ours]}={value!r}, expected a positive integer")
    for ours in ("norm_eps", "rope_theta"):
        value = values[ours]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(key, f"{path}: {HF_KEYS[ours]}={value!r}, expected a positive number")
        values[ours] = float(value)
    scaling = values["rope_scaling"]
    for field in _LLAMA3_FIELDS if scaling else ():
        value = scaling[field]
        kind = int if field == "original_max_position_embeddings" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
            raise ConfigError(key, f"{path}: rope_scaling {field}={value!r}, expected a positive number")
    if scaling and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(key, f"{path}: rope_scaling high_freq_factor={scaling['high_freq_factor']!r} is not "
                          f"above low_freq_factor={scaling['low_freq_factor']!r}")
    if not isinstance(values["tie_embeddings"], bool):
        raise ConfigError(key, f"{path}: tie_word_embeddings={values['tie_embeddings']!r}, expected true or false")
    head_dim = raw.get("head_dim")
    if head_dim is not None and (type(head_dim) is not int or head_dim * values["heads"] != values["hidden"]):
        raise ConfigError(key, f"{path}: head_dim={head_dim!r} is not hidden_size / num_attention_heads "
                          f"({values['hidden']} / {values['heads']}), which launcher.model assumes")
    values["moe"] = _mixtral_moe(raw, path, key, values["ffn"]) if model_type == "mixtral" else None
    return values


def _mixtral_moe(raw: dict, path: Path, key: str, ffn: int) -> dict:
    """model.moe of a Mixtral config.json: softmax router, top-k renormalised, no shared
    experts, every layer MoE, each expert of ffn intermediate_size."""
    moe = {}
    for ours, theirs in (("experts", "num_local_experts"), ("top_k", "num_experts_per_tok")):
        value = raw.get(theirs)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(key, f"{path}: {theirs}={value!r}, expected a positive integer")
        moe[ours] = value
    if moe["top_k"] > moe["experts"]:
        raise ConfigError(key, f"{path}: num_experts_per_tok={moe['top_k']} is more than num_local_experts="
                          f"{moe['experts']}")
    if raw.get("sliding_window") is not None:
        raise ConfigError(key, f"{path}: sliding_window={raw['sliding_window']!r} is not supported "
                          "(launcher.model attends to the whole sequence)")
    coef = raw.get("router_aux_loss_coef", 0.02)
    coef = float(coef) if isinstance(coef, (int, float)) and not isinstance(coef, bool) and coef >= 0 else 0.02
    return {**moe, "shared_experts": 0, "ffn": ffn, "first_dense": 0, "router": "softmax", "balance": "aux_loss",
            "aux_loss_coef": coef}

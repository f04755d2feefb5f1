"""Reading a Hugging Face Llama directory: `model.init_from`, and `launcher.generate --hf`.

    config.json      -> our model keys (`hf_model_values`), for the keys left `auto`; an
                        architecture we do not build (biases, RoPE scaling other than Llama
                        3.1's, another head_dim) is refused in one line
    *.safetensors    -> `check_hf_weights`: every tensor there and of the shape the config
                        needs, from the files' headers alone (before any process starts);
                        `load_hf_weights`: each rank copies in only its own slices, read
                        through safetensors' memory-mapped slices, so no rank ever holds a
                        full tensor it does not own, let alone the model

The names come from launcher/hf_names.py (every parameter carries its `logical_name`). A
vocabulary padded beyond the directory's (model.vocab above config.json's vocab_size, e.g.
for tensor parallelism) gets zero rows there: those ids are never inputs nor targets, and
`launcher.export` trims them off again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from launcher import hf_names
from launcher.config import ConfigError, ModelConfig

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
    if model_type != "llama":
        raise ConfigError(key, f"{path}: model_type {model_type!r}, expected 'llama' (LlamaForCausalLM)")
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
    return values


# --------------------------------------------------------------------------------------
# The weights
# --------------------------------------------------------------------------------------


class HFWeights:
    """The tensors of a directory's safetensors files by Hugging Face name: their shapes from
    the headers, and any slice of one read from the memory-mapped file."""

    def __init__(self, directory: Path, key: str = "model.init_from"):
        self.directory, self.key = Path(directory), key
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(key, f"{index}: not a safetensors index ({err})") from None
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in self.directory.glob("*.bin"))[:2])
            raise ConfigError(key, f"{self.directory}: no *.safetensors files" +
                              (f" ({found} is PyTorch pickle: save the model with safe_serialization)" if found else ""))
        self._files: dict[str, Any] = {}  # file name -> open safe_open handle
        self.file_of: dict[str, str] = {}  # tensor name -> file name
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            handle = self._open(name)
            for tensor in handle.keys():
                self.file_of[tensor] = name
                self.shapes[tensor] = tuple(handle.get_slice(tensor).get_shape())

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            path = self.directory / name
            try:
                self._files[name] = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise ConfigError(self.key, f"{path}: missing (named by {INDEX})") from None
            except Exception as err:  # safetensors raises its own SafetensorError for a bad header
                raise ConfigError(self.key, f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from None
        return self._files[name]

    def slice(self, name: str, dim: Optional[int], start: int, length: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, start + length) of a tensor, or all of it
        (dim None), read from disk: only those bytes are paged in."""
        part = self._open(self.file_of[name]).get_slice(name)
        if dim is None:
            return part[:]
        return part[start:start + length] if dim == 0 else part[:, start:start + length]


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> the full shape the config needs (vocabulary rows: at most model.vocab)."""
    return {hf: hf_names.full_shape(model, ours) for ours, hf in hf_names.weights(model)}


def check_hf_weights(model: ModelConfig, directory: Path, key: str = "model.init_from") -> None:
    """Every tensor the model needs is in the directory with the shape the config gives it
    (a vocabulary may be padded: fewer rows there than model.vocab is fine), and nothing in it
    would be dropped; from the headers only. One-line ConfigError naming the tensor and both shapes."""
    weights = HFWeights(directory, key)
    for hf, shape in expected_shapes(model).items():
        if hf not in weights.shapes:
            raise ConfigError(key, f"{directory}: no tensor {hf} (the config needs {shape})")
        got = weights.shapes[hf]
        padded_vocab = hf in ("model.embed_tokens.weight", "lm_head.weight") and len(got) == 2 and \
            got[1] == shape[1] and got[0] <= shape[0]
        if got != shape and not padded_vocab:
            raise ConfigError(key, f"{hf}: shape {got} in {weights.directory / weights.file_of[hf]}, "
                              f"the config needs {shape} (model.* shape keys set to auto take config.json's values)")
    needed = set(expected_shapes(model))
    if model.tie_embeddings and read_hf_config(directory, key).get("tie_word_embeddings") is True:
        needed.add("lm_head.weight")  # a tied model saved with its head too: transformers ignores it, as we do
    for hf in weights.shapes:
        try:
            ours = hf_names.from_hf(hf)
        except KeyError:
            continue  # not a weight of ours (e.g. rotary_emb.inv_freq, which we recompute)
        if hf not in needed:
            why = ("model.tie_embeddings is true" if ours == "head.weight" else
                   f"the config has {model.layers} layers (model.layers)")
            raise ConfigError(key, f"{hf}: in {directory} but the model has no such weight ({why})")


@functools.lru_cache(maxsize=4)
def weights_source(directory: str) -> dict:
    """Where a run's initial weights came from, for its checkpoints' fingerprint: the
    directory, a digest of config.json and the safetensors headers (names, shapes, dtypes,
    offsets: cheap at every save, unlike hashing every byte of a 100 GB model), its
    vocab_size (what launcher.export trims a padded vocabulary back to) and
    max_position_embeddings (what export writes back, whatever model.seq_len trained)."""
    digest = hashlib.sha256()
    root = Path(directory)
    for path in [root / CONFIG, *sorted(root.glob("*.safetensors"))]:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            if path.suffix == ".safetensors":
                size = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(size, 100_000_000)))
            else:
                digest.update(f.read())
    config = read_hf_config(root)
    return {"init_from": str(root.resolve()), "sha256": digest.hexdigest(), "vocab_size": config.get("vocab_size"),
            "max_position_embeddings": config.get("max_position_embeddings")}


@torch.no_grad()
def load_hf_weights(module: torch.nn.Module, directory: Path, tp_rank: int, tp_size: int,
                    key: str = "model.init_from") -> int:
    """Copy this rank's slice of every parameter of `module` (one pipeline stage, one tp rank)
    from the directory; returns the number of elements copied. Parameters shared by several
    items (a tied head) are copied once: `parameters()` yields each once."""
    weights = HFWeights(directory, key)
    copied = 0
    for param in module.parameters():
        hf = hf_names.to_hf(param.logical_name)
        dim = param.tp_shard_dim if tp_size > 1 else None
        start = tp_rank * param.shape[dim] if dim is not None else 0
        if hf not in weights.shapes:
            raise ConfigError(key, f"{directory}: no tensor {hf} (the config needs it)")
        available = weights.shapes[hf][0]
        if param.logical_name in ("embed.weight", "head.weight") and start + param.shape[0] > available:
            # a padded vocabulary: the rows beyond the directory's are zero
            param.zero_()
            rows = max(0, min(param.shape[0], available - start))
            if rows:
                param[:rows].copy_(weights.slice(hf, 0, start, rows))
        else:
            part = weights.slice(hf, dim, start, param.shape[dim] if dim is not None else 0)
            if tuple(part.shape) != tuple(param.shape):
                raise ConfigError(key, f"{hf}: slice {tuple(part.shape)} read for tp rank {tp_rank} of {tp_size}, "
                                  f"the parameter is {tuple(param.shape)}")
            param.copy_(part)
        copied += param.numel()
    return copied

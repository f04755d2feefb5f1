"""Reading a Hugging Face Llama directory's weights: `model.init_from`, and `generate --hf`.

    *.safetensors    -> `check_hf_weights`: every tensor there and of the shape the config
                        needs, from the files' headers alone (before any process starts);
                        `load_hf_weights`: each rank copies in only its own slices, read
                        through safetensors' memory-mapped slices, so no rank ever holds a
                        full tensor it does not own, let alone the model

The names come from launcher/model/weights.py (every parameter carries its `logical_name`). A
vocabulary padded beyond the directory's (model.vocab above config.json's vocab_size, e.g.
for tensor parallelism) gets zero rows there: those ids are never inputs nor targets, and
`python -m launcher.export` trims them off again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from launcher.config.schema import ModelConfig
from launcher.errors import ConfigError
from launcher.formats.hf_config import CONFIG, INDEX, read_hf_config
from launcher.model import weights as hf_names

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
    vocab_size (what `python -m launcher.export` trims a padded vocabulary back to) and
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


def _stacked_experts(weights: HFWeights, param: torch.nn.Parameter, directory: Path, key: str,
                     experts: tuple[int, int]) -> torch.Tensor:
    """This expert rank's experts (rows rank * E/ep onwards of the stack; `experts` is (rank,
    ep)), one file tensor each."""
    rows = []
    local, (rank, size) = param.shape[0], experts
    for ours in hf_names.expert_rows(param.logical_name, local * size)[rank * local:(rank + 1) * local]:
        hf = hf_names.to_hf(ours)
        if hf not in weights.shapes:
            raise ConfigError(key, f"{directory}: no tensor {hf} (the config needs it)")
        rows.append(weights.slice(hf, None, 0, 0))
    stacked = torch.stack(rows)
    if tuple(stacked.shape) != tuple(param.shape):
        raise ConfigError(key, f"{param.logical_name}: experts of shape {tuple(stacked.shape[1:])} in {directory}, "
                          f"the parameter's are {tuple(param.shape[1:])}")
    return stacked


@torch.no_grad()
def load_hf_weights(module: torch.nn.Module, directory: Path, tp_rank: int, tp_size: int,
                    key: str = "model.init_from", experts: Optional[tuple[int, int]] = None) -> int:
    """Copy this rank's slice of every parameter of `module` (one pipeline stage, one tp rank)
    from the directory; returns the number of elements copied. Parameters shared by several
    items (a tied head) are copied once: `parameters()` yields each once. `experts`: this
    rank's (expert rank, expert degree), by default (tp_rank, tp_size)."""
    weights = HFWeights(directory, key)
    copied = 0
    for param in module.parameters():
        if hf_names.is_expert(param.logical_name):  # stacked experts: one tensor per expert in the files
            param.copy_(_stacked_experts(weights, param, directory, key, experts or (tp_rank, tp_size)))
            copied += param.numel()
            continue
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

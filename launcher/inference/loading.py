"""A model for generation, unsharded on one device: from a checkpoint of any tensor, pipeline
and ZeRO layout (gathered by launcher/checkpoint/reader.py), or from a Hugging Face
directory; with the tokenizer the weights were trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.checkpoint.reader import (
    CheckpointReader,
    resolve_checkpoint,
    run_tokenizer,
    trimmed_vocab,
)
from launcher.config.coerce import model_config
from launcher.config.schema import ModelConfig
from launcher.errors import ConfigError
from launcher.formats.hf_config import hf_model_values, read_hf_config
from launcher.formats.tokenizer import load_tokenizer
from launcher.hf.weights import check_hf_weights, load_hf_weights
from launcher.model.llama import LlamaModel, layer_specs
from parallel.tensor_parallel import NO_TP


@dataclass
class Loaded:
    model: "torch.nn.Module"  # launcher/model/llama.py LlamaModel, tp 1
    config: ModelConfig
    vocab: int  # the rows that mean something (a padded vocabulary's extra rows are never sampled)
    encode: "callable"  # str -> list[int]
    decode: "callable"  # list[int] -> str
    eos: set[int]
    source: str


def _build(config: ModelConfig):

    return LlamaModel(layer_specs(config, NO_TP, seed=None)).eval()  # every weight is loaded next


def from_checkpoint(path: Path) -> Loaded:
    """A checkpoint of any layout: each full tensor gathered from its slices on disk."""

    ckpt, run = resolve_checkpoint(path)
    reader = CheckpointReader(ckpt)
    tok = run_tokenizer(run, reader.state)
    if tok is None:
        raise ConfigError("--checkpoint", f"{ckpt}: its run's tokenizer cannot be found (the run directory's "
                          "config.yaml names data.tokenizer); pass the run directory, not a copied checkpoint")
    model = _build(reader.model)
    with torch.no_grad():
        # each parameter once (a tied head's is the embedding's), in pipeline-item order, as the reader prefers
        for param in model.parameters():
            param.copy_(reader.tensor(param.logical_name))
    reader.close()
    return Loaded(model, reader.model, trimmed_vocab(reader.model, reader.state, tok),
                  encode=lambda text: [int(i) for i in tok.encode_batch([text])[0]], decode=tok.decode,
                  eos={tok.eod_id}, source=str(ckpt))


def from_hf(directory: Path) -> Loaded:
    """A Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)."""

    config = model_config(hf_model_values(directory, key="--hf"), "--hf")
    check_hf_weights(config, directory, key="--hf")
    tok = load_tokenizer(str(directory), key="--hf")
    model = _build(config)
    load_hf_weights(model, directory, tp_rank=0, tp_size=1, key="--hf")
    eos = _eos_ids(directory, read_hf_config(directory, "--hf")) or {tok.eod_id}

    def encode(text: str) -> list[int]:  # with the tokenizer's special tokens (BOS), as transformers does
        return list(tok.tokenizer.encode(text, add_special_tokens=True).ids)

    return Loaded(model, config, config.vocab, encode=encode, decode=tok.decode, eos=eos, source=str(directory))


def _eos_ids(directory: Path, config: dict) -> set[int]:
    """generation_config.json's eos_token_id (an id or a list), else config.json's."""
    try:
        eos = json.loads((directory / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        eos = None
    if eos is None:
        eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}

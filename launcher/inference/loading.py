"""A model for generation, unsharded on one device: from a checkpoint of any tensor, pipeline
and ZeRO layout (gathered by launcher/checkpoint/reader.py), or from a Hugging Face
directory; with the tokenizer the weights were trained with, or the one `--tokenizer` names
(byte, a tokenizer.json, a SentencePiece tokenizer.model, or a directory holding one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
from launcher.formats.tokenizer import SENTENCEPIECE_FILE, HFTokenizer, Tokenizer, load_tokenizer
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


def from_checkpoint(path: Path, tokenizer: Optional[str] = None) -> Loaded:
    """A checkpoint of any layout: each full tensor gathered from its slices on disk. The
    tokenizer is the run's (its config.yaml), else `tokenizer`, which also overrides it."""

    ckpt, run = resolve_checkpoint(path)
    reader = CheckpointReader(ckpt)
    tok = _given_tokenizer(tokenizer, reader.model.vocab) if tokenizer else run_tokenizer(run, reader.state)
    if tok is None:
        raise ConfigError("--checkpoint", f"{ckpt}: its run's tokenizer cannot be found (the run directory's "
                          "config.yaml names data.tokenizer); pass the run directory, or name the tokenizer with "
                          "--tokenizer byte|FILE|DIR")
    model = _build(reader.model)
    with torch.no_grad():
        # each parameter once (a tied head's is the embedding's), in pipeline-item order, as the reader prefers
        for param in model.parameters():
            param.copy_(reader.tensor(param.logical_name))
    reader.close()
    return Loaded(model, reader.model, trimmed_vocab(reader.model, reader.state, tok),
                  encode=lambda text: [int(i) for i in tok.encode_batch([text])[0]], decode=tok.decode,
                  eos={tok.eod_id}, source=str(ckpt))


def from_hf(directory: Path, tokenizer: Optional[str] = None) -> Loaded:
    """A Hugging Face Llama directory (config.json, *.safetensors, and tokenizer.json or a
    SentencePiece tokenizer.model, unless `tokenizer` names another)."""

    config = model_config(hf_model_values(directory, key="--hf"), "--hf")
    check_hf_weights(config, directory, key="--hf")
    if tokenizer:
        tok = _given_tokenizer(tokenizer, config.vocab)
    elif not any((directory / name).is_file() for name in ("tokenizer.json", SENTENCEPIECE_FILE)):
        raise ConfigError("--hf", f"{directory}: holds no tokenizer.json or {SENTENCEPIECE_FILE}; name the "
                          "tokenizer with --tokenizer byte|FILE|DIR")
    else:
        tok = load_tokenizer(str(directory), key="--hf")
    model = _build(config)
    load_hf_weights(model, directory, tp_rank=0, tp_size=1, key="--hf")
    eos = _eos_ids(directory, read_hf_config(directory, "--hf")) or {tok.eod_id}

    def encode(text: str) -> list[int]:  # with the tokenizer's special tokens (BOS), as transformers does
        if isinstance(tok, HFTokenizer):
            return list(tok.tokenizer.encode(text, add_special_tokens=True).ids)
        return [int(i) for i in tok.encode_batch([text])[0]]

    # every row, as transformers samples them
    return Loaded(model, config, config.vocab, encode=encode, decode=tok.decode, eos=eos, source=str(directory))


def _given_tokenizer(spec: str, model_vocab: int) -> Tokenizer:
    """--tokenizer's tokenizer, refused when it has more tokens than the model has rows."""
    tok = load_tokenizer(spec, key="--tokenizer")
    if tok.vocab_size > model_vocab:
        raise ConfigError("--tokenizer", f"{spec}: {tok.vocab_size} tokens, more than the model's {model_vocab} "
                          "vocabulary rows: not the tokenizer it was trained with")
    return tok


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

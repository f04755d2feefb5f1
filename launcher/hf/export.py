"""Writing a checkpoint of any layout as a Hugging Face `LlamaForCausalLM` directory
(config.json, safetensors shards with an index, the tokenizer): `export`. The checkpoint is
read one tensor at a time by launcher/checkpoint/reader.py; `python -m launcher.export` is
the command.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from launcher.checkpoint.reader import (
    CheckpointReader,
    run_tokenizer,
    trimmed_vocab,
)
from launcher.config.schema import ModelConfig
from launcher.ds.seams import deepspeed_state_classes
from launcher.errors import ConfigError
from launcher.files import shared_dir_mode, shared_file_mode
from launcher.formats.tokenizer import BYTE_EOD_TOKEN, SENTENCEPIECE_FILE, ByteTokenizer, byte_tokenizer_json
from launcher.model import weights as hf_names

HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------------------
# Writing the Hugging Face directory
# --------------------------------------------------------------------------------------


def hf_config(model: ModelConfig, vocab: int, dtype: torch.dtype, bos: Optional[int], eos: Optional[int],
              max_positions: Optional[int] = None) -> dict:
    """config.json; max_position_embeddings is `max_positions` (the context of the model a run
    started from), else model.seq_len."""
    name = HF_DTYPE_NAMES[dtype]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": model.hidden,
              "intermediate_size": model.ffn, "num_hidden_layers": model.layers,
              "num_attention_heads": model.heads, "num_key_value_heads": model.n_kv_heads,
              "head_dim": model.head_dim, "vocab_size": vocab, "max_position_embeddings": max_positions or model.seq_len,
              "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta,
              "rope_scaling": dataclasses.asdict(model.rope_scaling) if model.rope_scaling else None,
              "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
              "initializer_range": model.init_std, "pretraining_tp": 1, "use_cache": True,
              "tie_word_embeddings": model.tie_embeddings, "torch_dtype": name, "dtype": name,
              "bos_token_id": bos, "eos_token_id": eos}
    if model.moe is not None:  # Mixtral (check_exportable): every layer's experts of ffn moe.ffn
        for llama_only in ("mlp_bias", "pretraining_tp"):
            del config[llama_only]
        config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                       "intermediate_size": model.moe.ffn, "num_local_experts": model.moe.experts,
                       "num_experts_per_tok": model.moe.top_k, "router_aux_loss_coef": model.moe.aux_loss_coef,
                       "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None})
    return config


def check_exportable(ckpt: Path, model: ModelConfig) -> None:
    """An MoE model is written as Mixtral, which has no shared experts, no dense first layers
    and a softmax router; other MoE shapes map to no transformers architecture exactly."""
    moe = model.moe
    if moe is None:
        return
    why = ("shared experts (model.moe.shared_experts)" if moe.shared_experts else
           "dense first layers (model.moe.first_dense)" if moe.first_dense else
           "a sigmoid router (model.moe.router)" if moe.router != "softmax" else None)
    if why:
        raise ConfigError("--checkpoint", f"{ckpt}: an MoE model with {why}: Mixtral (MixtralForCausalLM) has none, "
                          "and no other transformers architecture maps exactly; launcher.generate reads the "
                          "checkpoint itself")


def plan_shards(entries: list[tuple[str, str, tuple[int, ...]]], itemsize: int,
                max_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most max_bytes each (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    return shards + [current] if current else shards


@dataclass
class Summary:
    params: int
    shards: int
    bytes: int
    seconds: float
    peak_rss: int  # bytes, this process's peak
    rss_growth: int  # bytes, peak minus the peak before reading the checkpoint
    vocab: int
    dtype: torch.dtype
    tokenizer: str  # what was done about the tokenizer, for the summary

    def line(self, ckpt: Path, out: Path) -> str:
        mb = 1 << 20
        return (f"export: {ckpt} -> {out}: {self.params:,} parameters (vocab {self.vocab}; {self.tokenizer}), "
                f"{self.shards} shard(s), "
                f"{self.bytes / mb:.1f} MiB {HF_DTYPE_NAMES[self.dtype]}, {self.seconds:.1f} s, peak RSS "
                f"{self.peak_rss / mb:.0f} MiB ({self.peak_rss / self.bytes:.2f}x the model), "
                f"+{self.rss_growth / mb:.0f} MiB while exporting ({self.rss_growth / self.bytes:.2f}x)")


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: Linux's VmHWM (ru_maxrss would include
    the parent's peak: Linux carries it across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB elsewhere on Linux-likes


def export(ckpt: Path, run: Optional[Path], out: Path, dtype: Optional[torch.dtype] = None,
           max_shard_bytes: int = 5_000_000_000) -> Summary:
    """Write the checkpoint `ckpt` as a Hugging Face directory `out`: into a temporary
    directory beside it, moved into place only when complete (an existing `out` is replaced
    then), so a failure leaves nothing behind."""
    out = Path(out)
    made = [parent for parent in out.parents if not parent.exists()]  # deepest first: removed on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as err:  # a file where a directory must be, no permission
        _remove_empty(made)
        raise ConfigError("--out", f"{out}: cannot be written: {err.strerror or err}") from None
    try:
        summary = _write(ckpt, run, partial, dtype, max_shard_bytes)
        os.chmod(partial, shared_dir_mode())  # mkdtemp makes 0700; the directory follows the umask
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
            _remove_empty(made)
    return summary


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not made, or not empty: someone else's now
            pass


def _write(ckpt: Path, run: Optional[Path], out: Path, dtype: Optional[torch.dtype],
           max_shard_bytes: int) -> Summary:

    deepspeed_state_classes()  # imports done before measuring what reading and writing cost
    start, rss_before = time.perf_counter(), _peak_rss()
    reader = CheckpointReader(ckpt)
    model = reader.model
    check_exportable(ckpt, model)
    dtype = dtype or reader.dtype
    tok = run_tokenizer(run, reader.state)
    vocab = trimmed_vocab(model, reader.state, tok)
    entries = [(ours, hf, hf_names.full_shape(model, ours, vocab)) for ours, hf in hf_names.weights(model)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(entries, itemsize, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for ours, hf, shape in shard:
            # a new tensor (never a view of a memory-mapped file, which would stay mapped)
            full = reader.tensor(ours, dtype, rows=vocab if ours in ("embed.weight", "head.weight") else None)
            if tuple(full.shape) != shape:
                raise ConfigError("--checkpoint", f"{ours}: shape {tuple(full.shape)} on disk, expected {shape}")
            tensors[hf] = full
            weight_map[hf] = name
            total += tensors[hf].numel()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, shared_file_mode())  # safetensors creates 0600; follow the umask as other files do
        del tensors
    reader.close()
    nbytes = total * itemsize
    if len(shards) > 1:
        index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    bos, eos = _special_ids(tok)
    source_context = (reader.state.fingerprint.get("weights_from") or {}).get("max_position_embeddings")
    config = hf_config(model, vocab, dtype, bos, eos, source_context if isinstance(source_context, int) else None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    note = write_tokenizer(tok, out)
    peak = _peak_rss()
    return Summary(params=total, shards=len(shards), bytes=nbytes, seconds=time.perf_counter() - start,
                   peak_rss=peak, rss_growth=peak - rss_before, vocab=vocab, dtype=dtype, tokenizer=note)


def write_tokenizer(tok, out: Path) -> str:
    """The run's tokenizer as files `transformers.AutoTokenizer` loads with the run's ids; what
    was written, for the summary. A tokenizer.json is copied (with its tokenizer_config.json);
    a SentencePiece model is copied and its conversion written as tokenizer.json; the byte
    tokenizer is written as the `tokenizers` model that gives the same ids (`"hello"` -> 104
    101 108 108 111), its end of document (byte 0) the eos token, matched in text as bytes
    like any other (split_special_tokens), so that every text gets the run's ids."""
    if tok is None:
        return "no tokenizer found (the run's config.yaml): vocabulary not trimmed, no tokenizer files"
    if isinstance(tok, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BYTE_EOD_TOKEN,
                  "split_special_tokens": True, "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return "byte tokenizer written as tokenizer.json"
    if tok.file.name == "tokenizer.json":
        shutil.copyfile(tok.file, out / "tokenizer.json")
    else:  # SentencePiece: the model and its conversion, so either kind of loader finds its file
        shutil.copyfile(tok.file, out / SENTENCEPIECE_FILE)
        tok.tokenizer.save(str(out / "tokenizer.json"))
    if (tok.file.parent / "tokenizer_config.json").is_file():
        shutil.copyfile(tok.file.parent / "tokenizer_config.json", out / "tokenizer_config.json")
    return f"tokenizer {tok.name} copied"


def _special_ids(tok) -> tuple[Optional[int], Optional[int]]:
    """(bos, eos) ids: eos is the run's end-of-document token; bos from tokenizer_config.json."""
    if tok is None:
        return None, None
    bos = None
    file = getattr(tok, "file", None)
    if file is not None:
        try:
            token = json.loads((file.parent / "tokenizer_config.json").read_text()).get("bos_token")
        except (OSError, ValueError, AttributeError):
            token = None
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            bos = tok.tokenizer.token_to_id(token)
    return bos, tok.eod_id

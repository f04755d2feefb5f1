"""Tiny Hugging Face Llama directories written by `transformers` itself (the import and
generate tests' inputs), and the small BPE tokenizer they carry."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# 2 layers, hidden 64, 4 query heads sharing 2 kv heads (GQA), ffn 172, vocab 300
SHAPE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
# every model key auto (read from config.json), for configs/default.yaml which sets them all
AUTO = [f"model.{k}=auto" for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len",
                                     "rope_theta", "norm_eps", "tie_embeddings")]


def hf_tokenizer(root: Path) -> Path:
    """A byte-level BPE tokenizer of 300 tokens (<s> = 0, </s> = 1), with a
    tokenizer_config.json beside it."""
    from bpe import train_bpe
    from tokenizers import Tokenizer

    words = ["alpha", "beta", "gamma", "delta", "pipeline", "tensor", "the", "of", "and", "model"]
    root.mkdir(parents=True, exist_ok=True)
    path = train_bpe([" ".join(words[(i * 7 + j) % 10] for j in range(20)) for i in range(50)], 300,
                     root / "tokenizer.json", special_tokens=("<s>", "</s>"))
    assert Tokenizer.from_file(str(path)).get_vocab_size() == 300
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return root / "tokenizer.json"


def save_tiny_llama(out: Path, tied: bool = False, seed: int = 0, **config) -> Path:
    """A randomly initialised LlamaForCausalLM saved by save_pretrained (safetensors), with
    the tokenizer; `config` overrides SHAPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1,
                      **{**SHAPE, **config})
    LlamaForCausalLM(cfg).save_pretrained(out)
    hf_tokenizer(out)
    return out


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

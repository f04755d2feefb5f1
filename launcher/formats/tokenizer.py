"""Tokenizers: the built-in byte tokenizer, or a Hugging Face `tokenizer.json` (offline).

    load_tokenizer("byte")                         UTF-8 bytes, vocabulary 256, end-of-document = 0 (NUL)
    load_tokenizer("path/tokenizer.json")          any `tokenizers` model (BPE, Unigram, WordPiece)
    load_tokenizer("path/to/model_dir")            the directory's tokenizer.json (+ tokenizer_config.json)

Both give `encode_batch(texts) -> list[np.ndarray]`, `decode(ids)`, `vocab_size`, `eod_id`
and `sha256`, a fingerprint of the tokenization itself: `prepare` writes it into a prepared
dataset's manifest and training refuses a dataset whose fingerprint differs from its own
tokenizer's.

End of document. The byte tokenizer uses byte 0 (NUL), which text does not contain in
practice. A Hugging Face tokenizer's comes from `tokenizer_config.json`'s `eos_token` when
the directory has one, else from the first of the usual end-of-text special tokens in the
vocabulary (`EOD_CANDIDATES`); `eod_token` overrides both.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from launcher.errors import ConfigError

BYTE = "byte"
# End-of-text tokens of the common tokenizer families, in order of preference: GPT-2/NeoX,
# Llama 3, Llama 2 / Mistral / T5, Gemma, BERT-style.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
VOCAB_MULTIPLE = 128  # Megatron's make-vocab-size-divisible-by default


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are the tokens: nothing to download or train."""

    vocab_size: int = 256
    eod_id: int = 0
    sha256: str = BYTE
    name: str = BYTE

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(t) for t in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from its JSON file; no network, no `transformers`."""

    def __init__(self, file: Path, tokenizer: Any, eod_id: int, eod_token: str):
        self.file, self.tokenizer = file, tokenizer
        self.name = str(file)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id, self.eod_token = eod_id, eod_token
        # The library's own canonical serialisation: the same model saved with other JSON
        # formatting (indentation, key order) has the same fingerprint.
        self.sha256 = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_file(spec: str, key: str = "data.tokenizer") -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(key, f"expected `byte`, a tokenizer.json or a directory holding one; not found: {path}")
    return path


@functools.lru_cache(maxsize=8)  # the config checks, the launch and the data loader each ask
def load_tokenizer(spec: str, eod_token: Optional[str] = None, key: str = "data.tokenizer") -> Tokenizer:
    """`spec` is `byte`, a tokenizer.json, or a directory holding one. One-line ConfigError
    (naming `key`) when it is missing, not a tokenizer, or has no end-of-document token."""
    if spec == BYTE:
        if eod_token is not None:
            raise ConfigError(key, "the byte tokenizer's end of document is byte 0; an eod token cannot be set")
        return ByteTokenizer()
    file = tokenizer_file(spec, key)
    try:
        # lazy: only a tokenizer.json needs the library, not `byte`
        from tokenizers import Tokenizer as HFCore
    except ImportError:  # pragma: no cover - a dependency of this package
        raise ConfigError(key, "the `tokenizers` package is not installed (pip install tokenizers)") from None
    try:
        core = HFCore.from_file(str(file))
    except Exception as err:  # the library raises plain Exception subclasses from Rust
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(key, f"{file}: not a Hugging Face tokenizer.json ({first})") from None
    token = eod_token or _configured_eos(file.parent) or next(
        (t for t in EOD_CANDIDATES if core.token_to_id(t) is not None), None)
    if token is None:
        raise ConfigError(key, f"{file}: no end-of-document token found (none of {', '.join(EOD_CANDIDATES)}, "
                          "no eos_token in tokenizer_config.json); name one with --eod-token")
    eod_id = core.token_to_id(token)
    if eod_id is None:
        raise ConfigError(key, f"{file}: the end-of-document token {token!r} is not in the vocabulary")
    return HFTokenizer(file, core, eod_id, token)


def _configured_eos(directory: Path) -> Optional[str]:
    """`eos_token` of a transformers `tokenizer_config.json` beside the tokenizer, if any."""
    path = directory / "tokenizer_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # an AddedToken: {"content": "</s>", ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def padded_vocab(vocab_size: int, tensor_parallel: int) -> int:
    """`model.vocab: auto`: the tokenizer's size rounded up to a multiple of 128 x tp, so the
    vocabulary-parallel shards are equal and each a multiple of 128 (Megatron's
    make-vocab-size-divisible-by; 128 keeps the output matmul on tensor-core tile sizes)."""
    multiple = VOCAB_MULTIPLE * tensor_parallel
    return -(-vocab_size // multiple) * multiple

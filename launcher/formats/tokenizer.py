"""Tokenizers: the built-in byte tokenizer, a Hugging Face `tokenizer.json`, or a
SentencePiece `tokenizer.model` (all offline).

    load_tokenizer("byte")                         UTF-8 bytes, vocabulary 256, end-of-document = 0 (NUL)
    load_tokenizer("path/tokenizer.json")          any `tokenizers` model (BPE, Unigram, WordPiece)
    load_tokenizer("path/tokenizer.model")         SentencePiece (BPE or Unigram), converted by `transformers`
    load_tokenizer("path/to/model_dir")            the directory's tokenizer.json, else its tokenizer.model
                                                   (+ tokenizer_config.json either way)

A SentencePiece model is converted into a `tokenizers` model by `transformers` (its
SentencePiece converters, the ones `AutoTokenizer` uses; they need the `sentencepiece`
package): the ids are SentencePiece's own. `byte_tokenizer_json` is the byte tokenizer as a
`tokenizers` model, which `export` writes so that `transformers` loads the same ids.

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


SENTENCEPIECE_FILE = "tokenizer.model"


def tokenizer_file(spec: str, key: str = "data.tokenizer") -> Path:
    """The tokenizer.json (else tokenizer.model) that `spec` names or its directory holds."""
    path = Path(spec)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", SENTENCEPIECE_FILE) if (path / name).is_file()]
        if not found:
            raise ConfigError(key, f"{path}: holds no tokenizer.json or {SENTENCEPIECE_FILE}; expected `byte`, a "
                              "tokenizer file, or a directory holding one")
        return found[0]
    if not path.is_file():
        raise ConfigError(key, f"expected `byte`, a tokenizer.json, a SentencePiece .model or a directory holding "
                          f"one; not found: {path}")
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
    core = _from_json(file, key) if file.suffix != ".model" else _from_sentencepiece(file, key)
    token = eod_token or _configured_eos(file.parent) or next(
        (t for t in EOD_CANDIDATES if core.token_to_id(t) is not None), None)
    if token is None:
        raise ConfigError(key, f"{file}: no end-of-document token found (none of {', '.join(EOD_CANDIDATES)}, "
                          "no eos_token in tokenizer_config.json); name one with --eod-token")
    eod_id = core.token_to_id(token)
    if eod_id is None:
        raise ConfigError(key, f"{file}: the end-of-document token {token!r} is not in the vocabulary")
    return HFTokenizer(file, core, eod_id, token)


def _from_json(file: Path, key: str):
    # lazy: only a tokenizer file needs the library, not `byte`
    from tokenizers import Tokenizer as HFCore

    try:
        return HFCore.from_file(str(file))
    except Exception as err:  # the library raises plain Exception subclasses from Rust
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(key, f"{file}: not a Hugging Face tokenizer.json ({first})") from None


def _from_sentencepiece(file: Path, key: str):
    """A SentencePiece model as a `tokenizers.Tokenizer`, converted as `AutoTokenizer` does it
    (transformers' SentencePiece converters: BPE and Unigram models, byte fallback, the
    normalizer and the special pieces). Its directory's tokenizer_config.json, if any, is read
    too; a file of another name is read through a temporary directory that names it
    tokenizer.model, which is the name `transformers` looks for."""
    import tempfile

    try:
        import sentencepiece  # noqa: F401  (the converters parse the model with it)
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as err:  # pragma: no cover - dependencies of this package
        raise ConfigError(key, f"{file}: reading a SentencePiece model needs {err.name} (pip install "
                          "'llm-launcher[hf]')") from None
    hf_logging.set_verbosity_error()  # its notes on legacy behaviour are about its slow tokenizers
    with tempfile.TemporaryDirectory() as scratch:
        directory = file.parent
        if file.name != SENTENCEPIECE_FILE:
            directory = Path(scratch)
            (directory / SENTENCEPIECE_FILE).symlink_to(file.absolute())
        try:
            converted = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as err:  # protobuf's DecodeError, the converters' ValueError, ...: a bad file
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(key, f"{file}: not a SentencePiece model that can be converted ({first})") from None
    core = getattr(converted, "backend_tokenizer", None)
    if core is None:
        raise ConfigError(key, f"{file}: transformers read it only as a slow (Python) tokenizer; convert it to a "
                          "tokenizer.json first")
    return core


def byte_tokenizer_json() -> str:
    """The byte tokenizer as a `tokenizers` model (the JSON of a tokenizer.json): ids are the
    UTF-8 bytes, as `ByteTokenizer` gives them. GPT-2's byte-level alphabet spells each byte as
    one printable character (byte b -> `ByteLevel.alphabet()`'s character for it), a BPE
    vocabulary of those 256 characters with no merges maps each to its byte value, and the
    byte-level decoder turns the ids back into bytes and then text. Byte 0 (NUL), the end of
    document, is `BYTE_EOD_TOKEN` in that alphabet."""
    from tokenizers import Tokenizer as HFCore
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_level_alphabet())}
    core = HFCore(models.BPE(vocab=vocab, merges=[]))
    # no regex split: every byte is its own token, spaces included, whatever the text
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return core.to_str()


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable spelling of bytes 0..255 (its `bytes_to_unicode`): printable Latin-1
    bytes stand for themselves, the others map to U+0100 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelled[byte] = chr(byte)
        else:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return [spelled[byte] for byte in range(256)]


BYTE_EOD_TOKEN = chr(256)  # byte 0 in that alphabet


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

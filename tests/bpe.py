"""A small byte-level BPE tokenizer trained in the test (the `tokenizers` trainer): what the
data, prepare and export tests tokenize with, nothing downloaded."""

from __future__ import annotations

from pathlib import Path


def train_bpe(texts: list[str], vocab_size: int, path: Path, special_tokens=("<|endoftext|>",)) -> Path:
    """Train on `texts`, save as a tokenizer.json at `path`; returns `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(path))
    return Path(path)

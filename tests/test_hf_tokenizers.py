"""Tokenizers across the Hugging Face boundary: a SentencePiece `tokenizer.model` reads with
SentencePiece's own ids (BPE with byte fallback, Unigram), as a file, a directory, or what a
`--hf` directory ships; the byte tokenizer written for an export loads in `transformers` with
the launcher's byte ids; `generate --tokenizer` gives a directory without a tokenizer one."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import transformers
from hf_llama import save_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from launch import WORKDIR, base_env

from launcher.formats.tokenizer import ByteTokenizer, load_tokenizer
from launcher.hf.export import write_tokenizer

# The standard library's own documentation text (pydoc_data, PSF licence), as the embedded corpus.
from pydoc_data.topics import topics  # noqa: E402

TEXTS = st.text(st.characters(codec="utf-8"), max_size=60)
PROMPT = "alpha beta gamma delta"


def train_sentencepiece(out: Path, corpus: str, **options) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "corpus.txt").write_text(corpus, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(out.parent / "corpus.txt"), model_prefix=str(out.with_suffix("")),
                                             bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
                                             **options)
    return out.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory) -> dict[str, Path]:
    corpus = "\n".join(topics.values())[:200_000]
    root = tmp_path_factory.mktemp("spm")
    return {"bpe_byte_fallback": train_sentencepiece(root / "bpe" / "m.model", corpus, vocab_size=512, model_type="bpe",
                                                     byte_fallback=True),
            "unigram": train_sentencepiece(root / "unigram" / "m.model", corpus, vocab_size=400, model_type="unigram")}


@pytest.mark.parametrize("kind", ["bpe_byte_fallback", "unigram"])
def test_a_sentencepiece_model_reads_with_its_own_ids(spm_models, kind, tmp_path):
    model = spm_models[kind]
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
    (tmp_path / "tokenizer.model").write_bytes(model.read_bytes())
    by_file, by_dir = load_tokenizer(str(model)), load_tokenizer(str(tmp_path))
    assert by_file.sha256 == by_dir.sha256 and by_file.vocab_size == reference.vocab_size()
    assert by_file.eod_id == reference.eos_id() == 2  # </s>

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(text=TEXTS)
    def same_ids(text):
        ids = [int(i) for i in by_file.encode_batch([text])[0]]
        assert ids == reference.encode(text), text
        if reference.unk_id() not in ids:  # an unknown piece decodes as "<unk>" here, " \u2047 " in SentencePiece
            assert by_file.decode(ids) == reference.decode(ids)

    same_ids()
    assert [int(i) for i in by_dir.encode_batch(["the for statement"])[0]] == reference.encode("the for statement")


def test_damaged_or_missing_tokenizer_files_are_one_line(tmp_path):
    from launcher.errors import ConfigError

    (tmp_path / "tokenizer.model").write_bytes(b"\x08\x01not a protobuf of a model")
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*tokenizer.model: not a SentencePiece model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="holds no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))


def test_the_byte_tokenizer_written_for_an_export_loads_in_transformers_with_byte_ids(tmp_path):
    write_tokenizer(ByteTokenizer(), tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours_read_back = load_tokenizer(str(tmp_path))
    assert theirs("hello").input_ids == [104, 101, 108, 108, 111]
    assert theirs.eos_token_id == 0 == ours_read_back.eod_id

    @settings(max_examples=300, deadline=None)
    @given(text=TEXTS)
    def same_ids(text):
        ids = list(text.encode("utf-8"))
        assert theirs(text).input_ids == ids
        assert [int(i) for i in ours_read_back.encode_batch([text])[0]] == ids
        assert theirs.decode(ids) == text == ours_read_back.decode(ids)

    same_ids()


def generate(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launcher.generate", "--prompt", PROMPT, "--max-new-tokens", "8",
                             *args], cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == rc, result.stderr[-3000:]
    return result


def test_generate_hf_without_tokenizer_json(tmp_path):
    """A Llama directory whose tokenizer.json is gone: one line naming --tokenizer; with
    --tokenizer naming the file it continues as the complete directory does. The directory
    with a SentencePiece tokenizer.model instead reads it, with the ids (BOS included)
    `transformers.AutoTokenizer` gives."""
    whole = save_tiny_llama(tmp_path / "whole", seed=5)
    bare = tmp_path / "bare"
    shutil.copytree(whole, bare)
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    refused = generate("--hf", str(bare), rc=2)
    assert refused.stderr.count("\n") == 1 and "--tokenizer byte|FILE|DIR" in refused.stderr, refused.stderr
    expected = json.loads(generate("--hf", str(whole), "--json").stdout)
    given_file = json.loads(generate("--hf", str(bare), "--tokenizer", str(whole / "tokenizer.json"), "--json").stdout)
    # the complete directory's tokenizer_config.json adds nothing to encoding: the ids are the file's
    assert given_file == expected
    too_big = generate("--hf", str(bare), "--tokenizer", str(train_sentencepiece(
        tmp_path / "big" / "m.model", "\n".join(topics.values())[:100_000], vocab_size=400, model_type="unigram")), rc=2)
    assert "--tokenizer: " in too_big.stderr and "more than the model's 300 vocabulary rows" in too_big.stderr

    words = " ".join(PROMPT.split() * 3) + " pipeline tensor model of the and"
    small = train_sentencepiece(tmp_path / "small" / "m.model", "\n".join([words] * 200), vocab_size=60,
                                model_type="unigram", hard_vocab_limit=False)
    shutil.copyfile(small, bare / "tokenizer.model")
    with_spm = json.loads(generate("--hf", str(bare), "--json").stdout)
    assert with_spm["prompt_ids"] == transformers.AutoTokenizer.from_pretrained(bare)(PROMPT).input_ids
    assert len(with_spm["generated_ids"]) > 0

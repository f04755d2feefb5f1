"""The data path: prepared shards read by memory map, the seeded permutation, blending,
layout-independent global batches, resumable positions, document boundaries, bad input."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.config.load import config_from_dict
from launcher.config.schema import DataConfig, DataSource
from launcher.data.batches import open_run_data, training_batches
from launcher.data.prepare import PrepareOptions, prepare
from launcher.data.sampling import (
    BLEND_BLOCK,
    Blend,
    SampleSource,
    feistel_permutation,
    permutation_key,
)
from launcher.data.sources import EMBEDDED_CORPUS
from launcher.errors import ConfigError
from launcher.training.preflight import check_data

SEQ = 16


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def docs(n: int, seed: int, prefix: str) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return [f"{prefix}{i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for i in range(n)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two prepared byte-token datasets: `a` (many documents) and `b` (fewer, other text)."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for name, n, seed in (("a", 300, 1), ("b", 120, 2)):
        src = write_jsonl(root / f"{name}.jsonl", docs(n, seed, name.upper()))
        out[name] = root / name
        prepare([str(src)], "byte", out[name], PrepareOptions(workers=1, progress=False))
    return out


def run_data(data: DataConfig, cache: Path, dp=1, dp_rank=0, micro_batch=2, global_batch=8, seq=SEQ):
    return open_run_data(data, seq, 7, cache, global_batch=global_batch, micro_batch=micro_batch, dp=dp,
                         dp_rank=dp_rank)


def sample_rows(batches) -> list[tuple]:
    rows = []
    for inputs, targets in batches:
        ids = inputs[0] if isinstance(inputs, tuple) else inputs
        rows += [tuple(r.tolist()) for r in ids]
    return rows


# ---- the permutation ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_feistel_is_a_permutation_of_any_size(n, seed):
    perm = feistel_permutation(np.arange(n), n, permutation_key(seed))
    assert np.array_equal(np.sort(perm), np.arange(n))


def test_feistel_keys_differ_and_large_domains_need_no_memory():
    a = feistel_permutation(np.arange(1000), 1000, permutation_key(1, 0))
    b = feistel_permutation(np.arange(1000), 1000, permutation_key(1, 1))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    # A 10^12-sample epoch: a few lookups, nothing of its size built.
    far = feistel_permutation(np.array([0, 10**12 - 1]), 10**12, permutation_key(3))
    assert far.min() >= 0 and far.max() < 10**12 and far[0] != far[1]


# ---- blending -----------------------------------------------------------------------------


def test_blend_gives_three_to_one_and_contiguous_positions():
    blend = Blend([3.0, 1.0], seed=5, salt="train")
    sources, positions = blend.locate(0, 3 * BLEND_BLOCK + 1234)
    share = np.bincount(sources) / len(sources)
    assert abs(share[0] / share[1] - 3.0) < 0.06  # within 2% of 3:1
    for s in (0, 1):  # each source read in order, nothing skipped or repeated
        assert np.array_equal(positions[sources == s], np.arange((sources == s).sum()))
    part_s, part_p = blend.locate(70_000, 500)  # any chunk equals the same slice of the whole
    assert np.array_equal(part_s, sources[70_000:70_500]) and np.array_equal(part_p, positions[70_000:70_500])
    assert np.array_equal(blend.consumed(100_000), np.bincount(sources[:100_000]))
    # Over one training-sized window (200 steps of 8) the shares are already close.
    assert abs(np.mean(sources[:1600] == 0) - 0.75) < 0.02


def test_blended_training_stream_3_to_1(datasets, tmp_path):
    data = DataConfig(sources=[DataSource(str(datasets["a"]), 3.0), DataSource(str(datasets["b"]), 1.0)])
    run = run_data(data, tmp_path, global_batch=64, micro_batch=64)
    for _ in range(40):
        run.train.next_step()
    state = run.train.state_dict()
    counts = [state["sources"][ds.key]["consumed"] for ds in run.datasets]
    assert sum(counts) == 40 * 64 and abs(counts[0] / counts[1] / 3 - 1) < 0.02


def test_changing_weights_on_resume_neither_repeats_nor_skips(datasets, tmp_path):
    a, b = str(datasets["a"]), str(datasets["b"])
    first = run_data(DataConfig(sources=[DataSource(a, 3.0), DataSource(b, 1.0)]), tmp_path, global_batch=8, micro_batch=8)
    for _ in range(5):
        first.train.next_step()
    state = json.loads(json.dumps(first.train.state_dict()))  # as a checkpoint stores it
    second = run_data(DataConfig(sources=[DataSource(a, 1.0), DataSource(b, 1.0)]), tmp_path, global_batch=8,
                      micro_batch=8)
    note = second.train.load_state_dict(state)
    assert note and "continues from the samples it had given" in note
    before = [first.train.source.blend.locate(0, 40)]
    after = [second.train.source.blend.locate(40, 400)]
    for s in (0, 1):  # per source: positions 0..k-1 before the change, k.. after, no gap, no repeat
        seen = np.concatenate([p[src == s] for src, p in before + after])
        assert np.array_equal(seen, np.arange(len(seen)))
    assert abs(np.mean(after[0][0] == 0) - 0.5) < 0.1  # the new weights apply
    again = run_data(DataConfig(sources=[DataSource(a, 3.0), DataSource(b, 1.0)]), tmp_path, global_batch=8,
                     micro_batch=8)
    assert again.train.load_state_dict(state) is None  # same weights: the very same stream goes on
    assert sample_rows(again.train.next_step()) == sample_rows(first.train.next_step())


# ---- batches --------------------------------------------------------------------------------


def step_samples(data, cache, dp, micro_batch, steps=3, global_batch=12):
    seen = []
    per_rank = [run_data(data, cache, dp=dp, dp_rank=r, micro_batch=micro_batch, global_batch=global_batch).train
                for r in range(dp)]
    for _ in range(steps):
        seen.append(sorted(row for batches in per_rank for row in sample_rows(batches.next_step())))
    return seen


@pytest.mark.parametrize("dp,micro_batch", [(2, 1), (2, 3), (3, 2), (12, 1)])
def test_samples_of_a_step_do_not_depend_on_the_layout(datasets, tmp_path, dp, micro_batch):
    data = DataConfig(sources=[DataSource(str(datasets["a"]), 2.0), DataSource(str(datasets["b"]), 1.0)])
    reference = step_samples(data, tmp_path, dp=1, micro_batch=12)
    assert step_samples(data, tmp_path, dp, micro_batch) == reference
    # no sample twice within a step: distinct (source, window) pairs (not distinct contents:
    # two 17-byte windows of this 8-word text may read the same)
    source = run_data(data, tmp_path).train.source
    for step in range(len(reference)):
        sources, positions = source.blend.locate(step * 12, 12)
        picked = {(s, int(w)) for s in (0, 1) for w in source.window_ids(s, positions[sources == s])}
        assert len(picked) == 12


def test_resume_from_a_state_continues_the_stream(datasets, tmp_path):
    data = DataConfig(path=str(datasets["a"]))
    straight = run_data(data, tmp_path).train
    for _ in range(3):
        straight.next_step()
    resumed = run_data(data, tmp_path).train
    resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
    assert sample_rows(resumed.next_step()) == sample_rows(straight.next_step())
    older = run_data(data, tmp_path).train  # a checkpoint that kept only the position
    older.load_state_dict({"consumed_samples": straight.consumed_samples})
    assert sample_rows(older.next_step()) == sample_rows(straight.next_step())


def test_a_moved_dataset_continues_the_same_stream(datasets, tmp_path):
    """Sources are named by their manifest's id, not their path: a prepared directory copied
    elsewhere (or one prepared before manifests carried an id) gives the very same samples,
    and a checkpoint's position taken at the old place continues there."""
    a, b = datasets["a"], datasets["b"]
    moved = tmp_path / "elsewhere" / "a"
    shutil.copytree(a, moved)
    unnamed = tmp_path / "older" / "a"  # as prepared before the id: the same digest, computed
    shutil.copytree(a, unnamed)
    manifest = json.loads((unnamed / "manifest.json").read_text())
    del manifest["id"]
    (unnamed / "manifest.json").write_text(json.dumps(manifest))

    def blend(path) -> DataConfig:
        return DataConfig(sources=[DataSource(str(path), 3.0), DataSource(str(b), 1.0)])

    here = run_data(blend(a), tmp_path).train
    steps = [sample_rows(here.next_step()) for _ in range(3)]
    for where in (moved, unnamed):
        there = run_data(blend(where), tmp_path).train
        assert [sample_rows(there.next_step()) for _ in range(3)] == steps, where
    state = json.loads(json.dumps(here.state_dict()))
    resumed = run_data(blend(moved), tmp_path).train
    assert resumed.load_state_dict(state) is None  # the same sources: no notice
    assert sample_rows(resumed.next_step()) == sample_rows(here.next_step())
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].path: .* is the same dataset as "):
        run_data(DataConfig(sources=[DataSource(str(a), 1.0), DataSource(str(moved), 1.0)]), tmp_path)


def test_a_checkpoint_that_named_sources_by_path_continues_exactly(datasets, tmp_path):
    """Before manifest ids, a position named each source by its configured path, and that path
    keyed its permutation: matched by path, the same stream goes on."""
    paths = [str(datasets["a"]), str(datasets["b"])]
    data = DataConfig(sources=[DataSource(paths[0], 3.0), DataSource(paths[1], 1.0)])
    old = run_data(data, tmp_path).train
    source = old.source
    old.source = SampleSource(source.streams, paths, [3.0, 1.0], SEQ, 7, "train")  # keyed by path, as then
    for _ in range(3):
        old.next_step()
    state = json.loads(json.dumps(old.state_dict()))
    for entry in state["sources"].values():  # what such a checkpoint holds
        del entry["path"], entry["order"]
    resumed = run_data(data, tmp_path).train
    assert resumed.load_state_dict(state) is None
    assert [sample_rows(resumed.next_step()) for _ in range(2)] == [sample_rows(old.next_step()) for _ in range(2)]
    again = json.loads(json.dumps(resumed.state_dict()))  # and its next checkpoint keeps that order
    assert list(again["sources"]) == [ds.key for ds in run_data(data, tmp_path).datasets]
    assert [v["order"] for v in again["sources"].values()] == paths


def test_every_window_once_per_epoch_and_epochs_reshuffled(datasets, tmp_path):
    source = run_data(DataConfig(path=str(datasets["b"])), tmp_path).train.source
    n = source.windows[0]
    ids = source.window_ids(0, np.arange(2 * n))
    assert np.array_equal(np.sort(ids[:n]), np.arange(n)) and np.array_equal(np.sort(ids[n:]), np.arange(n))
    assert not np.array_equal(ids[:n], ids[n:])  # each epoch in another order
    tokens, _ = source.rows(n + 5, 1)  # and the rows are those windows
    assert np.array_equal(tokens[0], source.streams[0].read(int(ids[n + 5]) * SEQ, SEQ + 1)[0])


def test_train_and_validation_hold_different_documents(datasets, tmp_path):
    run = run_data(DataConfig(path=str(datasets["a"]), val_fraction=0.1), tmp_path)
    ds = run.datasets[0]
    total = ds.manifest["tokens"]
    assert len(ds.train) + len(ds.val) == total and 0.07 < len(ds.val) / total < 0.13
    cut = ds.train.pieces[-1][2]
    assert cut in set(np.asarray(ds.train.pieces[0][0].bounds).tolist())  # at a document boundary
    val_text = bytes(ds.val.read(0, len(ds.val))[0].astype(np.uint8)).decode()
    train_text = bytes(ds.train.read(0, len(ds.train))[0].astype(np.uint8)).decode()
    val_docs = [d for d in val_text.split("\0") if d]
    assert val_docs and not any(d in train_text for d in val_docs)
    assert val_docs[-1].startswith("A299")  # the held-out tail


def test_document_segments_and_loss_mask_come_from_the_index(tmp_path):
    """A document that contains the end-of-document byte itself is still one document: the
    boundaries come from the prepared index, never from scanning for the token."""
    src = write_jsonl(tmp_path / "d.jsonl", ["abc", "de\0fgh", "ijklmnopqrstuvwxyz0123456789"])
    prepare([str(src)], "byte", tmp_path / "p", PrepareOptions(workers=1, progress=False))
    data = DataConfig(path=str(tmp_path / "p"), val_path=str(tmp_path / "p"), document_attention=True,
                      eod_mask_loss=True)
    run = run_data(data, tmp_path, seq=12, micro_batch=1, global_batch=1)
    stream = run.datasets[0].train
    tokens, starts = stream.read(0, 13)
    assert bytes(tokens.astype(np.uint8)) == b"abc\0de\0fgh\0ij"
    assert np.flatnonzero(starts).tolist() == [0, 4, 11]  # not at the NUL inside "de\0fgh"
    from launcher.data.batches import to_batch
    (ids, segments), (targets, mask) = to_batch(tokens[None], starts[None], True, True)
    assert segments[0].tolist() == [0] * 4 + [1] * 7 + [2]
    assert mask[0].tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1]  # inputs that end a document
    assert torch.equal(ids[0, 1:], targets[0, :-1])


def test_the_embedded_default_needs_no_set_up(tmp_path):
    cfg = config_from_dict({"model": {"seq_len": 64}})
    batches = training_batches(cfg, tmp_path, global_batch=4, micro_batch=2)
    (inputs, targets), _ = batches.next_step()
    assert inputs.shape == (2, 64) and inputs.max() < 256
    prepared = next(tmp_path.glob("embedded-*"))
    manifest = json.loads((prepared / "manifest.json").read_text())
    with gzip.open(EMBEDDED_CORPUS, "rt") as f:
        topics = [json.loads(line)["text"] for line in f]
    assert manifest["documents"] == len(topics) == 79
    assert manifest["tokens"] == sum(len(t.encode()) + 1 for t in topics)
    check_data(cfg)  # the launch's check agrees with what was prepared


# ---- bad input --------------------------------------------------------------------------------


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        cfg = config_from_dict(raw)
        check_data(cfg)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bad_data_configs_are_one_line_errors(datasets, tmp_path):
    a = str(datasets["a"])
    (tmp_path / "corpus.txt").write_text("hello")
    assert error_of({"data": {"path": str(tmp_path / "nope")}}).startswith("data.path: not found")
    assert "python -m launcher.prepare --input" in error_of({"data": {"path": str(tmp_path / "corpus.txt")}})
    assert "no manifest.json" in error_of({"data": {"path": str(tmp_path)}})
    assert error_of({"data": {"path": a, "sources": [{"path": a}]}}).startswith("data.path: set either")
    assert error_of({"data": {"sources": [{"path": a}, {"path": a}]}}).startswith("data.sources[1].path")
    assert error_of({"data": {"sources": [{"path": a, "weight": 0}]}}).startswith("data.sources[0].weight")
    assert error_of({"data": {"sources": [{"path": a}, {"path": str(tmp_path / "x")}]}}).startswith(
        "data.sources[1].path: not found")
    assert error_of({"data": {"tokenizer": str(tmp_path / "none.json")}}).startswith("data.tokenizer")
    assert error_of({"data": {"path": a}, "model": {"seq_len": 100_000}}).startswith(
        f"data.path: the training part of {a} has")
    assert error_of({"data": {"path": a}, "model": {"seq_len": 4096}}).startswith(
        f"data.val_fraction: the held-out part of {a} (0.05 of its tokens) has")


def test_auto_vocab_and_tokenizer_checks(tmp_path, datasets):
    from bpe import train_bpe
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(train_bpe(docs(200, 3, "T"), 300, tmp_path / "tokenizer.json"))).get_vocab_size()
    spec = str(tmp_path / "tokenizer.json")
    cfg = config_from_dict({"data": {"tokenizer": spec}, "model": {"vocab": "auto"}, "parallel": {"tensor": 2}})
    assert cfg.model.vocab == 512 and size <= 512  # padded to a multiple of 128 x tp
    assert config_from_dict({"data": {"tokenizer": str(tmp_path)}, "model": {"vocab": "auto"}}).model.vocab == 384
    assert error_of({"data": {"tokenizer": spec}, "model": {"vocab": 256}}).startswith(
        f"model.vocab: 256 does not cover the {size} tokens")
    # A dataset prepared with the byte tokenizer, trained with this one: refused, named.
    message = error_of({"data": {"tokenizer": spec, "path": str(datasets["a"])}, "model": {"vocab": "auto"}})
    assert message.startswith("data.path: ") and "was prepared with tokenizer byte" in message

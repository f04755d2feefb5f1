"""The data path: byte tokens, deterministic sampler, layout-independent global batches."""

import numpy as np
import pytest
import torch

from launcher.config import DataConfig
from launcher.data import GlobalBatches, SampleStream, byte_detokenize, byte_tokenize, load_tokens, make_batch


def test_byte_tokenizer_round_trip():
    text = "naïve café — λ"
    tokens = byte_tokenize(text.encode())
    assert tokens.max() < 256 and byte_detokenize(tokens) == text


def test_embedded_corpus_loads_into_a_memmap(tmp_path):
    splits = load_tokens(DataConfig(), tmp_path)
    assert isinstance(splits.train, np.memmap)
    assert len(splits.train) > 400_000 and 0.04 < len(splits.val) / (len(splits.train) + len(splits.val)) < 0.06
    assert b"assert" in bytes(splits.train[:200])
    again = load_tokens(DataConfig(), tmp_path)  # cached: same file, same tokens
    assert np.array_equal(np.asarray(again.train[:1000]), np.asarray(splits.train[:1000]))
    assert len(list(tmp_path.glob("tokens-*.bin"))) == 1


def test_no_window_twice_in_an_epoch_and_epochs_differ():
    stream = SampleStream(n_windows=97, seed=3)
    epoch0, epoch1 = stream.window_ids(0, 97), stream.window_ids(97, 97)
    assert sorted(epoch0) == list(range(97)) and sorted(epoch1) == list(range(97))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(stream.window_ids(90, 20), np.concatenate([epoch0[90:], epoch1[:13]]))


def _step_samples(dp, micro_batch, global_batch=12, steps=3, start=0):
    tokens = np.arange(5000, dtype=np.int64) % 251
    seen = []
    for step in range(steps):
        per_step = []
        for rank in range(dp):
            batches = GlobalBatches(tokens, 16, global_batch=global_batch, micro_batch=micro_batch, dp=dp,
                                    dp_rank=rank, seed=7, consumed_samples=start + step * global_batch)
            for inputs, targets in batches.next_step():
                assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
                per_step += [tuple(row.tolist()) for row in inputs]
        seen.append(sorted(per_step))
    return seen


@pytest.mark.parametrize("dp,micro_batch", [(2, 1), (2, 3), (3, 2), (4, 3), (12, 1)])
def test_samples_of_a_step_do_not_depend_on_the_layout(dp, micro_batch):
    reference = _step_samples(dp=1, micro_batch=12)
    assert _step_samples(dp, micro_batch) == reference
    for step in reference:  # no sample twice within a step
        assert len(set(step)) == len(step)


def test_resume_from_position_continues_the_stream():
    tokens = np.arange(5000, dtype=np.int64) % 251
    args = dict(global_batch=8, micro_batch=2, dp=2, dp_rank=1, seed=7)
    straight = GlobalBatches(tokens, 16, **args)
    for _ in range(3):
        straight.next_step()
    resumed = GlobalBatches(tokens, 16, **args)
    resumed.load_state_dict(straight.state_dict())
    for a, b in zip(straight.next_step(), resumed.next_step()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_make_batch_shapes():
    tokens = np.arange(100, dtype=np.uint8)
    inputs, targets = make_batch(tokens, np.array([0, 2]), 10)
    assert inputs.shape == targets.shape == (2, 10) and inputs.dtype == torch.int64
    assert inputs[1, 0].item() == 20 and targets[1, -1].item() == 30

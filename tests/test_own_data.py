"""Training on your own text, end to end through the real commands: a BPE tokenizer (trained
here with the `tokenizers` trainer), `python -m launcher.prepare` into two datasets, then
`launcher.train` on a 3:1 blend of them with document attention and the end-of-document
loss mask: tp 2 x pp 2 x dp 2 computes what one process computes, the loss falls, and a
resume continues the exact stream."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from launch import (
    SHORT,
    base_env,
    losses,
    python_cmd,
    read_events,
    torchrun_cmd,
    train,
)
from launch import WORKDIR  # noqa: E402

WORDS = ["the", "model", "reads", "tokens", "from", "shards", "and", "learns", "which", "word", "comes", "next",
         "pipeline", "tensor", "data", "parallel", "stage", "rank", "loss", "step"]


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from bpe import train_bpe

    root = tmp_path_factory.mktemp("own_data")
    train_bpe(documents(300, 0), 400, root / "tokenizer.json")
    (root / "web.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(400, 1)))
    with gzip.open(root / "books.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in documents(60, 2)))
    (root / "preface.txt").write_text("\n".join(documents(3, 3)))  # a .txt file is one document
    for name, inputs in (("web", [root / "web.jsonl"]), ("books", [root / "books.jsonl.gz", root / "preface.txt"])):
        result = subprocess.run([sys.executable, "-m", "launcher.prepare", "--input", *map(str, inputs),
                                 "--tokenizer", str(root / "tokenizer.json"), "--out", str(root / name),
                                 "--workers", "2"], cwd=WORKDIR, env=base_env(), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    return root


def own_data(root) -> list[str]:
    sources = f"[{{path: {root / 'web'}, weight: 3}}, {{path: {root / 'books'}, weight: 1}}]"
    return [f"data.tokenizer={root / 'tokenizer.json'}", f"data.sources={sources}", "model.vocab=512",
            "model.seq_len=64", "data.document_attention=true", "data.eod_mask_loss=true",
            "parallel.global_batch=8", "train.eval_every=5", "train.eval_batches=1"]


def test_3d_layout_trains_on_prepared_blend_like_one_process_and_resumes(prepared, tmp_path):
    args = [*SHORT, *own_data(prepared)]
    args[args.index("train.eval_every=0")] = "checkpoint.every=3"  # SHORT's eval_every=0 is overridden above
    single = train(python_cmd(), tmp_path / "single", *args, "parallel.tensor=1", "parallel.pipeline=1",
                   "zero.stage=0")
    assert single[0]["loss"] == pytest.approx(np.log(512), abs=0.1)  # a fresh model: about uniform over model.vocab
    assert single[-1]["loss"] < single[0]["loss"] - 0.5
    assert single[-1]["val_loss"] < single[0]["loss"]
    shares = single[-1]["data_shares"]  # requested 3:1, realised over 40 samples
    assert shares[str(prepared / "web")] == pytest.approx(0.75, abs=0.1)

    # tp 2 x pp 2 x dp 2: the same samples per step, the same document masks, the same losses.
    three_d = train(torchrun_cmd(8), tmp_path / "3d", *args)
    assert three_d[0]["world_size"] == 8
    for a, b in zip(losses(three_d), losses(single), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert three_d[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-4)

    # Resume from step 3 in a fresh run directory: steps 4-5 repeat bit for bit.
    step3 = tmp_path / "single" / "checkpoints" / "step-00000003"
    resumed = train(python_cmd(), tmp_path / "resumed", *args, "parallel.tensor=1", "parallel.pipeline=1",
                    "zero.stage=0", f"checkpoint.resume={step3}")
    assert read_events(tmp_path / "resumed", "resume")[0]["step"] == 3
    assert [r["loss"] for r in resumed if r["step"] > 3] == losses(single)[3:]


@pytest.mark.parametrize("extra,expected", [
    (["model.vocab=256"], "config error: model.vocab: 256 does not cover the "),
    (["data.tokenizer=byte"], "was prepared with tokenizer "),
])
def test_tokenizer_mismatches_are_one_line_exit_2(prepared, tmp_path, extra, expected):
    args = [a for a in own_data(prepared) if not a.startswith("model.vocab")] + ["model.vocab=512"]
    result = subprocess.run([*python_cmd(), "--dry-run", "--world-size", "1", *args, *extra, "parallel.tensor=1",
                             "parallel.pipeline=1", f"run.dir={tmp_path}"], cwd=WORKDIR, env=base_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr

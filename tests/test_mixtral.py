"""Mixtral across the Hugging Face boundary: a `transformers`-made MixtralForCausalLM directory
is read (config.json -> model.moe, per-expert tensors -> our stacked experts) with logits equal
to transformers' within 1e-4, trains from it in a pipeline layout, and the checkpoint is
exported as a Mixtral directory that transformers loads with logits equal to ours."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from launch import WORKDIR, base_env, python_cmd, torchrun_cmd, train

from launcher.checkpoint.reader import CheckpointReader, resolve_checkpoint
from launcher.inference.loading import from_checkpoint, from_hf

transformers = pytest.importorskip("transformers")  # the `hf` extra; installed by .ci/run (dev)

SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
             rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A random Mixtral saved by transformers itself (per-expert tensors, as published)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mixtral")
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).save_pretrained(out)
    return out


def _hf_logits(directory, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_import_logits_equal_transformers(mixtral):
    loaded = from_hf(mixtral, tokenizer="byte")
    moe = loaded.config.moe
    assert (moe.experts, moe.top_k, moe.ffn, moe.shared_experts, moe.first_dense) == (4, 2, 16, 0, 0)
    with torch.no_grad():
        ours = loaded.model(_ids())
    assert (ours - _hf_logits(mixtral, _ids())).abs().max().item() <= 1e-4


def test_train_from_mixtral_export_and_generate(mixtral, tmp_path):
    """init_from in tp 2 x dp 2 with the experts over all 4 ranks (parallel.expert=4: the tp
    ranks and 2 data ranks), 2 steps, export: transformers' logits equal ours from the
    checkpoint; generate --hf reads the export."""
    run = tmp_path / "run"
    train(torchrun_cmd(4), run, f"model.init_from={mixtral}", "data.tokenizer=byte", "model.seq_len=32",
          "parallel.tensor=2", "parallel.pipeline=1", "parallel.expert=4", "parallel.global_batch=4",
          "precision.dtype=fp32", "train.steps=2", "schedule.warmup_steps=1", "train.eval_every=0",
          "train.log_every=1")
    out = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "launcher.export", "--checkpoint", str(run), "--out", str(out)],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    ours = from_checkpoint(run).model
    reader = CheckpointReader(resolve_checkpoint(run)[0])
    assert reader.model.moe is not None
    with torch.no_grad():
        expected = ours(_ids())
    assert (expected - _hf_logits(out, _ids())).abs().max().item() <= 1e-4
    assert (expected - _hf_logits(mixtral, _ids())).abs().max().item() > 1e-4  # it trained
    generate = subprocess.run([sys.executable, "-m", "launcher.generate", "--hf", str(out), "--prompt", "ab",
                               "--max-new-tokens", "4"], cwd=WORKDIR, env=base_env(), capture_output=True,
                              text=True, timeout=300)
    assert generate.returncode == 0, generate.stderr


def test_moe_shapes_mixtral_lacks_are_refused_on_export(tmp_path):
    run = tmp_path / "run"
    train(python_cmd(), run, "model.layers=2", "model.hidden=32", "model.heads=2", "model.ffn=32",
          "model.moe.experts=2", "model.moe.top_k=1", "model.moe.ffn=8", "model.moe.shared_experts=1",
          "parallel.tensor=1", "parallel.pipeline=1", "parallel.global_batch=2", "precision.dtype=fp32",
          "train.steps=1", "schedule.warmup_steps=0", "train.eval_every=0")
    result = subprocess.run([sys.executable, "-m", "launcher.export", "--checkpoint", str(run), "--out",
                             str(tmp_path / "hf")], cwd=WORKDIR, env=base_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "shared experts" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "hf").exists()

"""`python -m launcher.export`: real checkpoints of several layouts (written by the real
command line) exported to Hugging Face Llama directories, loaded by `transformers`, and
compared with our own single-process model on the same weights (CPU, fp32)."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from hf_llama import hf_tokenizer
from launch import base_env, torchrun_cmd, train

from launcher.checkpoint.ds_files import item_key
from launcher.checkpoint.reader import CheckpointReader, resolve_checkpoint
from launcher.config.schema import ModelConfig
from launcher.model import weights as hf_names
from launcher.model.llama import LlamaModel, layer_specs
from parallel.tensor_parallel import NO_TP, TensorParallel
from launch import WORKDIR  # noqa: E402

SEED, LR = 1234, 3e-3
# hidden 64, 4 query heads sharing 2 kv heads (GQA), ffn 172, 2 layers, seq 32
TINY = ["model.layers=2", "model.hidden=64", "model.heads=4", "model.kv_heads=2", "model.ffn=172",
        "model.seq_len=32", "parallel.micro_batch=1", "parallel.global_batch=2", "train.steps=1",
        "schedule.warmup_steps=1", "train.eval_every=0", "train.log_every=1", "checkpoint.every=1",
        f"train.seed={SEED}", f"optimizer.lr={LR}", "precision.dtype=fp32"]
LAYOUTS = {
    # name: (processes, overrides)
    "tp2_pp2_untied": (4, ["parallel.tensor=2", "parallel.pipeline=2", "zero.stage=1"]),
    # a Hugging Face tokenizer of 300 tokens, padded to 384 rows: the trim cuts inside tp rank 1
    "tp2_pp1_zero1_hf_tokenizer": (2, ["parallel.tensor=2", "parallel.pipeline=1", "zero.stage=1",
                                       "model.vocab=384", "data.tokenizer={tokenizer}"]),
    # ZeRO 3 partitions over dp 2 inside each tp rank; tied embeddings; a padded vocabulary
    # (320 rows for the 256 of the byte tokenizer)
    "tp2_dp2_zero3_tied_padded": (4, ["parallel.tensor=2", "parallel.pipeline=1", "zero.stage=3",
                                      "model.tie_embeddings=true", "model.vocab=320"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tokenizer = hf_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    out = {}
    for name, (nproc, overrides) in LAYOUTS.items():
        run_dir = tmp_path_factory.mktemp(name)
        train(torchrun_cmd(nproc), run_dir, *TINY, *[o.format(tokenizer=tokenizer) for o in overrides])
        out[name] = run_dir
    return out


def export_cli(*args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launcher.export", *args], cwd=WORKDIR, env=base_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == expect_rc, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def our_model(reader: CheckpointReader) -> tuple[LlamaModel, dict]:
    """Our single-process model holding the reader's full tensors, and those tensors."""
    cfg = reader.model
    model = LlamaModel(layer_specs(cfg, NO_TP, SEED))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    state = {}
    for ours, _ in hf_names.weights(cfg):
        index, key = item_key(cfg, ours)
        state[f"items.{index}.{key}"] = reader.tensor(ours)
    if cfg.tie_embeddings:  # LlamaModel lists the shared table under the head's item too
        state[f"items.{len(model.items) - 1}.embed.weight"] = state["items.0.embed.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval(), init


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_loads_in_transformers_with_equal_logits(runs, layout, tmp_path, capsys):
    """Export -> AutoModelForCausalLM: logits equal ours within 1e-4; the weights read back
    are the layout-independent initial ones moved by at most one Adam step (|update| <= lr),
    so a slice gathered in the wrong order or along the wrong dimension cannot pass."""
    run_dir = runs[layout]
    result = export_cli("--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("export: ") and "peak RSS" in summary
    reader = CheckpointReader(resolve_checkpoint(run_dir)[0])
    ours, init = our_model(reader)
    moved = max((v - init[k]).abs().max().item() for k, v in ours.state_dict().items())
    assert 0 < moved <= LR * 1.05, moved

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_tok = "hf_tokenizer" in layout
    vocab = 300 if hf_tok else 256  # the tokenizer's: a padded vocabulary is trimmed back to it
    assert config["vocab_size"] == vocab and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] == reader.model.tie_embeddings
    assert (config["bos_token_id"], config["eos_token_id"]) == ((0, 1) if hf_tok else (None, 0))
    # a byte-tokenizer run's export carries the byte tokenizer as a tokenizer.json (test_byte_export_round_trips)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, (2, reader.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)[..., :vocab]
        got = hf(ids).logits
    diff = (got - expected).abs().max().item()
    with capsys.disabled():
        print(f"\n{layout}: max |logit diff| {diff:.2e}; {summary}")
    assert diff <= 1e-4


def test_export_shards_and_dtype(runs, tmp_path):
    """Past --max-shard-gb: numbered files and an index naming every tensor once; --dtype bf16."""
    out = tmp_path / "hf"
    export_cli("--checkpoint", str(runs["tp2_pp2_untied"]), "--out", str(out), "--dtype", "bf16",
               "--max-shard-gb", "0.0001")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    from safetensors import safe_open

    cfg = CheckpointReader(resolve_checkpoint(runs["tp2_pp2_untied"])[0]).model
    assert sorted(index["weight_map"]) == sorted(hf for _, hf in hf_names.weights(cfg))
    total = 0
    for name in files:
        with safe_open(out / name, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.bfloat16
                total += tensor.numel() * 2
    assert total == index["metadata"]["total_size"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_not_a_checkpoint_is_one_line_exit_2(tmp_path):
    result = export_cli("--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf"), expect_rc=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: --checkpoint: "), result.stderr
    assert not (tmp_path / "hf").exists()


def test_name_map_round_trips_and_matches_the_tp_plan():
    """Every weight maps both ways; the table's tp dimension is the one the layers shard."""
    cfg = ModelConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn=172, vocab=256, seq_len=32)
    for ours, hf in hf_names.weights(cfg):
        assert hf_names.to_hf(ours) == hf and hf_names.from_hf(hf) == ours
    assert "lm_head.weight" not in [hf for _, hf in hf_names.weights(ModelConfig(tie_embeddings=True))]
    model = LlamaModel(layer_specs(cfg, TensorParallel(rank=0, size=2), SEED))
    params = dict(model.named_parameters())
    for ours, _ in hf_names.weights(cfg):
        index, key = item_key(cfg, ours)
        param = params[f"items.{index}.{key}"]
        assert param.tp_shard_dim == hf_names.tp_dim(ours), ours
        full = hf_names.full_shape(cfg, ours)
        assert tuple(param.shape) == tuple(n // 2 if d == param.tp_shard_dim else n for d, n in enumerate(full))


def _damaged_copy(run, tmp_path):
    """A copy of the run whose newest checkpoint has a file cut in half."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = sorted((copy / "checkpoints").glob("step-*"))[-1]
    victim = max((p for p in ckpt.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return copy, victim


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_nothing_is_left(runs, tmp_path):
    run, victim = _damaged_copy(runs["tp2_pp2_untied"], tmp_path)
    out = tmp_path / "hf"
    for args in (["-m", "launcher.export", "--checkpoint", str(run), "--out", str(out)],
                 ["-m", "launcher.generate", "--checkpoint", str(run), "--prompt", "hi"]):
        result = subprocess.run([sys.executable, *args], cwd=WORKDIR, env=base_env(), capture_output=True, text=True,
                                timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith(f"config error: --checkpoint: {victim}: size "), lines
        assert "the checkpoint is damaged" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no --out, no partial directory


def test_export_into_a_directory_with_files_needs_overwrite(runs, tmp_path):
    import os

    from launcher.files import shared_dir_mode, shared_file_mode

    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = export_cli("--checkpoint", str(runs["tp2_pp2_untied"]), "--out", str(out), expect_rc=2)
    assert result.stderr == (f"config error: --out: {out} already exists and is not an empty directory: give a new "
                             "one, or --overwrite to replace it\n")
    assert (out / "notes.txt").read_text() == "mine"
    export_cli("--checkpoint", str(runs["tp2_pp2_untied"]), "--out", str(out), "--overwrite")
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert (out / "model.safetensors").stat().st_mode & 0o777 == shared_file_mode()  # not safetensors' 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert os.stat(out).st_mode & 0o777 == shared_dir_mode()  # not mkdtemp's 0700


def test_a_path_that_does_not_exist_says_so(tmp_path):
    result = export_cli("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "hf"), expect_rc=2)
    assert result.stderr == f"config error: --checkpoint: {tmp_path / 'nope'}: does not exist\n"


def test_byte_export_round_trips_through_transformers_and_generate(runs, tmp_path):
    """A run trained with the byte tokenizer, exported: `transformers.AutoTokenizer` loads the
    export's tokenizer with the run's ids ("hello" -> 104 101 108 108 111), and `generate --hf`
    on the export continues a prompt as `generate --checkpoint` does on the run."""
    run_dir = runs["tp2_dp2_zero3_tied_padded"]
    export_cli("--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("hello").input_ids == [104, 101, 108, 108, 111]
    text = "caf\u00e9 \u0100 \x00 \U0001f600"  # two-byte, a byte-level alphabet character, NUL, four-byte
    assert tok(text).input_ids == list(text.encode()) and tok.decode(tok(text).input_ids) == text
    assert tok.eos_token_id == 0 == json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    args = ["--prompt", "alpha beta", "--max-new-tokens", "6", "--json"]
    from_run = json.loads(generate_cli("--checkpoint", str(run_dir), *args).stdout)
    from_export = json.loads(generate_cli("--hf", str(tmp_path / "hf"), *args).stdout)
    assert from_export == from_run and from_run["prompt_ids"] == list(b"alpha beta")


def generate_cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launcher.generate", *args], cwd=WORKDIR, env=base_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

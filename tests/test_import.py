"""`model.init_from`: a tiny Llama saved by `transformers` itself, imported into tp 1 x pp 1
and tp 2 x pp 2 (GQA; tied and untied; a padded vocabulary), compared with `transformers`
on the same batch (CPU, fp32); a training step after import; import -> export bit for bit;
bad directories and shape mismatches as one-line exit 2; config.json and safetensors
headers fuzzed."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed
from hf_llama import AUTO, load_hf, save_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from launch import REPO, base_env, read_metrics, run_cli, torchrun_cmd

from launcher.checkpoint.reader import resolve_checkpoint
from launcher.checkpoint.state import LauncherState
from launcher.config.load import load_config
from launcher.data.batches import training_batches
from launcher.errors import ConfigError
from launcher.formats.hf_config import hf_model_values
from launcher.hf.weights import HFWeights, check_hf_weights, load_hf_weights
from launcher.model.llama import LlamaModel, layer_specs
from parallel.tensor_parallel import NO_TP, TensorParallel, gather_shards
from launch import WORKDIR  # noqa: E402

DEFAULT = REPO / "configs" / "default.yaml"
RUN = ["precision.dtype=fp32", "parallel.micro_batch=1", "parallel.global_batch=2", "train.eval_every=0",
       "train.log_every=1", "schedule.warmup_steps=1", "optimizer.lr=3e-3", "checkpoint.every=1"]
TP2_PP2 = ["parallel.tensor=2", "parallel.pipeline=2", "zero.stage=1"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"untied": save_tiny_llama(root / "untied"), "tied": save_tiny_llama(root / "tied", tied=True, seed=1),
            # Llama 3.1's RoPE scaling, with its three frequency bands all present at head_dim 16
            "rope": save_tiny_llama(root / "rope", seed=2, max_position_embeddings=128, rope_parameters=LLAMA3_ROPE)}


def model_config(directory: Path, *overrides: str):
    return load_config(DEFAULT, [f"model.init_from={directory}", *AUTO, *overrides]).model


def batch_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(directory)(ids).logits


# --------------------------------------------------------------------------------------
# Logits: tp 1 in this process, tp 2 x pp 2 on four gloo processes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["untied", "tied", "tied_padded", "rope"])
def test_import_tp1_logits_equal_transformers(hf_dirs, variant, capsys):
    directory = hf_dirs[variant.split("_")[0]]
    cfg = model_config(directory, *(["model.vocab=384"] if variant.endswith("padded") else []))
    assert (cfg.hidden, cfg.layers, cfg.n_kv_heads, cfg.ffn) == (64, 2, 2, 172)
    assert cfg.tie_embeddings == variant.startswith("tied") and cfg.vocab == (384 if "padded" in variant else 300)
    assert (cfg.rope_scaling is not None) == (variant == "rope") and cfg.seq_len == (128 if variant == "rope" else 32)
    model = LlamaModel(layer_specs(cfg, NO_TP, seed=7)).eval()
    copied = load_hf_weights(model, directory, tp_rank=0, tp_size=1)
    assert copied == sum(p.numel() for p in set(model.parameters()))
    ids = batch_ids(300)
    with torch.no_grad():
        ours = model(ids)
    if "padded" in variant:  # the rows beyond config.json's vocab_size start at zero
        assert torch.equal(ours[..., 300:], torch.zeros_like(ours[..., 300:]))
    diff = (ours[..., :300] - hf_logits(directory, ids)).abs().max().item()
    with capsys.disabled():
        print(f"\nimport tp1 {variant}: max |logit diff| vs transformers {diff:.2e}")
    assert diff <= 1e-4


def _tp2_pp2_logits(rank: int, world: int, cases: list) -> list:
    """Each rank builds its own pipeline stage (items 0-3 | 4-6) of its tp rank and loads only
    its slices; stage 0 hands its hidden states to stage 1, which gathers the logits."""
    tp_rank, pp_rank = rank % 2, rank // 2
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    tp = TensorParallel(groups[pp_rank], tp_rank, 2)
    out = []
    for directory, cfg, ids in cases:
        specs = layer_specs(cfg, tp, seed=7)
        stage = LlamaModel(specs[:4] if pp_rank == 0 else specs[4:]).eval()
        load_hf_weights(stage, Path(directory), tp_rank, 2)
        held = sum(p.numel() for p in set(stage.parameters()))
        with torch.no_grad():
            if pp_rank == 0:
                dist.send(stage(ids).contiguous(), rank + 2)
                out.append((None, held))
                continue
            hidden = torch.empty(*ids.shape, cfg.hidden)
            dist.recv(hidden, rank - 2)
            out.append((gather_shards(stage(hidden), -1, tp), held))
    return out


def test_import_tp2_pp2_logits_equal_transformers(hf_dirs, capsys):
    cases = [(str(hf_dirs["untied"]), model_config(hf_dirs["untied"], *TP2_PP2), batch_ids(300, 1)),
             (str(hf_dirs["tied"]), model_config(hf_dirs["tied"], *TP2_PP2, "model.vocab=384"), batch_ids(300, 2))]
    results = run_distributed(_tp2_pp2_logits, 4, cases)
    for i, (directory, cfg, ids) in enumerate(cases):
        logits = results[2][i][0]
        assert torch.equal(logits, results[3][i][0])  # both tp ranks of the last stage agree
        diff = (logits[..., :300] - hf_logits(Path(directory), ids)).abs().max().item()
        total = sum(p.numel() for p in load_hf(Path(directory)).parameters())
        held = max(results[r][i][1] for r in range(4))
        with capsys.disabled():
            print(f"\nimport tp2 x pp2 {Path(directory).name} (vocab {cfg.vocab}): max |logit diff| {diff:.2e}; "
                  f"largest rank holds {held:,} of {total:,} parameters")
        assert diff <= 1e-4
        assert held < 0.6 * total  # no rank holds the model: each its own stage's tp slices


# --------------------------------------------------------------------------------------
# Real runs: a training step after import, and import -> export bit for bit
# --------------------------------------------------------------------------------------


def export(run_dir: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher.export", "--checkpoint", str(run_dir), "--out", str(out)],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def hf_batch_loss(directory: Path, micro_batches: list) -> float:
    """The loss a run reports for one global batch (dp 1): the mean of its micro-batches'."""
    model = load_hf(directory)
    with torch.no_grad():
        losses = [F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten()) for ids, targets in micro_batches]
    return torch.stack(losses).mean().item()


def test_import_tp2_pp2_trains_and_round_trips(hf_dirs, tmp_path, capsys):
    """train.steps=0 converts the directory into a tp2 x pp2 checkpoint: exported, it is the
    directory's tensors bit for bit. One training step from it: the loss the run reports is
    transformers' on the same batch, and the exported result has a lower loss on it."""
    source = hf_dirs["untied"]
    convert = tmp_path / "convert"
    run_cli(torchrun_cmd(4), convert, f"model.init_from={source}", *AUTO, *RUN, *TP2_PP2, "train.steps=0")
    state = LauncherState.read(resolve_checkpoint(convert)[0])
    assert state.step == 0 and state.fingerprint["weights_from"]["init_from"] == str(source.resolve())
    assert state.fingerprint["weights_from"]["vocab_size"] == 300 and len(state.fingerprint["weights_from"]["sha256"]) == 64
    export(convert, tmp_path / "round_trip")
    from safetensors.torch import load_file

    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "round_trip" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert json.loads((tmp_path / "round_trip" / "config.json").read_text())["vocab_size"] == 300

    trained = tmp_path / "trained"
    result = run_cli(torchrun_cmd(4), trained, f"model.init_from={source}", *AUTO, *RUN, *TP2_PP2, "train.steps=1")
    assert "init       weights of this rank read from" in result.stdout
    first = read_metrics(trained)[0]["loss"]
    cfg = load_config(trained / "config.yaml")
    batch = training_batches(cfg, trained / "data", global_batch=2, micro_batch=1).next_step()
    expected = hf_batch_loss(source, batch)
    export(trained, tmp_path / "trained_hf")
    lowered = hf_batch_loss(tmp_path / "trained_hf", batch)
    with capsys.disabled():
        print(f"\nimport tp2 x pp2 run: step-1 loss {first:.6f}, transformers on that batch {expected:.6f} "
              f"(diff {abs(first - expected):.1e}); after the step {lowered:.6f}")
    assert abs(first - expected) <= 1e-5
    assert lowered < expected - 1e-3


def test_llama3_rope_scaling_round_trips(hf_dirs, tmp_path):
    """Llama 3.1's RoPE scaling: imported, converted (train.steps=0), exported; transformers
    reads the exported config.json back to the same rope parameters and the same logits."""
    source = hf_dirs["rope"]
    run_cli([sys.executable, "-m", "launcher.train"], tmp_path / "run", f"model.init_from={source}", *AUTO, *RUN,
            "parallel.tensor=1", "parallel.pipeline=1", "train.steps=0")
    export(tmp_path / "run", tmp_path / "hf")
    exported = load_hf(tmp_path / "hf")
    params = exported.config.rope_parameters
    assert {k: params[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    ids = batch_ids(300, 3)
    with torch.no_grad():
        assert (exported(ids).logits - hf_logits(source, ids)).abs().max().item() <= 1e-5


def test_import_resumes_from_its_checkpoint_not_the_directory(hf_dirs, tmp_path):
    """A run started from init_from, resumed: the checkpoint's weights are loaded, the
    directory's provenance carried on (even when init_from now names another directory)."""
    run_dir = tmp_path / "run"
    common = [*AUTO, *RUN, "parallel.tensor=1", "parallel.pipeline=1"]
    run_cli([sys.executable, "-m", "launcher.train"], run_dir, f"model.init_from={hf_dirs['untied']}", *common,
            "train.steps=1")
    other = save_tiny_llama(tmp_path / "other", seed=5)  # same shapes, other weights
    result = run_cli([sys.executable, "-m", "launcher.train"], run_dir, f"model.init_from={other}", *common,
                     "train.steps=2")
    assert "not loaded: resuming from a checkpoint" in result.stdout and "init       weights" not in result.stdout
    state = LauncherState.read(resolve_checkpoint(run_dir)[0])
    assert state.step == 2 and state.fingerprint["weights_from"]["init_from"] == str(hf_dirs["untied"].resolve())


# --------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any process group
# --------------------------------------------------------------------------------------


def train_error(*overrides: str) -> str:
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: a user's runs/default there is not ours
        result = subprocess.run([sys.executable, "-m", "launcher.train", *overrides], cwd=cwd, env=base_env(),
                                capture_output=True, text=True, timeout=120, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return lines[0]


def test_the_default_configs_shape_gives_way_to_init_from(hf_dirs, tmp_path, capsys):
    """configs/default.yaml pins the toy's shape: naming only a directory means its shape
    (with or without --config configs/default.yaml). A shape key set on the command line, or
    any config a user chose, is still compared with the directory and refused."""
    from launcher.train import main

    source = f"model.init_from={hf_dirs['untied']}"
    run = f"run.dir={tmp_path / 'run'}"
    shape = "2 layers, hidden 64, heads 4 (kv 2 GQA), ffn 172, vocab 300, seq 32"
    for config in ([], ["--config", str(DEFAULT)], ["--config", "default"]):
        assert main([*config, "--dry-run", source, run]) == 0, capsys.readouterr().err
        assert shape in capsys.readouterr().out, config
    assert main(["--dry-run", source, run, "model.seq_len=16"]) == 0  # a key that is no weight's shape
    assert shape.replace("seq 32", "seq 16") in capsys.readouterr().out
    assert main(["--dry-run", source, run, "model.hidden=128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the config needs (300, 128)" in err, err
    mine = tmp_path / "mine.yaml"
    mine.write_text(DEFAULT.read_text())  # the same keys, but a config the user chose
    assert main(["--config", str(mine), "--dry-run", source, run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: model."), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["hidden", "layers", "untied_from_tied", "vocab_too_small"])
def test_shape_mismatch_is_one_line_exit_2(hf_dirs, tmp_path, case):
    source = hf_dirs["tied" if case == "untied_from_tied" else "untied"]
    override, expected = {
        "hidden": ("model.hidden=32", "model.embed_tokens.weight: shape (300, 64) in "),
        "layers": ("model.layers=3", "no tensor model.layers.2.input_layernorm.weight (the config needs (64,))"),
        "untied_from_tied": ("model.tie_embeddings=false", "no tensor lm_head.weight (the config needs (300, 64))"),
        # (the byte tokenizer: with the directory's, model.vocab's own check refuses 256 first)
        "vocab_too_small": ("model.vocab=256 data.tokenizer=byte", "model.embed_tokens.weight: shape (300, 64) in "),
    }[case]
    line = train_error(f"model.init_from={source}", *AUTO, *override.split(), "parallel.tensor=1", "parallel.pipeline=1",
                       f"run.dir={tmp_path / 'run'}")
    assert line.startswith("config error: model.init_from: ") and expected in line, line
    if case in ("hidden", "vocab_too_small"):
        assert "the config needs (" + ("300, 32)" if case == "hidden" else "256, 64)") in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tied_config_refuses_an_untied_directory(hf_dirs, tmp_path):
    line = train_error(f"model.init_from={hf_dirs['untied']}", *AUTO, "model.tie_embeddings=true",
                       "parallel.tensor=1", "parallel.pipeline=1", f"run.dir={tmp_path / 'run'}")
    assert "lm_head.weight: in " in line and "model.tie_embeddings is true" in line, line


def test_tied_directory_saved_with_its_head_is_accepted(hf_dirs, tmp_path):
    """Some tied checkpoints carry lm_head.weight too (equal to the embedding): with
    tie_word_embeddings true, it is ignored, as transformers ignores it."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path / "tied_with_head"
    shutil.copytree(hf_dirs["tied"], directory)
    tensors = load_file(directory / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              directory / "model.safetensors", metadata={"format": "pt"})
    cfg = model_config(directory)
    check_hf_weights(cfg, directory)
    model = LlamaModel(layer_specs(cfg, NO_TP, seed=None)).eval()
    load_hf_weights(model, directory, 0, 1)
    ids = batch_ids(300, 4)
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf_dirs["tied"], ids)).abs().max().item() <= 1e-4


def test_not_a_model_directory_is_one_line_exit_2(hf_dirs, tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hf_dirs["untied"] / "config.json").read_text())
    (no_weights / "pytorch_model.bin").write_bytes(b"not read")
    cases = {tmp_path / "missing": "not a directory", tmp_path: "no config.json",
             no_weights: "no *.safetensors files (pytorch_model.bin is PyTorch pickle"}
    for directory, expected in cases.items():
        line = train_error(f"model.init_from={directory}", *AUTO, "parallel.tensor=1", "parallel.pipeline=1")
        assert line.startswith("config error: model.init_from: ") and expected in line, line
    line = train_error("model.hidden=auto")
    assert line.startswith("config error: model.hidden: auto reads a Hugging Face config.json"), line


# --------------------------------------------------------------------------------------
# Fuzzing what a directory may hold
# --------------------------------------------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3),
                    st.dictionaries(st.sampled_from(["rope_type", "type", "rope_theta", "factor", "low_freq_factor",
                                                     "high_freq_factor", "original_max_position_embeddings"]),
                                    st.one_of(st.sampled_from(["llama3", "default", "linear"]), st.floats(),
                                              st.integers(-2, 9000), st.none()), max_size=7))
_FIELDS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "rope_parameters", "tie_word_embeddings", "head_dim", "hidden_act", "attention_bias",
           "mlp_bias"]
_VALID = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 32,
          "rms_norm_eps": 1e-5, "hidden_act": "silu"}


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=4),
       drop=st.lists(st.sampled_from(sorted(_VALID)), max_size=2),
       top=st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.none(), max_size=1)))
def test_fuzzed_config_json_is_a_config_error_or_a_valid_model(changes, drop, top):
    raw = {k: v for k, v in {**_VALID, **changes}.items() if k not in drop}
    with tempfile.TemporaryDirectory() as d:
        text = json.dumps(raw if top is None else top)
        (Path(d) / "config.json").write_text(text)
        try:
            values = hf_model_values(Path(d))
        except ConfigError as err:
            assert err.key == "model.init_from" and "\n" not in str(err)
            return
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len"):
        assert type(values[key]) is int and values[key] > 0
    assert values["rope_theta"] > 0 and values["norm_eps"] > 0 and type(values["tie_embeddings"]) is bool
    scaling = values["rope_scaling"]
    assert scaling is None or (scaling["rope_type"] == "llama3" and scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0)
    assert raw["model_type"] == "llama" and values["hidden"] == raw["hidden_size"]


@settings(max_examples=150, deadline=None)
@given(header=st.binary(max_size=64), length=st.integers(0, 2**64 - 1) | st.integers(0, 200))
def test_fuzzed_safetensors_header_is_a_config_error(header, length):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").write_bytes(length.to_bytes(8, "little") + header)
        try:
            HFWeights(Path(d))
        except ConfigError as err:
            assert err.key == "model.init_from" and "model.safetensors" in str(err) and "\n" not in str(err)

"""`python -m launcher.generate`: greedy decoding gives `transformers`' tokens on the same
weights, from a Hugging Face directory and from a checkpoint of another layout; the KV
cache gives the full forward's logits; sampling stays in its nucleus and follows its seed;
bad arguments are one line, exit 2."""

import json
import subprocess
import sys

import pytest
import torch
from hf_llama import AUTO, load_hf, save_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import REPO, base_env, run_cli, torchrun_cmd

from launcher.config.load import load_config
from launcher.hf.weights import load_hf_weights
from launcher.inference.sampling import next_token
from launcher.model.attention import Attention, KVCache
from launcher.model.llama import LlamaModel, layer_specs
from parallel.tensor_parallel import NO_TP
from launch import WORKDIR  # noqa: E402

PROMPT = "alpha beta gamma delta"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    return {"untied": save_tiny_llama(root / "untied", seed=3), "tied": save_tiny_llama(root / "tied", tied=True, seed=4, initializer_range=0.2)}


def generate_cli(*args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launcher.generate", *args], cwd=WORKDIR, env=base_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == expect_rc, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def generate_json(*args: str) -> dict:
    return json.loads(generate_cli(*args, "--json").stdout)


def transformers_greedy(directory, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = load_hf(directory).generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_greedy_matches_transformers_generate(hf_dirs, variant, capsys):
    out = generate_json("--hf", str(hf_dirs[variant]), "--prompt", PROMPT, "--max-new-tokens", "20")
    expected = transformers_greedy(hf_dirs[variant], out["prompt_ids"], 20)
    with capsys.disabled():
        print(f"\ngenerate --hf {variant}: {out['generated_ids']}")
    assert out["generated_ids"] == expected and len(set(expected)) > 3  # a continuation, not one token repeated
    assert isinstance(out["text"], str)


def test_checkpoint_of_another_layout_generates_the_same(hf_dirs, tmp_path):
    """The directory converted into a pp 2 checkpoint (train.steps=0) and read back by
    generate --checkpoint: the same prompt ids and the same continuation as --hf; text mode
    prints the prompt and its continuation."""
    run_dir = tmp_path / "run"
    run_cli(torchrun_cmd(2), run_dir, f"model.init_from={hf_dirs['untied']}", *AUTO, "parallel.tensor=1",
            "parallel.pipeline=2", "precision.dtype=fp32", "parallel.micro_batch=1", "parallel.global_batch=2",
            "schedule.warmup_steps=0", "train.steps=0")
    ours = generate_json("--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    theirs = generate_json("--hf", str(hf_dirs["untied"]), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert ours == theirs
    text = generate_cli("--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert text.stdout == PROMPT + ours["text"] + "\n"
    assert "tokens/s" in text.stderr.splitlines()[-1]


def test_kv_cache_decoding_equals_the_full_forward(hf_dirs):
    """Prompt in one call, then one token per call: each position's logits are the full
    (uncached) forward's on the whole sequence."""
    directory = hf_dirs["tied"]
    cfg = load_config(REPO / "configs/default.yaml", [f"model.init_from={directory}", *AUTO]).model
    model = LlamaModel(layer_specs(cfg, NO_TP, seed=0)).eval()
    load_hf_weights(model, directory, 0, 1)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
    caches = [KVCache.empty(1, m.kv_heads, 20, m.head_dim, full) for m in model.items if isinstance(m, Attention)]
    pieces = [model.decode(ids[:, :7], caches)] + [model.decode(ids[:, t:t + 1], caches) for t in range(7, 20)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5
    assert all(c.length == 20 for c in caches)


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-20, 20), min_size=2, max_size=40), temperature=st.floats(0.05, 5),
       top_p=st.floats(0.001, 1.0), seed=st.integers(0, 2**31))
def test_sampling_stays_in_the_nucleus_and_follows_its_seed(logits, temperature, top_p, seed):
    row = torch.tensor(logits)
    assert next_token(row, 0.0, top_p, torch.Generator()) == int(row.argmax())
    token = next_token(row, temperature, top_p, torch.Generator().manual_seed(seed))
    assert token == next_token(row, temperature, top_p, torch.Generator().manual_seed(seed))
    probs = torch.softmax(row.double() / temperature, dim=-1)
    # the nucleus: tokens whose more likely predecessors hold less than top_p
    above = probs[probs > probs[token]].sum().item()
    assert above < top_p + 1e-9


def test_sampling_cli_is_seeded(hf_dirs):
    args = ["--hf", str(hf_dirs["untied"]), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "1.5"]
    runs = [generate_json(*args, "--seed", str(s))["generated_ids"] for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("args, expected", [
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--top-p", "many"], "--top-p: invalid float value"),
])
def test_bad_arguments_are_one_line_exit_2(hf_dirs, args, expected):
    result = generate_cli("--hf", str(hf_dirs["untied"]), "--prompt", PROMPT, *args, expect_rc=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and expected in lines[0], result.stderr


def test_not_a_model_is_one_line_exit_2(tmp_path):
    for args, expected in ((["--hf", str(tmp_path)], "config error: --hf: "),
                           (["--checkpoint", str(tmp_path)], "config error: --checkpoint: ")):
        result = generate_cli(*args, "--prompt", PROMPT, expect_rc=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr

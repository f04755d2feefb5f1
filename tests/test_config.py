"""Config loading, overrides, --print-config, --dry-run, and one-line errors (exit 2),
exercised through the real command line."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.config.load import load_config
from launcher.errors import ConfigError
from launcher.planning.auto import default_world_size, resolve_auto
from launcher.planning.cluster import assumed_cluster
from launcher.planning.precision import ASSUMED_GPU
from launcher.training.launch import resolved_config
from launch import WORKDIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def cli(*args, cwd=WORKDIR):
    return subprocess.run([sys.executable, "-m", "launcher.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


BAD = [  # (extra args, key the one-line error must name)
    (["model.hiden=64"], "model.hiden: unknown key (did you mean 'hidden'?)"),
    (["modle.layers=2"], "modle: unknown key (did you mean 'model'?)"),
    (["model.layers=four"], "model.layers: expected an integer"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings: expected true or false"),
    (["precision.dtype=fp8"], "precision.dtype: expected one of"),
    (["--dry-run", "--world-size", "6"], "parallel.data"),
    (["--dry-run", "--world-size", "16", "parallel.data=2"], "parallel.data: tensor*pipeline*data = 2*2*2 = 8"),
    (["parallel.tensor=8"], "model.heads: heads=4 is not divisible by parallel.tensor=8"),
    (["parallel.tensor=4"], "model.kv_heads: kv_heads=2 is not divisible by parallel.tensor=4"),
    (["model.ffn=345"], "model.ffn: ffn=345 is not divisible by parallel.tensor=2"),
    (["model.vocab=257"], "model.vocab: vocab=257 is not divisible by parallel.tensor=2"),
    (["model.kv_heads=3"], "model.kv_heads: heads=4 is not divisible by kv_heads=3"),
    (["model.layers=1"], "parallel.pipeline: pipeline=2 stages but only model.layers=1 layers"),
    (["--dry-run", "--world-size", "8", "parallel.global_batch=10"], "parallel.global_batch: global_batch=10"),
    (["zero.stage=2"], "zero.stage: ZeRO stage 2 cannot be used with parallel.pipeline=2"),
    (["zero.stage=5"], "zero.stage: expected one of"),
    (["--config", "configs/does_not_exist.yaml"], "--config: file not found"),
    (["--dry-run", "data.path=/no/such/corpus"], "data.path: not found: /no/such/corpus"),
    (["--dry-run", "data.path=configs/default.yaml"], "data.path: configs/default.yaml is a file; training reads prepared"),
    (["data.tokenizer=/no/tokenizer.json"], "data.tokenizer: expected `byte`, a tokenizer.json, a SentencePiece "
     ".model or a directory holding one; not found: /no/tokenizer.json"),
    (["model.vocab=auto", "data.tokenizer=configs"], "data.tokenizer: configs: holds no tokenizer.json or "
     "tokenizer.model"),
    (["parallel.partition=greedy"], "parallel.partition: expected balanced, uniform, parameters"),
    (["--dry-run", "parallel.partition=type:Conv"], "parallel.partition: 'type:Conv' matches none"),
    (["--dry-run", "parallel.stage_memory_gb=0.0001"], "parallel.stage_memory_gb: no split"),
    (["parallel.tensor"], "parallel.tensor: an override must look like section.key=value"),
    (["optimizer.betas=[0.9]"], "optimizer.betas: expected two numbers"),
    (["train.steps=-1"], "train.steps: must be >= 0"),
    (["compression.method=onebit"], "compression.method: expected one of"),
    (["compression.method=powersgd", "parallel.pipeline=1", "zero.stage=2"],
     "compression.method: powersgd cannot be used with zero.stage=2"),
    (["compression.method=powersgd", "precision.dtype=fp16"],
     "compression.method: powersgd cannot be used with precision.dtype=fp16"),
    (["compression.method=powersgd", "compression.rank=0"], "compression.rank: must be > 0"),
    (["optimizer.lr=.nan"], "optimizer.lr: expected a finite number, got nan"),
    (["train.steps=5"], "schedule.warmup_steps: warmup_steps=10 is longer than the run (train.steps=5)"),
    (["model.layers=100000"], "model.layers: 100000 is more than 1,024, the most this launcher plans for"),
    (["train.seed=-1"], "train.seed: expected 0 <= seed < 2**32"),
    (["=4"], "'=4': an override must name section.key"),
    (["deepspeed.zero_optimization={1: 2}"], "deepspeed.zero_optimization.1: DeepSpeed config keys must be strings"),
    (["--dry-run", "model.seq_len=32768"], "data.val_fraction: the held-out part of embedded (0.05 of its tokens) has"),
    (["--dry-run", "run.dir=/dev/null"], "run.dir: /dev/null cannot be a directory: /dev/null is a file"),
    (["--dry-run", "checkpoint.resume=configs"], "checkpoint.resume: configs is not a checkpoint (no launcher_state"),
    (["parallel.context=3"], "parallel.context: 3: model.seq_len=128 is not divisible by 2 x context = 6"),
    (["--dry-run", "--world-size", "8", "parallel.context=4"],
     "parallel.data: auto: world size 8 is not divisible by tensor*pipeline*context = 2*2*4 = 16"),
    (["parallel.context=2", "model.moe.experts=4", "model.moe.capacity_factor=1.0"],
     "model.moe.capacity_factor: 1.0 with parallel.context=2"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[e.split(":")[0] + "|" + a[-1] for a, e in BAD])
def test_bad_config_is_one_line_naming_the_key(args, expected):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_yaml_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  layers: [1, 2\n")
    (tmp_path / "section.yaml").write_text("model: 5\n")
    (tmp_path / "latin1.yaml").write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- model\n- train\n")
    (tmp_path / "unsafe.yaml").write_text("model:\n  layers: !!python/object/apply:os.system ['true']\n")
    for name, key in (("broken.yaml", "--config"), ("section.yaml", "model: expected a mapping"),
                      ("latin1.yaml", f"--config: {tmp_path / 'latin1.yaml'}: not UTF-8 text (byte 16, line 2)"),
                      ("list.yaml", "expected a mapping of sections at the top level, got ['model', 'train']"),
                      ("unsafe.yaml", "could not determine a constructor for the tag")):
        result = cli("--config", str(tmp_path / name))
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert key in result.stderr


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory) -> str:
    """A prepared dataset whose splits (a fifth held out) each hold a 128k-token sequence
    (the embedded corpus's held-out part cannot): the embedded corpus's documents three
    times over, as a user's own data goes through `python -m launcher.prepare`."""
    import gzip

    from launcher.data.sources import EMBEDDED_CORPUS

    root = tmp_path_factory.mktemp("long_documents")
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        lines = f.read()
    (root / "docs.jsonl").write_text(lines * 3, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "launcher.prepare", "--input", str(root / "docs.jsonl"),
                    "--tokenizer", "byte", "--out", str(root / "prepared")], check=True, capture_output=True)
    return str(root / "prepared")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_dry_runs(config, request):
    cfg = load_config(config)
    base = default_world_size(cfg)
    # a long-context config is for the user's own data: the embedded corpus is shorter than its sequence
    data = ([f"data.path={request.getfixturevalue('long_documents')}", "data.val_fraction=0.2"]
            if cfg.model.seq_len > 65536 else [])
    for world_size in (base, 2 * base):
        result = cli("--config", str(config), "--dry-run", "--world-size", str(world_size), *data)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        resolved, note = resolve_auto(cfg, world_size, assumed_cluster(world_size), ASSUMED_GPU)
        # the layout's auto keys (sequence_parallel: auto is decided after, for the device)
        layout_auto = [line for line in out.splitlines() if line.startswith("auto ") and "sequence_parallel" not in line]
        assert (note in out) if note else not layout_auto, out
        assert "memory     est." in out
        p = resolved.parallel
        base = p.tensor * p.pipeline * p.context
        context = f" x cp {p.context}" if p.context > 1 else ""
        assert f"world {world_size} = tp {p.tensor}{context} x pp {p.pipeline} x dp {world_size // base}" in out
        stage_rows = [line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
        assert len(stage_rows) == p.pipeline


def test_dry_run_of_a_512_gpu_config_starts_nothing():
    # The dry run runs the launch's checks (launcher/training/preflight.py), DeepSpeed's config parser
    # among them, so torch is imported; but no process group is started, no GPU touched.
    code = ("import sys; from launcher.train import main; "
            "rc = main(['--config', 'configs/llama_70b.yaml', '--dry-run', '--world-size', '512']); "
            "import torch, torch.distributed as dist; "
            "assert not dist.is_initialized(), 'dry run started a process group'; "
            "assert not torch.cuda.is_initialized(), 'dry run initialised CUDA'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=WORKDIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved, note = resolve_auto(load_config("configs/llama_70b.yaml"), 512, assumed_cluster(512), ASSUMED_GPU)
    p = resolved.parallel
    dp = 512 // (p.tensor * p.pipeline)
    assert note in result.stdout
    assert f"world 512 = tp {p.tensor} x pp {p.pipeline} x dp {dp}" in result.stdout
    assert f"grad_accum {1024 // (p.micro_batch * dp)}" in result.stdout


def test_print_config_applies_overrides_and_round_trips(tmp_path):
    result = cli("--print-config", "parallel.tensor=1", "optimizer.betas=[0.8, 0.99]", "logging.wandb.mode=offline",
                 "model.kv_heads=null")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["parallel"]["tensor"] == 1
    assert printed["optimizer"]["betas"] == [0.8, 0.99]
    assert printed["logging"]["wandb"]["mode"] == "offline"
    assert printed["model"]["kv_heads"] is None
    (tmp_path / "resolved.yaml").write_text(result.stdout)
    given = load_config(REPO / "configs/default.yaml", ["parallel.tensor=1", "optimizer.betas=[0.8, 0.99]",
                                                        "logging.wandb.mode=offline", "model.kv_heads=null"])
    # world 2 (tensor 1 x pipeline 2, the smallest), planned for an H100 as --dry-run does
    assert load_config(tmp_path / "resolved.yaml") == resolved_config(given, 2, "h100")


def test_print_config_leaves_nothing_auto_and_is_a_config_the_launcher_accepts(tmp_path, capsys):
    """Llama-2-7B for 32 H100s: every `auto` decided (layout, dtype, sequence parallelism,
    resume), run.dir absolute; the YAML loads back to itself and passes a dry run."""
    from launcher.train import main

    run = tmp_path / "run"
    args = ["--config", "configs/llama_7b.yaml", "--world-size", "32", "--gpu", "h100", f"run.dir={run}"]
    assert main(["--print-config", *args]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)

    def values(node):
        return [v for child in node.values() for v in values(child)] if isinstance(node, dict) else [node]

    assert "auto" not in values(printed), text
    p = printed["parallel"]
    assert p["tensor"] * p["pipeline"] * p["data"] == 32 and printed["precision"]["dtype"] == "bf16"
    assert printed["run"]["dir"] == str(run) and printed["checkpoint"]["dir"] == str(run / "checkpoints")
    assert printed["checkpoint"]["resume"] == "none"  # nothing there to resume
    (tmp_path / "printed.yaml").write_text(text)
    assert main(["--print-config", "--config", str(tmp_path / "printed.yaml"), "--world-size", "32"]) == 0
    assert capsys.readouterr().out == text  # nothing left to resolve
    assert main(["--dry-run", "--config", str(tmp_path / "printed.yaml"), "--world-size", "32"]) == 0
    dry = capsys.readouterr().out
    assert f"world 32 = tp {p['tensor']} x pp {p['pipeline']} x dp {p['data']}" in dry and "auto  " not in dry
    relative = ["--config", "configs/llama_7b.yaml", "--world-size", "32", "run.name=seven"]
    assert main(["--print-config", *relative]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["dir"] == str(Path.cwd() / "runs" / "seven")


def test_default_config_used_without_config_flag(tmp_path):
    result = cli("--print-config", cwd=tmp_path)  # from another directory too
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["parallel"]["tensor"] == 2


def test_int_accepted_for_float_but_not_bool_for_int():
    cfg = load_config(REPO / "configs/default.yaml", ["optimizer.lr=1"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    cfg = load_config(REPO / "configs/default.yaml", ["optimizer.lr=3e-4"])  # YAML 1.1 reads this as a string
    assert cfg.optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="optimizer.lr: expected a number, got 'fast'"):
        load_config(REPO / "configs/default.yaml", ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="model.layers: expected an integer or one of .auto., got True"):
        load_config(REPO / "configs/default.yaml", ["model.layers=true"])


def test_a_key_written_twice_is_refused_naming_it_and_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  layers: 2\n  hidden: 64\n  layers: 3\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == (f"--config: {path}: key 'layers' is written twice in one section (lines 2 and 4): "
                                  "keep one")
    path.write_text("base: &base {layers: 2}\n")  # a merge key overridden on purpose is not a duplicate
    assert read_yaml_for_test(path) == {"base": {"layers": 2}}
    path.write_text("model: &m\n  layers: 2\nother:\n  <<: *m\n  layers: 3\n")
    assert read_yaml_for_test(path)["other"] == {"layers": 3}


def read_yaml_for_test(path):
    from launcher.config.load import read_yaml

    return read_yaml(path)


def test_config_names_a_shipped_config_from_any_directory(tmp_path, monkeypatch):
    from launcher.config.load import config_path, shipped_config_names

    monkeypatch.chdir(tmp_path)
    assert config_path("llama_7b") == REPO / "configs" / "llama_7b.yaml"
    assert load_config("llama_7b").model.layers == 32
    with pytest.raises(ConfigError, match=r"^--config: file not found: llama_9b \(or the name of a shipped config: "
                                          r"deepseek_moe_16b, default, .*llama_7b, mixtral_8x7b\)$"):
        config_path("llama_9b")
    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file"):
        config_path(REPO / "configs")
    assert "default" in shipped_config_names()

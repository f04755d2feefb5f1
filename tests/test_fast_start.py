"""A run that compiles nothing never loads torch._dynamo (launcher/training/fast_start.py and
the AdamW of launcher/training/optim.py): ~1.4 s of CPU per rank at start, and the update is
torch's own, bit for bit."""

import subprocess
import sys

import torch
from launch import WORKDIR, base_env, python_cmd

from launcher.training.optim import AdamW


def _train_three_steps(optimizer_class, reload: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    optimizer = optimizer_class(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        loss = (params[0].sum(0) * params[1]).square().sum() + step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if reload:  # through a state dict, as a checkpoint does
            saved = optimizer.state_dict()
            optimizer = optimizer_class(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
            optimizer.load_state_dict(saved)
    return [p.detach().clone() for p in params]


def test_adamw_is_torchs_update_bit_for_bit():
    ours = _train_three_steps(AdamW, reload=True)
    torchs = _train_three_steps(torch.optim.AdamW, reload=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
    assert not torch.equal(ours[0], _train_three_steps(torch.optim.Adam, reload=False)[0])  # the check can fail


def test_a_whole_run_never_imports_dynamo(tmp_path):
    """One process, one step, a checkpoint and a validation pass, with -X importtime: every
    module the run imports is listed on stderr."""
    result = subprocess.run([sys.executable, "-X", "importtime", *python_cmd()[1:], f"run.dir={tmp_path / 'run'}",
                             "parallel.tensor=1", "parallel.pipeline=1", "train.steps=1", "schedule.warmup_steps=0"],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "launcher.training.loop" in imported and "deepspeed" in imported  # the listing is real
    assert "torch._dynamo" not in imported
    assert (tmp_path / "run/checkpoints/step-00000001").is_dir()

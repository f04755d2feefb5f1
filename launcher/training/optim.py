"""Optimizers and the learning-rate schedule.

AdamW is torch's (fused/foreach kernels on GPU, and DeepSpeed's ZeRO wraps any torch
optimizer). Lion is written here: torch has none, and DeepSpeed's Lion needs its
JIT-compiled C++/CUDA op (a compiler on every node, a minute of build at start) for an
update that is four lines of tensor code.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch

from launcher.config.schema import Config, OptimizerConfig, ScheduleConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"):
    update = sign(b1 * m + (1 - b1) * g); m <- b2 * m + (1 - b2) * g; decoupled weight decay."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


# torch's Adam/AdamW step, without its `_use_grad_for_differentiable` wrapper: that wrapper
# imports torch._dynamo on every call (for graph breaks that only mean something while dynamo
# traces the step, which the launcher never does), ~1.4 s of CPU per rank at the first step.
_ADAM_STEP = inspect.unwrap(torch.optim.Adam.step)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, the same update bit for bit (tests/test_fast_start.py), stepped under
    no_grad as torch's wrapper does for a non-differentiable optimizer."""

    @torch.no_grad()
    def step(self, closure=None):
        return _ADAM_STEP(self, closure)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections); not norms' gains (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, peak_lr: float, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up to peak_lr over
    warmup_steps, then cosine decay to min_lr at total_steps."""
    if step <= schedule.warmup_steps:
        return peak_lr * step / max(1, schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps))
    return schedule.min_lr + 0.5 * (peak_lr - schedule.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg_opt: OptimizerConfig, schedule: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR calls the lambda with the number of scheduler steps taken so far (0 for the
    # first optimizer step), DeepSpeed steps it once per optimizer step.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_at(done + 1, cfg_opt.lr, schedule, total_steps) / cfg_opt.lr)


def schedule_change(saved: Optional[dict], cfg: Config, step: int) -> Optional[str]:
    """One line when a resume at `step` changes the learning-rate schedule it was saved with
    (`saved`: the checkpoint fingerprint's "schedule"; None for checkpoints older than it).
    The rule: the schedule is a function of the step and the current config, so from step
    + 1 on the run follows the new schedule as if it had always had it."""
    current = {"train.steps": cfg.train.steps, "optimizer.lr": cfg.optimizer.lr,
               "schedule.warmup_steps": cfg.schedule.warmup_steps, "schedule.min_lr": cfg.schedule.min_lr}
    if not saved or saved == current:
        return None
    changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
    old = ScheduleConfig(warmup_steps=saved["schedule.warmup_steps"], min_lr=saved["schedule.min_lr"])
    was = lr_at(step + 1, saved["optimizer.lr"], old, saved["train.steps"])
    now = lr_at(step + 1, cfg.optimizer.lr, cfg.schedule, cfg.train.steps)
    return (f"{changed} since the checkpoint: the learning-rate schedule now follows the new values, step {step + 1} "
            f"runs at lr {now:.3g} (the saved schedule would give {was:.3g}); docs/CHECKPOINTS.md")

"""Derive, from a shipped config file, the same structure at a size that trains in at most
8 CPU processes: a new file in configs/ is covered by the shipped-config test as it is.

Kept from the file (its `auto` keys as the planner resolves them for the fewest H100 nodes
it fits on): context degree (2 for `auto`), pipeline degree (up to 8), tensor degree as far as the 8 processes allow
(a divisor of the file's), ZeRO stage, activation checkpointing, tied embeddings, the GQA
ratio, the partition method, RoPE theta, norm epsilon, optimizer, compression, and the
precision when this CPU supports it (else fp32), MoE's router, balancing and shared experts
(one at most). Shrunk: layers (one per stage, at least two), width (8 per head), vocabulary
(the byte tokenizer's 256), sequence length, batch, steps and schedule; an MoE model to 4
experts of ffn 16, top 2 at most, one dense first layer at most.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from launcher.config.load import load_config
from launcher.planning.precision import detect_device_support, resolve_dtype

MAX_PROCS = 8
HEAD_DIM = 8
SEQ_LEN = 32


@dataclass(frozen=True)
class Shrunk:
    overrides: list[str]  # section.key=value, applied on top of the shipped file
    nproc: int
    tp: int
    pp: int
    dp: int
    dtype: str
    cp: int = 1

    def describe(self) -> str:
        return f"tp {self.tp} x cp {self.cp} x pp {self.pp} x dp {self.dp} ({self.nproc} processes), {self.dtype}"


def _divisors_down(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def planned(cfg):
    """The config with its `auto` parallel keys resolved as a dry run resolves them: by the
    planner, for the fewest H100 nodes the config fits on."""
    from launcher.planning.auto import default_world_size, resolve_auto
    from launcher.planning.cluster import assumed_cluster
    from launcher.planning.precision import ASSUMED_GPU

    world = default_world_size(cfg)
    return resolve_auto(cfg, world, assumed_cluster(world), ASSUMED_GPU)[0]


def shrink(path) -> Shrunk:
    given = load_config(path)
    cfg = planned(given)
    m, p = cfg.model, cfg.parallel
    # context parallelism: the planned degree, or 2 where the file leaves it to `auto` (which
    # at the fewest nodes may not need it); tp and pp make room for it first
    cp = max(p.context, 2 if given.parallel.context == "auto" else 1)
    pp = min(p.pipeline, MAX_PROCS // cp)
    tp = next(d for d in _divisors_down(p.tensor) if d * pp * cp <= MAX_PROCS)
    dp = 2 if tp * pp * cp * 2 <= MAX_PROCS else 1  # a second data-parallel rank where it fits: ZeRO shards
    ratio = m.heads // m.n_kv_heads
    kv_heads = tp * max(1, -(-4 // (ratio * tp)))  # a multiple of tp, and at least 4 query heads
    heads = kv_heads * ratio
    hidden = heads * HEAD_DIM
    ffn = max(2 * tp, round(hidden * m.ffn / m.hidden / (2 * tp)) * 2 * tp)  # the file's ffn/hidden ratio
    first_dense = min(m.moe.first_dense, 1) if m.moe is not None else 0
    layers = max(pp, 2, first_dense + 1)  # an MoE model keeps at least one MoE layer
    micro_batches = max(pp, 2)  # per data-parallel rank: enough to fill the pipeline
    dtype = cfg.precision.dtype
    if dtype in ("bf16", "fp16"):
        support = detect_device_support()
        dtype = dtype if getattr(support, dtype) else "fp32"
    else:
        dtype = resolve_dtype(cfg, detect_device_support())
    overrides = {
        "model.layers": layers, "model.hidden": hidden, "model.heads": heads,
        "model.kv_heads": None if m.kv_heads is None else kv_heads, "model.ffn": ffn, "model.vocab": 256,
        "model.seq_len": SEQ_LEN,
        "parallel.tensor": tp, "parallel.pipeline": pp, "parallel.context": cp, "parallel.data": dp,
        "parallel.micro_batch": 1,
        "parallel.global_batch": micro_batches * dp, "parallel.stage_memory_gb": None,
        "precision.dtype": dtype,
        "data.path": "embedded", "data.tokenizer": "byte",
        "train.steps": 4, "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 1,
        "schedule.warmup_steps": 1, "checkpoint.every": 2, "checkpoint.keep_last": 2,
        "compression.warmup_steps": 1,
    }
    if m.moe is not None:  # fewer, smaller experts; the router, balance and shared experts kept
        overrides.update({"model.moe.experts": 4, "model.moe.top_k": min(m.moe.top_k, 2),
                          "model.moe.shared_experts": min(m.moe.shared_experts, 1), "model.moe.ffn": 2 * HEAD_DIM,
                          "model.moe.first_dense": first_dense})
    return Shrunk(overrides=[f"{k}={yaml.safe_dump(v, default_flow_style=True).splitlines()[0]}"
                             for k, v in overrides.items()],
                  nproc=tp * pp * cp * dp, tp=tp, pp=pp, dp=dp, dtype=dtype, cp=cp)

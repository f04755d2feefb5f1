"""Our MoE layer against DeepSpeed's (`deepspeed.moe.layer.MoE`), side by side: the evidence
behind docs/MOE.md's choice not to build on DeepSpeed's MoE support.

    python bench/moe_deepspeed.py [--hidden 256] [--experts 8] [--top-k 2] [--expert-ffn 256]
                                  [--tokens 1024 4096] [--repeats 3]

One process (a gloo group of 1, as DeepSpeed's expert groups need one), CPU or the GPU at
hand, fp32, one MoE layer's forward + backward on the same random tokens, both dropless
(DeepSpeed: `drop_tokens=False`, top-k gating without its random second-expert sampling;
its experts are the same SwiGLU). For each token count: the median time, and the bytes
autograd saves for backward (distinct storages, what a layer's activations cost per
micro-batch). DeepSpeed routes by one-hot dispatch and combine tensors of tokens x experts
x capacity, and dropless makes the capacity the busiest expert's count, so its saved bytes
grow with the square of the tokens; ours sort the tokens by expert (linear).

Ours includes its RMSNorm and residual (DeepSpeed's layer has neither); DeepSpeed's adds its
aux loss to the backward as the launcher's aux-loss balancing does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.config.schema import ModelConfig, MoEConfig  # noqa: E402
from launcher.ds import choose_deepspeed_accelerator  # noqa: E402
from launcher.model.moe import MoE  # noqa: E402
from parallel.tensor_parallel import NO_TP  # noqa: E402


class SwiGLU(nn.Module):
    """One expert, as ours computes it (launcher/model/experts.py swiglu)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves during one forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def _median_ms(step, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 256), ("experts", 8), ("top-k", 2), ("expert-ffn", 256), ("repeats", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    choose_deepspeed_accelerator()
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        theirs = DeepSpeedMoE(args.hidden, SwiGLU(args.hidden, args.expert_ffn), num_experts=args.experts,
                              ep_size=1, k=args.top_k, drop_tokens=False, use_rts=False,
                              top2_2nd_expert_sampling=False).to(device).train()
        cfg = ModelConfig(layers=2, hidden=args.hidden, heads=max(1, args.hidden // 64), ffn=4 * args.hidden,
                          vocab=256, seq_len=max(args.tokens),
                          moe=MoEConfig(experts=args.experts, top_k=args.top_k, ffn=args.expert_ffn))
        ours = MoE(cfg, NO_TP, seed=0, layer=0).to(device).train()
        print(f"device {device}, fp32, one MoE layer fwd+bwd: hidden {args.hidden}, top {args.top_k} of "
              f"{args.experts} experts of ffn {args.expert_ffn}, dropless; median of {args.repeats}")
        print("| tokens | ours ms | DeepSpeed ms | DeepSpeed / ours time | ours saved MiB | DeepSpeed saved MiB |")
        print("|---|---|---|---|---|---|")
        for tokens in args.tokens:
            x = torch.randn(1, tokens, args.hidden, device=device, generator=None)

            def ours_step():
                return ours(x).square().mean()

            def theirs_step():
                out, aux, _ = theirs(x)
                return out.square().mean() + aux

            saved = {name: _saved_bytes(step) for name, step in (("ours", ours_step), ("theirs", theirs_step))}
            ms = {"ours": [], "theirs": []}
            for _ in range(args.repeats):  # alternating, so machine noise hits both
                for name, step in (("ours", ours_step), ("theirs", theirs_step)):
                    ms[name].append(_median_ms(step, device, 1))
            ours_ms, theirs_ms = statistics.median(ms["ours"]), statistics.median(ms["theirs"])
            print(f"| {tokens:,} | {ours_ms:.1f} | {theirs_ms:.1f} | {theirs_ms / ours_ms:.2f} | "
                  f"{saved['ours'] / 2**20:.1f} | {saved['theirs'] / 2**20:.1f} |")
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

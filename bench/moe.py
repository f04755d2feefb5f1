"""MoE against dense, side by side: tokens/s of an MoE model against a dense model with the
same active parameters, and what the dropless dispatch costs.

    python bench/moe.py [--hidden 256] [--layers 4] [--experts 8] [--top-k 2] [--expert-ffn 256]
                        [--shared 0] [--seq 256] [--batch 4] [--repeats 5]

One process, the device at hand (CUDA when visible, else CPU), fp32, forward + backward of
the launcher's own model (launcher.model: LlamaModel from layer_specs, as training builds it
at pipeline 1, tensor 1) on the same random batch:

    dense   model.ffn = top_k x expert_ffn + shared x expert_ffn: the FFN matmuls one token
            goes through in the MoE (the router's E x H is the only extra active weight)
    moe     the MoE, dropless
    moe cf1 the MoE with capacity_factor 1.0 (tokens past an expert's even share dropped)

Runs alternate (dense, moe, moe cf1, then again) so machine noise hits all; a row's figure
is the median over repeats. `dispatch share` is the part of one MoE layer's forward +
backward spent outside the experts' own matmuls (routing, sort, gather, weighted scatter):
1 - (the experts alone on the same token counts) / (the whole layer).

`all-to-all bytes`: one MoE layer's forward + backward with expert parallelism over 2 tp
ranks (2 gloo processes, the same tokens): the bytes of hidden states each rank sent to the
other rank, counted at torch.distributed.all_to_all_single, against the planner's
`parallel.costs.moe_all_to_all_bytes` (which assumes evenly spread routing).
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
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.config.schema import ModelConfig, MoEConfig  # noqa: E402
from launcher.ds import choose_deepspeed_accelerator  # noqa: E402
from launcher.model.llama import LlamaModel, layer_specs  # noqa: E402
from launcher.model.experts import run_experts  # noqa: E402
from launcher.model.moe import MoE, MoEState, route  # noqa: E402
from parallel.costs import moe_all_to_all_bytes  # noqa: E402
from parallel.tensor_parallel import NO_TP, TensorParallel  # noqa: E402


def _model(cfg: ModelConfig, device) -> LlamaModel:
    return LlamaModel(layer_specs(cfg, NO_TP, seed=0, moe_state=MoEState.build(cfg, device))).to(device).train()


def _time(fn, device, reps: int = 3) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def _step(model, ids):
    def run():
        model.zero_grad(set_to_none=True)
        model(ids).float().square().mean().backward()
    return run


def _dispatch_share(cfg: ModelConfig, ids_shape, device) -> float:
    """One MoE layer: the whole layer's forward + backward against its experts alone, run as
    the layer runs them (`run_experts`: grouped matrix multiplies where torch has them) on
    tokens already sorted by expert. Noise can make it slightly negative at tiny sizes."""
    layer = MoE(cfg, NO_TP, seed=0, layer=cfg.moe.first_dense).to(device).train()
    x = torch.randn(*ids_shape, cfg.hidden, device=device, requires_grad=True)

    def whole():
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    with torch.no_grad():
        h = layer.norm(x).reshape(-1, cfg.hidden)
        counts = route(h @ layer.router.weight.T, cfg.moe).counts.tolist()
    sorted_tokens = torch.randn(sum(counts), cfg.hidden, device=device)
    w = layer.experts

    def experts_only():
        layer.zero_grad(set_to_none=True)
        run_experts(sorted_tokens, counts, (w.w_gate, w.w_up, w.w_down)).square().sum().backward()

    return 1.0 - _time(experts_only, device) / _time(whole, device)


def _count_all_to_all(rank: int, cfg: ModelConfig, shape, init: str, out, over_data: bool) -> None:
    """One rank of 2: the MoE layer with its experts split over the 2 ranks, forward +
    backward; the hidden-state bytes this rank sent to the other. `over_data`: the 2 ranks
    are data ranks (each routes all of its own tokens), else tp ranks (each routes half of
    the same tokens)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    sent = [0]
    original = dist.all_to_all_single

    def counting(output, tensor, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if tensor.is_floating_point() and input_split_sizes:
            row = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
            sent[0] += sum(n for r, n in enumerate(input_split_sizes) if r != rank) * row
        return original(output, tensor, output_split_sizes, input_split_sizes, *args, **kwargs)

    dist.all_to_all_single = counting
    group = TensorParallel(dist.group.WORLD, rank, 2)
    layer = (MoE(cfg, NO_TP, seed=0, layer=0, ep=group) if over_data else MoE(cfg, group, seed=0, layer=0)).train()
    seed = rank if over_data else 0
    x = torch.randn(*shape, cfg.hidden, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    layer(x).square().mean().backward()
    out.put((rank, sent[0]))
    dist.destroy_process_group()


def all_to_all_bytes(cfg: ModelConfig, shape, over_data: bool = False) -> tuple[float, float]:
    """(measured bytes sent off-rank per rank, mean of the 2 ranks; the planner's formula)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_count_all_to_all, args=(cfg, shape, f"file://{tmp}/store", queue, over_data), nprocs=2)
    sent = [queue.get()[1] for _ in range(2)]
    tp, ep = (1, 2) if over_data else (2, 2)
    return sum(sent) / 2, moe_all_to_all_bytes(cfg, tp, shape[0] * shape[1], 4, full_recompute=False, ep=ep)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 256), ("layers", 4), ("experts", 8), ("top-k", 2), ("expert-ffn", 256),
                          ("shared", 0), ("seq", 256), ("batch", 4), ("repeats", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    choose_deepspeed_accelerator()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shape = dict(layers=args.layers, hidden=args.hidden, heads=max(1, args.hidden // 64), vocab=256,
                 seq_len=args.seq)
    active_ffn = (args.top_k + args.shared) * args.expert_ffn
    moe = MoEConfig(experts=args.experts, top_k=args.top_k, shared_experts=args.shared, ffn=args.expert_ffn)
    configs = {"dense": ModelConfig(**shape, ffn=active_ffn),
               "moe": ModelConfig(**shape, ffn=active_ffn, moe=moe),
               "moe cf1": ModelConfig(**shape, ffn=active_ffn, moe=MoEConfig(**{**moe.__dict__, "capacity_factor": 1.0}))}
    models = {name: _model(cfg, device) for name, cfg in configs.items()}
    ids = torch.randint(0, 256, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(_time(_step(model, ids), device))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, fp32, {args.layers} layers, hidden {args.hidden}, {args.batch} x {args.seq} tokens; "
          f"MoE top {args.top_k} of {args.experts} experts of ffn {args.expert_ffn} + {args.shared} shared; dense ffn "
          f"{active_ffn} (the same active FFN parameters); median of {args.repeats} alternating repeats")
    print("| model | params | tokens/s (fwd+bwd) | vs dense |")
    print("|---|---|---|---|")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {tokens / median[name]:,.0f} | {median['dense'] / median[name]:.3f} |")
    share = _dispatch_share(configs["moe"], (args.batch, args.seq), device)
    print(f"dispatch share of one dropless MoE layer's forward + backward (routing, sort, gather, scatter): "
          f"{100 * share:.0f}%")
    for over_data, ranks in ((False, "2 tp ranks"), (True, "2 data ranks")):
        measured, predicted = all_to_all_bytes(configs["moe"], (args.batch, args.seq), over_data)
        print(f"all-to-all bytes per rank, one MoE layer fwd+bwd, experts over {ranks}: measured {measured:,.0f}, "
              f"planner {predicted:,.0f} (ratio {measured / predicted:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

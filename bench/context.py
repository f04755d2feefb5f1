"""Context parallelism, measured: what one rank keeps for backward, and the step time, at
context degrees 1, 2 and 4 on the same sequence.

    python bench/context.py [--seq 4096] [--hidden 256] [--heads 8] [--kv-heads 2] [--layers 2]
                            [--contexts 1 2 4] [--recompute none selective] [--repeats 3]

For each context degree C: C gloo processes (one thread each) run the launcher's own model
(launcher.model: layer_specs with BlockOptions.context over the C ranks, as training builds
it at tensor 1, pipeline 1) on one sequence of --seq tokens, each on its chunks i and
2C-1-i, in fp32:

    saved MiB     bytes of the distinct storages autograd keeps for backward on one rank
                  over one forward and the loss (weights and the RoPE tables left out),
                  the largest rank's; against the planner's per-rank activations
                  (parallel.costs.item_costs with context=C)
    CPU mask MiB  of those, the dense (T/C) x T mask the CPU path of the attention hands
                  SDPA (kept as fp32 for backward when the core is not recomputed); the
                  CUDA path (FlexAttention) stores no mask, so the planner leaves it out and
                  the ratio is taken without it
    step ms       one forward + backward, the median over --repeats, the slowest rank's
    vs C=1        that time over C=1's in the same run

A second table weighs the two ways to move keys and values (docs/CONTEXT.md), at each
C > 1, on the same K/V blocks (this rank's T/C positions of keys and values):

    all-gather ms   one all_gather_into_tensor of them over the C ranks (what the launcher does)
    ring ms         C-1 steps, each sending the block in hand to the next rank and receiving
                    from the previous one (ring attention's exchange, without its overlap)
    attention ms    the local attention core, forward + backward, on the gathered keys and
                    values: the compute a ring could hide its steps behind

On a CPU of few cores C processes share them: the step-time column shows the exchange and
the per-rank overheads, not a GPU's scaling (docs/BENCHMARKS.md).
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

from launcher.config.schema import ModelConfig  # noqa: E402
from launcher.model.attention import Attention  # noqa: E402
from launcher.model.layers import BlockOptions  # noqa: E402
from launcher.model.llama import LlamaModel, LossFn, layer_specs  # noqa: E402
from parallel.context import _dense_mask_attention, chunk_positions, local_chunks  # noqa: E402
from parallel.costs import item_costs  # noqa: E402
from parallel.tensor_parallel import NO_TP, TensorParallel  # noqa: E402


def _saved_bytes(model: LlamaModel, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """Distinct storages saved for backward in one forward and the loss, less the persistent
    ones (weights, RoPE tables): what the planner calls activations."""
    persistent = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, Attention) and module._rope is not None:
            persistent |= {t.untyped_storage().data_ptr() for t in module._rope}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in persistent:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss_fn(model(ids), targets)
    return sum(seen.values())


def _rank(rank: int, size: int, init: str, cfg: ModelConfig, recompute: str, repeats: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    cp = TensorParallel(dist.group.WORLD, rank, size) if size > 1 else NO_TP
    model = LlamaModel(layer_specs(cfg, NO_TP, seed=0, options=BlockOptions(recompute=recompute, context=cp)))
    model.loss_fn = LossFn(NO_TP, cp)
    tokens = torch.randint(0, cfg.vocab, (1, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    ids, targets = local_chunks(tokens[:, :-1], cp), local_chunks(tokens[:, 1:], cp)
    with torch.no_grad():
        model(ids)  # builds the RoPE tables, which live as long as the model
    saved = _saved_bytes(model, ids, targets)
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        start = time.perf_counter()
        model.loss_fn(model(ids), targets).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    exchange = _exchange_ms(cfg, cp, repeats) if size > 1 else (0.0, 0.0, 0.0)
    figures = torch.tensor([float(saved), statistics.median(times[1:]), *exchange], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put(tuple(figures.tolist()))
    dist.destroy_process_group()


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def _exchange_ms(cfg: ModelConfig, cp: TensorParallel, repeats: int) -> tuple[float, float, float]:
    """(all-gather, ring, local attention fwd+bwd) milliseconds for one layer's keys and values."""
    head_dim, local = cfg.hidden // cfg.heads, cfg.seq_len // cp.size
    block = torch.randn(2, cfg.kv_heads, local, head_dim)  # this rank's keys and values
    gathered = torch.empty(cp.size * 2, cfg.kv_heads, local, head_dim)
    gather = _median_ms(lambda: dist.all_gather_into_tensor(gathered, block), repeats)

    def ring():
        held, nxt, prv = block, (cp.rank + 1) % cp.size, (cp.rank - 1) % cp.size
        for _ in range(cp.size - 1):
            incoming = torch.empty_like(held)
            ops = [dist.P2POp(dist.isend, held, nxt), dist.P2POp(dist.irecv, incoming, prv)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            held = incoming

    q = torch.randn(1, cfg.heads, local, head_dim, requires_grad=True)
    keys, values = (torch.randn(1, cfg.kv_heads, cfg.seq_len, head_dim, requires_grad=True) for _ in range(2))
    mine = chunk_positions(cfg.seq_len, cp)
    attend = lambda: _dense_mask_attention(q, keys, values, mine, None, True).sum().backward()  # noqa: E731
    return gather, _median_ms(ring, repeats), _median_ms(attend, repeats)


def measure(cfg: ModelConfig, size: int, recompute: str, repeats: int) -> tuple[float, float]:
    """(largest rank's saved bytes, slowest rank's median step seconds) at context degree `size`."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_rank, args=(r, size, init, cfg, recompute, repeats, out)) for r in range(size)]
        for p in procs:
            p.start()
        result = out.get(timeout=600)
        for p in procs:
            p.join()
            if p.exitcode:
                raise SystemExit(f"bench/context.py: a rank of context {size} exited {p.exitcode}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--recompute", nargs="+", default=["none", "selective"], choices=["none", "selective"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if any(args.seq % (2 * c) for c in args.contexts if c > 1):
        parser.error(f"--seq {args.seq} must be divisible by 2 x every context degree {args.contexts}")
    cfg = ModelConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=args.hidden * 8 // 3 // 8 * 8, vocab=256, seq_len=args.seq)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, "
          f"one sequence of {args.seq} tokens, fp32, {os.cpu_count()} CPUs")
    print("| recompute | C | saved MiB (measured) | CPU mask MiB | planner MiB | (measured - mask) / planner | "
          "step ms | vs C=1 |")
    print("|---|---|---|---|---|---|---|---|")
    exchanges = {}
    for recompute in args.recompute:
        base = None
        for size in args.contexts:
            saved, step, *exchanges[size] = measure(cfg, size, recompute, args.repeats)
            planned = sum(c.act_bytes for c in item_costs(cfg, 1, 1, 4, recompute, False, context=size))
            mask = 4 * args.layers * (args.seq // size) * args.seq if size > 1 and recompute == "none" else 0
            base = step if base is None else base
            print(f"| {recompute} | {size} | {saved / 2**20:.2f} | {mask / 2**20:.2f} | {planned / 2**20:.2f} | "
                  f"{(saved - mask) / planned:.3f} | {1e3 * step:.1f} | {step / base:.2f} |")
    print()
    print("| C | K/V MiB per rank per layer | all-gather ms | ring ms | ring / all-gather | attention ms (fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    for size in (c for c in args.contexts if c > 1):
        gather, ring, attention = exchanges[size]
        mib = 2 * args.kv_heads * (args.seq // size) * (args.hidden // args.heads) * 4 / 2**20
        print(f"| {size} | {mib:.2f} | {gather:.2f} | {ring:.2f} | {ring / gather:.2f} | {attention:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

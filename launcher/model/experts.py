"""The experts of an MoE item (launcher/model/moe.py): the tokens sorted by expert, each
expert run on its contiguous slice (grouped matrix multiplies where torch runs them, else one
autograd node over a loop: `run_experts`), capacity, and expert parallelism over the tensor
and data ranks (the tokens sent to their expert's rank and back by all-to-all). docs/MOE.md
has the design and why.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.config.schema import MoEConfig
from parallel.tensor_parallel import NO_TP, TensorParallel


@dataclass(frozen=True)
class Routing:
    """One micro-batch's routing of N tokens: the chosen experts (N, top_k), their weights
    (N, top_k), every expert's probability (N, E) (what the aux loss averages), in fp32, and
    the assignments per expert (E,), counted once for dispatch, capacity and the aux loss."""

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class _Experts(torch.autograd.Function):
    """(Where grouped matrix multiplies do not run.) Every expert's SwiGLU on its contiguous
    slice of the sorted tokens, as ONE autograd node whose backward returns whole (E, ..)
    gradients of the stacked weights (zero rows for experts without tokens). Written by hand
    because with one node per expert the graph's shape, and so the order in which parameter
    gradients become ready, would depend on the routing: tp ranks routing different tokens
    would then run their gradient hooks' all-reduces (and ZeRO its buckets) in different
    orders. Here the order is the same on every rank."""

    @staticmethod
    def forward(ctx, x, counts: list, w_gate, w_up, w_down):
        gates, ups, outs = [], [], []
        for e, chunk in enumerate(x.split(counts)):
            gates.append(F.linear(chunk, w_gate[e]))
            ups.append(F.linear(chunk, w_up[e]))
            outs.append(F.linear(F.silu(gates[-1]) * ups[-1], w_down[e]))
        ctx.counts = counts
        gate, up = torch.cat(gates), torch.cat(ups)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_y):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        grads = [torch.zeros_like(w) for w in (w_gate, w_up, w_down)]
        grad_x = torch.empty_like(x)
        at = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                continue
            rows = slice(at, at + n)
            at += n
            g, u, gy, xe = gate[rows], up[rows], grad_y[rows], x[rows]
            sig = torch.sigmoid(g)
            act = g * sig  # silu(g)
            grads[2][e] = gy.t() @ (act * u)  # w_down: (H, f)
            grad_a = gy @ w_down[e]  # (n, f)
            grad_u = grad_a * act
            grad_g = grad_a * u * sig * (1 + g * (1 - sig))  # silu'(g)
            grads[0][e] = grad_g.t() @ xe
            grads[1][e] = grad_u.t() @ xe
            grad_x[rows] = grad_g @ w_gate[e] + grad_u @ w_up[e]
        return grad_x, None, *grads


def _offsets(counts: list, device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


class _GroupedExperts(torch.autograd.Function):
    """`_Experts` in grouped matrix multiplies (torch._grouped_mm: one kernel for all experts
    on a GPU): gate, up and down forward; the same backward as `_Experts`, also grouped (the
    weight gradients group along the token dimension). Hand-written rather than torch's
    autograd of _grouped_mm, which saves the activation and the product too: twice the
    expert intermediates (tests/test_plan.py measures what is saved against the planner)."""

    @staticmethod
    def forward(ctx, x, counts: list, w_gate, w_up, w_down):
        offs = _offsets(counts, x.device)
        gate = torch._grouped_mm(x, w_gate.transpose(1, 2), offs=offs)
        up = torch._grouped_mm(x, w_up.transpose(1, 2), offs=offs)
        ctx.counts = counts
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad_y):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        if x.shape[0] == 0:
            return torch.zeros_like(x), None, torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
        offs = _offsets(ctx.counts, x.device)
        grad_y = grad_y.contiguous()
        sig = torch.sigmoid(gate)
        act = gate * sig  # silu(gate)
        grad_w_down = torch._grouped_mm(grad_y.t(), act * up, offs=offs)  # (E, H, f)
        grad_a = torch._grouped_mm(grad_y, w_down, offs=offs)  # (N, f)
        grad_u = grad_a * act
        grad_g = grad_a * up * sig * (1 + gate * (1 - sig))  # silu'(gate)
        grad_x = torch._grouped_mm(grad_g, w_gate, offs=offs) + torch._grouped_mm(grad_u, w_up, offs=offs)
        return (grad_x, None, torch._grouped_mm(grad_g.t(), x, offs=offs), torch._grouped_mm(grad_u.t(), x, offs=offs),
                grad_w_down)


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm (private, torch >= 2.8) runs `_GroupedExperts` forward and
    backward here: on CPU in fp32/bf16/fp16, on CUDA where the architecture has its kernels
    (Hopper and later). Probed once per device and dtype on a tiny problem (every rank of a
    run answers alike), in a thread of its own: the first call may come from inside a forward
    under activation checkpointing, whose saved-tensor hooks (per thread) must not see it."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_probe_grouped_mm, device, dtype).result()


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        x, w_gate, w_up = (torch.ones(*shape, device=device, dtype=dtype, requires_grad=True)
                           for shape in ((4, 8), (2, 8, 8), (2, 8, 8)))
        w_down = torch.ones(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
        y = _GroupedExperts.apply(x, [1, 3], w_gate, w_up, w_down)
        y.backward(torch.ones_like(y))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def run_experts(x: torch.Tensor, counts: list, weights: tuple, grouped: Optional[bool] = None) -> torch.Tensor:
    """Each expert's SwiGLU on its contiguous slice of x (`counts` rows each): grouped matrix
    multiplies where torch runs them for this device, dtype and shape (its kernels want
    16-byte aligned rows and addresses), else the loop of `_Experts`. `grouped` forces the
    choice (tests)."""
    if grouped is None:
        rows_aligned = all(t.shape[-1] * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
                           for t in (x, *weights))  # weights may be views into ZeRO's flat buffers
        grouped = rows_aligned and all(w.dtype == x.dtype for w in weights) and grouped_mm_runs(x.device, x.dtype)
    return (_GroupedExperts if grouped else _Experts).apply(x, counts, *weights)


def dispatch(h: torch.Tensor, routing: Routing, weights: tuple, capacity: Optional[int] = None,
             earlier: Optional[torch.Tensor] = None,
             ep: TensorParallel = NO_TP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_k weight_tk * expert_{e_tk}(h_t) for the N tokens h (N, H), the experts' stacked
    `weights` (w_gate, w_up, w_down): tokens sorted by expert (stable: token order within
    each), each expert run on its contiguous slice (`run_experts`); with `ep`, the experts are
    split over the expert-parallel ranks and the tokens travel to their expert's rank and back
    (`_on_expert_ranks`). With `capacity`, each expert keeps its first `capacity` assignments, counting
    `earlier` (E,) assignments made before these tokens (by the tp ranks holding earlier
    positions). Returns (out (N, H), counts per expert before drops (E,), dropped ())."""
    top_k = routing.experts.shape[1]
    flat = routing.experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = routing.counts
    token = order // top_k
    weight = routing.weights.reshape(-1)[order]
    dropped = torch.zeros((), dtype=torch.int64, device=h.device)
    if capacity is not None:
        earlier = torch.zeros_like(counts) if earlier is None else earlier
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(flat.numel(), device=h.device) - (starts - earlier).repeat_interleave(counts)
        keep = position < capacity
        dropped = (~keep).sum()
        token, weight = token[keep], weight[keep]
        kept_counts = torch.minimum((capacity - earlier).clamp(min=0), counts)
    else:
        kept_counts = counts
    if ep.size > 1:
        y = _on_expert_ranks(h[token], kept_counts, weights, ep)
    else:
        y = run_experts(h[token], kept_counts.tolist(), weights)
    out = torch.zeros_like(h).index_add_(0, token, (y.float() * weight[:, None]).to(h.dtype))
    return out, counts, dropped


class _AllToAll(torch.autograd.Function):
    """Rows of x to each expert-parallel rank (`send` rows each, in rank order), `receive` rows from each;
    backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, receive: list, send: list, ep: TensorParallel):
        ctx.receive, ctx.send, ctx.ep = receive, send, ep
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=ep.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive, group=ctx.ep.group)
        return out, None, None, None


def _on_expert_ranks(x: torch.Tensor, counts: torch.Tensor, weights: tuple, ep: TensorParallel) -> torch.Tensor:
    """Expert parallelism: expert rank r holds experts [r E/ep, (r+1) E/ep). The
    tokens x, sorted by expert (`counts` (E,) each), go to their expert's rank (the counts
    first, then the tokens: two all-to-alls), are regrouped there by expert, run, and come
    back in their order (one all-to-all)."""
    local = counts.numel() // ep.size
    send = counts.view(ep.size, local)  # row d: what this rank sends to rank d, per expert of d
    received = torch.empty_like(send)  # row s: what rank s sends here, per local expert
    dist.all_to_all_single(received, send.contiguous(), group=ep.group)
    to_each, from_each = send.sum(1).tolist(), received.sum(1).tolist()
    arrived = _AllToAll.apply(x, from_each, to_each, ep)  # by source rank, then by local expert
    block = torch.repeat_interleave(torch.arange(received.numel(), device=x.device), received.reshape(-1))
    by_expert = torch.argsort((block % local) * ep.size + block // local, stable=True)
    y = run_experts(arrived[by_expert], received.sum(0).tolist(), weights)
    return _AllToAll.apply(y[torch.argsort(by_expert)], to_each, from_each, ep)


def earlier_assignments(routing: Routing, tp: TensorParallel) -> Optional[torch.Tensor]:
    """Per expert, the assignments the lower tp ranks (earlier positions) made in this
    micro-batch: one all-gather of E counts, so capacity drops do not depend on tp."""
    if tp.size == 1:
        return None
    every = [torch.empty_like(routing.counts) for _ in range(tp.size)]
    dist.all_gather(every, routing.counts, group=tp.group)
    return sum(every[:tp.rank], torch.zeros_like(routing.counts))


def expert_capacity(moe: MoEConfig, tokens: int) -> Optional[int]:
    if moe.capacity_factor is None:
        return None
    return math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.experts)

"""The MoE layer (launcher/model/moe.py) against a naive per-token reference, in fp32."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from launcher.config.schema import ModelConfig, MoEConfig
from launcher.model.moe import MoE, MoEState, aux_loss, route
from parallel.tensor_parallel import NO_TP


def _model(**moe) -> ModelConfig:
    return ModelConfig(layers=2, hidden=16, heads=2, ffn=24, vocab=64, seq_len=8,
                       moe=MoEConfig(**{"experts": 6, "top_k": 2, "ffn": 8, **moe}))


def _reference(layer: MoE, x: torch.Tensor, bias=None) -> torch.Tensor:
    """Token by token: each token's top_k experts by (score + bias), weighted by its
    normalised scores; every expert's tokens in position-major order (position 0 of every
    sequence, then 1, ...) up to its capacity."""
    moe = layer.moe
    tokens = layer.norm(x).transpose(0, 1).reshape(-1, x.shape[-1])
    capacity = math.inf if moe.capacity_factor is None else math.ceil(
        moe.capacity_factor * tokens.shape[0] * moe.top_k / moe.experts)
    taken = [0] * moe.experts
    out = torch.zeros_like(tokens)
    w = layer.experts
    for t, h in enumerate(tokens):
        logits = layer.router.weight @ h
        scores = logits.softmax(-1) if moe.router == "softmax" else logits.sigmoid()
        choice = scores + (bias if bias is not None else 0)
        chosen = sorted(range(moe.experts), key=lambda e: -choice[e].item())[:moe.top_k]
        total = sum(scores[e] for e in chosen)
        for e in chosen:
            taken[e] += 1
            if taken[e] <= capacity:
                y = F.silu(w.w_gate[e] @ h) * (w.w_up[e] @ h)
                out[t] += scores[e] / total * (w.w_down[e] @ y)
        if layer.shared is not None:
            s = layer.shared
            out[t] += s.w_down @ (F.silu(s.w_gate @ h) * (s.w_up @ h))
    return x + out.view(x.shape[1], x.shape[0], -1).transpose(0, 1)


@pytest.mark.parametrize("moe", [
    {},  # Mixtral: softmax, no shared experts, dropless
    {"router": "sigmoid", "shared_experts": 2, "balance": "bias"},  # DeepSeek-V3
    {"capacity_factor": 1.0},  # tokens past capacity dropped
    {"top_k": 6, "shared_experts": 1},  # every expert chosen
])
def test_layer_equals_per_token_reference(moe):
    cfg = _model(**moe)
    state = MoEState.build(cfg)
    state.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    layer = MoE(cfg, NO_TP, seed=7, layer=1, state=state).train()
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    bias = state.bias[state.row(1)] if cfg.moe.balance == "bias" else None
    with torch.no_grad():
        expected = _reference(layer, x, bias)
    got = layer(x)
    assert (got - expected).abs().max().item() < 1e-6
    figures = state.after_step()
    assert figures["moe.1.load_max_over_mean"] >= 1.0
    dropped = figures["moe.1.dropped_fraction"]
    assert (dropped > 0) == (cfg.moe.capacity_factor is not None)


def test_capacity_drops_are_counted_exactly():
    cfg = _model(capacity_factor=0.5, experts=4, top_k=1)
    state = MoEState.build(cfg)
    layer = MoE(cfg, NO_TP, seed=1, layer=0, state=state).train()
    with torch.no_grad():  # every token to expert 2: capacity ceil(0.5 * 24 / 4) = 3 of 24 kept
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(3, 8, 16) + 0.1
    layer(x)
    figures = state.after_step()
    assert figures["moe.0.dropped_fraction"] == pytest.approx(21 / 24)
    assert figures["moe.0.load_max_over_mean"] == pytest.approx(4.0)


def test_evaluation_is_dropless():
    """Capacity drops tokens in training only: in eval a token's output is its own."""
    cfg = _model(capacity_factor=0.5)
    layer = MoE(cfg, NO_TP, seed=4, layer=0).eval()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    dropless = MoE(_model(), NO_TP, seed=4, layer=0).eval()
    with torch.no_grad():
        assert torch.equal(layer(x), dropless(x))
        assert not torch.equal(layer.train()(x), dropless(x))


def test_aux_loss_enters_backward_scaled_like_the_loss():
    """The layer's gradients equal those of (loss + aux) x scale computed in one graph."""
    cfg = _model(aux_loss_coef=0.5, shared_experts=1)
    state = MoEState.build(cfg)
    state.aux_grad_scale = 0.25
    layer = MoE(cfg, NO_TP, seed=2, layer=0, state=state).train()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    (layer(x).square().mean() * 0.25).backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    h = layer.norm(x).reshape(-1, 16)
    routing = route(F.linear(h, layer.router.weight), cfg.moe)
    state.aux_grad_scale = 1.0
    layer.moe = MoEConfig(**{**cfg.moe.__dict__, "balance": "none"})
    total = layer(x).square().mean() + aux_loss(routing, cfg.moe.aux_loss_coef)
    (total * 0.25).backward()
    for name, param in layer.named_parameters():
        assert torch.allclose(param.grad, got[name], atol=1e-7), name
    assert got["router.weight"].abs().sum() > 0


def test_bias_moves_against_the_load_identically_from_counts():
    cfg = _model(balance="bias", bias_rate=0.1, experts=4, top_k=1)
    state = MoEState.build(cfg)
    state.counts[0] = torch.tensor([10.0, 0.0, 2.0, 4.0])  # mean 4
    figures = state.after_step()
    assert state.bias[0].tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.0])
    assert figures["moe.0.bias_spread"] == pytest.approx(0.2)
    saved = state.state_dict()
    other = MoEState.build(cfg)
    other.load_state_dict(saved)
    assert torch.equal(other.bias, state.bias)


@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped_mm"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0]], ids=["an_empty_expert", "no_token"])
def test_experts_forward_and_backward_equal_autograd_through_a_plain_loop(grouped, counts):
    """Both ways of running the experts (the hand-written backward of `_Experts`, and torch's
    grouped matrix multiplies) against autograd through a plain per-expert loop, with an
    expert that gets no token and with no token at all."""
    from launcher.model.experts import run_experts, swiglu

    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(4, 8, 16, generator=gen), torch.randn(4, 8, 16, generator=gen),
               torch.randn(4, 16, 8, generator=gen)]
    x = torch.randn(sum(counts), 16, generator=gen)
    grad = torch.randn(sum(counts), 16, generator=gen)
    ours = [t.clone().requires_grad_() for t in (x, *weights)]
    y = run_experts(ours[0], counts, tuple(ours[1:]), grouped=grouped)
    y.backward(grad)
    plain = [t.clone().requires_grad_() for t in (x, *weights)]
    chunks = plain[0].split(counts)
    expected = torch.cat([swiglu(c, plain[1][e], plain[2][e], plain[3][e]) for e, c in enumerate(chunks)])
    expected.backward(grad)
    assert torch.allclose(y, expected, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours, plain):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[1].grad[1], torch.zeros(8, 16))  # the expert without tokens


def test_grouped_matrix_multiplies_are_used_only_where_they_run(monkeypatch):
    """fp32 with 16-byte rows on this CPU: grouped (torch 2.13 has CPU kernels). float64 (no
    kernel) and rows of 6 floats (24 bytes) fall back to the loop, with the same result."""
    from launcher.model import experts

    assert experts.grouped_mm_runs(torch.device("cpu"), torch.float32)
    assert not experts.grouped_mm_runs(torch.device("cpu"), torch.float64)
    chosen, real = [], experts._GroupedExperts

    class Recording(real):
        @staticmethod
        def forward(ctx, *args):
            chosen.append(True)
            return real.forward(ctx, *args)

    monkeypatch.setattr(experts, "_GroupedExperts", Recording)
    for hidden, dtype, grouped in [(16, torch.float32, True), (16, torch.float64, False), (6, torch.float32, False)]:
        chosen.clear()
        w = (torch.randn(2, 8, hidden, dtype=dtype), torch.randn(2, 8, hidden, dtype=dtype),
             torch.randn(2, hidden, 8, dtype=dtype))
        x = torch.randn(5, hidden, dtype=dtype)
        y = experts.run_experts(x, [2, 3], w)
        assert chosen == ([True] if grouped else []), (hidden, dtype)
        assert torch.allclose(y, experts.run_experts(x, [2, 3], w, grouped=False), atol=1e-6)


@pytest.mark.parametrize("overrides,refusal", [
    (["parallel.tensor=2", "parallel.expert=3"], r"^parallel.expert: 3: .* a multiple of parallel.tensor=2$"),
    (["parallel.tensor=2", "parallel.expert=4", "zero.stage=3"], r"^parallel.expert: 4 above .* ZeRO 0-2$"),
    (["parallel.tensor=1", "parallel.expert=16"], r"^model.moe.experts: 8 is not divisible by parallel.expert=16"),
])
def test_expert_degree_is_checked_before_launch(overrides, refusal):
    """parallel.expert: tp x a divisor of dp (the dp half needs the world size: tests/test_topology.py)."""
    from launcher.cli import DEFAULT_CONFIG
    from launcher.config.load import load_config
    from launcher.errors import ConfigError

    moe = ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.ffn=16", "parallel.pipeline=1"]
    with pytest.raises(ConfigError) as err:
        load_config(str(DEFAULT_CONFIG), [*moe, *overrides])
    assert re.match(refusal, str(err.value)), str(err.value)
    assert load_config(str(DEFAULT_CONFIG), [*moe, "parallel.tensor=2", "parallel.expert=8"]).parallel.expert == 8

"""Document attention and the eod loss mask for packed samples: a packed sample computes
what its documents compute alone, the plain path is unchanged bit for bit, the CUDA branch
(FlexAttention) computes what the CPU branch (dense-mask SDPA) computes, and DeepSpeed's
engines (tuples between pipeline stages) compute the single-process losses."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from torch.nn.attention.flex_attention import create_block_mask

from launcher.config.schema import (
    Config,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
    ZeroConfig,
)
from launcher.model.attention import Attention
from launcher.model.documents import (
    document_attention,
    document_positions,
    flex_document_attention,
    same_document_causal,
    sdpa_document_attention,
)
from launcher.model.layers import apply_rope, rope_cos_sin
from launcher.model.llama import LlamaModel, LossFn, layer_specs
from launcher.training.optim import build_optimizer, build_scheduler
from parallel.tensor_parallel import NO_TP, vocab_parallel_cross_entropy

MHA = ModelConfig(layers=2, hidden=32, heads=4, ffn=64, vocab=64, seq_len=16)
GQA = ModelConfig(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, vocab=64, seq_len=16)
DOCS = [[5, 7, 4], [9, 3, 4]]  # document lengths in each packed sample (T = 16)


def segments_of(docs: list[list[int]]) -> torch.Tensor:
    """(B, T) document index of each position, as the data loader hands it over."""
    return torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in docs])


def packed_batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    segments = segments_of(DOCS)
    ids = torch.randint(0, vocab, segments.shape, generator=gen)
    targets = torch.randint(0, vocab, segments.shape, generator=gen)
    return ids, segments, targets


def documents(docs: list[list[int]]):
    """(sample, start, end) of every document."""
    for b, lengths in enumerate(docs):
        start = 0
        for n in lengths:
            yield b, start, start + n
            start += n


def test_positions_restart_at_each_document():
    assert document_positions(segments_of([[3, 2, 1], [1, 5]])).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("cfg", [MHA, GQA, ModelConfig(**{**GQA.__dict__, "tie_embeddings": True})],
                         ids=["mha", "gqa", "gqa_tied"])
def test_packed_documents_compute_what_each_document_computes_alone(cfg):
    """Per-token losses (and so their sum), and the gradient of the sum, equal those of each
    document run as a sample of its own (positions from 0, nothing before it)."""
    model = LlamaModel(layer_specs(cfg, NO_TP, seed=7))
    ids, segments, targets = packed_batch(cfg.vocab, seed=1)
    packed = vocab_parallel_cross_entropy(model((ids, segments)), targets, NO_TP)  # (B, T)
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total = 0.0
    for b, start, end in documents(DOCS):
        alone = vocab_parallel_cross_entropy(model(ids[b:b + 1, start:end]), targets[b:b + 1, start:end], NO_TP)
        alone.sum().backward()  # gradients accumulate over the documents
        torch.testing.assert_close(packed[b, start:end], alone[0].detach(), rtol=0, atol=1e-5)
        total += alone.double().sum().item()
    assert abs(packed.detach().double().sum().item() - total) < 1e-5  # summed in fp64: fp32's ulp at ~130 is 1.5e-5
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=0, atol=1e-5, msg=f"grad of {name}")

    with torch.no_grad():  # and the mask matters: without segments later documents see earlier ones
        plain = vocab_parallel_cross_entropy(model(ids), targets, NO_TP)
    assert (plain[:, DOCS[0][0]:] - packed.detach()[:, DOCS[0][0]:]).abs().max() > 1e-3


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward as it was before document attention, verbatim."""
    B, T, _ = x.shape
    h = attn.norm(x)
    q = attn.wq(h).view(B, T, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.wk(h).view(B, T, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.wv(h).view(B, T, attn.kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = rope_cos_sin(T, attn.head_dim, attn.rope_theta, x.device)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.kv_heads != attn.heads)
    return x + attn.wo(out.transpose(1, 2).reshape(B, T, attn.heads * attn.head_dim))


def test_without_segments_the_path_is_unchanged():
    model = LlamaModel(layer_specs(GQA, NO_TP, seed=7))
    ids, segments, _ = packed_batch(GQA.vocab, seed=2)
    with torch.no_grad():
        plain = model(ids)
        x = ids
        for item in model.items:
            x = _reference_attention(item, x) if isinstance(item, Attention) else item(x)
        assert torch.equal(plain, x)
        model((ids, segments))  # a document-attention call leaves nothing behind (RoPE tables)
        assert torch.equal(model(ids), plain)
        # one document spanning the sample is plain causal attention (through the other path)
        torch.testing.assert_close(model((ids, torch.zeros_like(ids))), plain, rtol=0, atol=1e-5)


def test_activation_checkpointing_carries_segments():
    checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    ids, segments, targets = packed_batch(GQA.vocab, seed=3)
    results = []
    for fn in (None, checkpoint_fn):
        model = LlamaModel(layer_specs(GQA, NO_TP, seed=7), fn)
        loss = LossFn(NO_TP)(model((ids, segments)), targets)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_flex_attention_branch_matches_dense_mask_branch(kv_heads):
    """The CUDA branch's math, run eagerly on CPU (forward only: FlexAttention has no CPU
    backward), against the dense-mask SDPA branch that CPU runs use."""
    gen = torch.Generator().manual_seed(4)
    segments = segments_of(DOCS)
    B, T = segments.shape
    q = torch.randn(B, 4, T, 8, generator=gen)
    k, v = (torch.randn(B, kv_heads, T, 8, generator=gen) for _ in range(2))
    dense = sdpa_document_attention(q, k, v, segments, gqa=kv_heads != 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        flex = flex_document_attention(q, k, v, segments, gqa=kv_heads != 4, compiled=False)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-6)
    assert torch.equal(document_attention(q, k, v, segments, gqa=kv_heads != 4), dense)  # CPU takes SDPA

    # The block mask keeps exactly the blocks holding a same-document causal pair: the
    # kernel skips the rest (here 4 x 4 blocks; 128 x 128 in training).
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    dense_mask = (segments.unsqueeze(2) == segments.unsqueeze(1)) & causal
    blocks = create_block_mask(same_document_causal(segments), B, None, T, T, device="cpu", BLOCK_SIZE=4)
    expected = dense_mask.view(B, T // 4, 4, T // 4, 4).any(dim=4).any(dim=2)
    assert torch.equal(blocks.to_dense()[:, 0].bool(), expected)
    assert (~expected & causal[::4, ::4]).any()  # some causal blocks are skipped


def test_loss_mask():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 16, 64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 64, (2, 16), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.3).float()
    loss = LossFn(NO_TP)(logits, (targets, mask))
    per_token = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), reduction="none").view(2, 16)
    assert abs(loss.item() - ((per_token * mask).sum() / mask.sum()).item()) < 1e-6

    # what sits at masked positions changes nothing, and gets no gradient
    other_targets = torch.where(mask.bool(), targets, (targets + 1) % 64)
    other_logits = torch.where(mask.bool().unsqueeze(-1), logits, torch.randn(2, 16, 64, generator=gen))
    assert torch.equal(LossFn(NO_TP)(other_logits, (other_targets, mask)), loss)
    loss.backward()
    assert logits.grad[mask == 0].abs().max() == 0 and logits.grad[mask == 1].abs().max() > 0

    assert LossFn(NO_TP)(logits, (targets, torch.zeros(2, 16))).item() == 0.0  # max(sum(mask), 1)
    assert abs(LossFn(NO_TP)(logits, targets).item() - per_token.mean().item()) < 1e-6  # plain: the mean


# --------------------------------------------------------------------------------------
# 4 processes: DeepSpeed's pipeline engine (tp 2 x pp 2, tp 1 x pp 2 x dp 2) and its plain
# engine (tp 2 x dp 2)
# --------------------------------------------------------------------------------------

def engine_config(steps: int = 2, model: ModelConfig = GQA, **parallel) -> Config:
    """Built directly (no data or tokenizer checks: the batches here are synthetic)."""
    return Config(model=model, parallel=ParallelConfig(**{"tensor": 2, "pipeline": 2, "micro_batch": 2,
                                                         "global_batch": 4, **parallel}),
                  precision=PrecisionConfig(dtype="fp32"), zero=ZeroConfig(stage=0), optimizer=OptimizerConfig(lr=0.01),
                  schedule=ScheduleConfig(warmup_steps=0), train=TrainConfig(steps=steps, seed=7))


def micro_batches(step: int) -> list:
    """One global batch: two micro-batches of ((ids, segments), (targets, loss_mask)), with
    no loss where the input is a document's last token (what data.eod_mask_loss gives)."""
    out = []
    for m in range(2):
        ids, segments, targets = packed_batch(GQA.vocab, seed=100 + 2 * step + m)
        last = torch.ones_like(segments, dtype=torch.bool)
        last[:, :-1] = segments[:, 1:] != segments[:, :-1]
        out.append(((ids, segments), (targets, (~last).float())))
    return out


def run_engine(cfg: Config, rank: int, world_size: int):
    """The training engine of `cfg` on this rank: cfg.train.steps train steps on micro_batches
    (dp rank r takes micro-batch r, launcher.data's order; the context ranks of a data rank
    the same one) and an eval batch. Returns (engine, (losses, grad norms, eval loss)); the
    caller destroys the engine."""
    from launcher.ds.config import deepspeed_config
    from launcher.planning.plan import make_plan
    from launcher.planning.precision import detect_device_support
    from launcher.training.engine import build_engine
    from parallel.topology import build_process_groups

    plan = make_plan(cfg, world_size, detect_device_support())
    groups = build_process_groups(plan.layout, rank)
    engine = build_engine(cfg, plan, groups, torch.device("cpu"), deepspeed_config(cfg, plan))

    def data(step):
        if not engine.reads_data:
            return None
        batches = micro_batches(step)
        return batches if plan.layout.dp == 1 else [batches[groups.coord.dp]]

    steps = [engine.train_step(data(step)) for step in range(cfg.train.steps)]
    return engine, ([loss for loss, _ in steps], [norm for _, norm in steps], engine.eval_loss(data(cfg.train.steps)))


def _engine_runs(rank, world_size):
    """Two train steps and an eval batch per engine: (losses, grad norms, eval loss)."""
    results = {}
    for name, parallel in (("tp2_pp2", {}), ("tp2_pp2_checkpointing", {"activation_checkpointing": True}),
                           ("tp2_pp2_no_sequence_parallel", {"sequence_parallel": False}),
                           ("tp1_pp2_dp2", {"tensor": 1}), ("tp2_dp2", {"pipeline": 1})):
        engine, results[name] = run_engine(engine_config(**parallel), rank, world_size)
        if engine.pipeline:  # tp > 1 without sequence parallelism: DeepSpeed splits the tuple's
            # hidden states over tp to send them; with it each tp rank sends its own shard
            split = engine.groups.layout.tp > 1 and parallel.get("sequence_parallel") is False
            assert engine.ds.is_pipe_partitioned == engine.ds.is_grad_partitioned == split
        engine.ds.destroy()
    return results


def _single_process(segments: bool = True, steps: int = 2, model: ModelConfig = GQA) -> tuple[list, list, float]:
    """The same steps (two by default) in plain torch: mean micro-batch loss, clip, AdamW,
    schedule; then the eval loss on the next batch."""
    cfg = engine_config(steps, model)
    model = LlamaModel(layer_specs(cfg.model, NO_TP, seed=cfg.train.seed))
    loss_fn = LossFn(NO_TP)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.schedule, cfg.train.steps)
    losses, norms = [], []
    for step in range(steps):
        batch = micro_batches(step)
        micro = [loss_fn(model(inputs if segments else inputs[0]), targets) for inputs, targets in batch]
        loss = torch.stack(micro).mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip).item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        val = torch.stack([loss_fn(model(i), t) for i, t in micro_batches(steps)]).mean().item()
    return losses, norms, val


def test_pipeline_and_plain_engines_match_single_process():
    """Tuples (hidden, segments) cross the pipeline stage boundary: partitioned over tp 2
    (with and without DeepSpeed's activation checkpointing) and whole (tp 1, dp 2);
    (ids, segments) and (targets, loss_mask) reach the plain engine (tp 2 x dp 2). Each
    computes the single process's losses (two steps, so the gradients through the tuples
    are right too), gradient norms and eval loss."""
    losses, norms, val = _single_process()
    plain_losses, _, _ = _single_process(segments=False)
    assert abs(plain_losses[0] - losses[0]) > 1e-3  # the reference really depends on the segments
    results = run_distributed(_engine_runs, 4)
    for rank, by_engine in enumerate(results):
        for name, (got_losses, got_norms, got_val) in by_engine.items():
            where = f"rank {rank} {name}"
            assert got_losses == pytest.approx(losses, abs=1e-4), where
            assert got_norms == pytest.approx(norms, rel=1e-4), where
            assert got_val == pytest.approx(val, abs=1e-4), where
    assert norms[0] > 1.0  # clipping is active, so the norm is checked where it matters

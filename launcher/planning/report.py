"""The `plan` command's report: `report` gathers, as one dict (what `--json` prints), the
config's layout and its memory per stage, what `auto` chose (the keys and the planner's
figures; when nothing fits the config's ZeRO stage and offload setting, what the layouts that
fit change), the rule of thumb, the smallest world it fits, and the layouts that fit ranked
by estimated speed with why the first ones win; `format_report`
renders it as the tables `python -m launcher.plan` prints.
"""

from __future__ import annotations

import dataclasses

from launcher.config.derived import sequence_parallel_on
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.planning.auto import (
    AutoChoice,
    auto_choice,
    choose_auto,
    config_estimate,
    plan_candidates,
    planned_dtype,
    smallest_world,
    with_candidate,
    workload,
)
from launcher.planning.cluster import nominal_gb
from launcher.planning.plan import make_plan
from launcher.planning.precision import ASSUMED_GPU
from parallel.costs import RECOMPUTE_MODES, item_costs, parameter_counts
from parallel.hardware import GIB, PRESETS
from parallel.memory import dtype_bytes
from parallel.planner import (
    Candidate,
    Cluster,
    Estimate,
    Pinned,
    candidates,
    rank_layouts,
)

MEMORY_ROWS = (("params (this rank)", "params"), ("weights", "weights"), ("gradients", "grads"),
               ("optimizer states", "optimizer"), ("activations", "activations"),
               ("loss logits buffers", "logits"), ("reduce bucket", "bucket"), ("ZeRO-3 gathered", "gathered"),
               ("framework overhead", "framework"), ("margin", "margin"), ("total", "total"))


def rule_of_thumb_gpus(params: float, memory_gb: float) -> float:
    """The seeds' rule of thumb: params (B) x 18 bytes x 1.25 / GPU GB (its nominal size: 80)."""
    return params / 1e9 * 18 * 1.25 / memory_gb


def report(cfg: Config, config_path: str, cluster: Cluster, top: int) -> dict:
    """Everything `python -m launcher.plan` prints, as data."""
    world = cluster.world
    try:
        resolved, choice = choose_auto(cfg, world, cluster, ASSUMED_GPU)
    except ConfigError:  # nothing fits: show the layout that comes closest
        dtype = planned_dtype(cfg, ASSUMED_GPU)
        pool = plan_candidates(cfg, cluster, dtype, context=None if cfg.parallel.context == "auto" else 1)
        closest = rank_layouts(workload(cfg, dtype), cluster, pool).smallest if pool else None
        if closest is None:
            raise
        resolved, choice = with_candidate(cfg, closest.candidate), auto_choice(cfg, closest, cluster)
    plan = make_plan(resolved, world, ASSUMED_GPU)
    own = config_estimate(resolved, plan, cluster)
    work = workload(resolved, plan.dtype)
    free = dataclasses.replace(resolved, parallel=dataclasses.replace(
        resolved.parallel, tensor="auto", pipeline="auto", micro_batch="auto", activation_checkpointing="auto",
        data="auto"))
    # context degrees join the table for a config that asks for context parallelism
    long_context = cfg.parallel.context == "auto" or resolved.parallel.context > 1
    pool = candidates(work, cluster, Pinned(offload=(False, True), search_ep=True, cp=None if long_context else 1))
    ranking = rank_layouts(work, cluster, pool)
    params = sum(c.params for c in plan.costs)
    sp = sequence_parallel_on(resolved.parallel, resolved.model, plan.layout.tp)
    stage0 = {mode: sum(c.act_bytes for c in item_costs(resolved.model, plan.layout.tp, plan.layout.micro_batch,
                                                         dtype_bytes(plan.dtype), mode, sp)
                        [plan.parts[0]:plan.parts[1]])
              for mode in RECOMPUTE_MODES}
    try:
        smallest = smallest_world(free, cluster.hardware, cluster.gpus_per_node)
    except ConfigError:
        smallest = None
    why = _why(ranking.estimates, own)
    auto = dataclasses.asdict(choice) if choice else None
    if choice and not choice.fits:
        auto.update(_fits_only_with(cfg, ranking.estimates), zero_stage=cfg.zero.stage,
                    offload_optimizer=cfg.zero.offload_optimizer, world=world)
    return {"config": config_path, "auto": auto, "hardware": dataclasses.asdict(cluster.hardware),
            "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "efficiency": cluster.efficiency,
            "params": params, "active_params": parameter_counts(resolved.model)[1], "dtype": plan.dtype, "optimizer": resolved.optimizer.name,
            "global_batch": resolved.parallel.global_batch, "seq_len": resolved.model.seq_len,
            "layout": own.as_dict(), "activations_per_micro_batch_stage0": stage0,
            "nominal_gb": nominal_gb(cluster.hardware), "rule_of_thumb_gpus": rule_of_thumb_gpus(params, nominal_gb(cluster.hardware)),
            "smallest_world": smallest, "considered": ranking.considered,
            "ranked": [e.as_dict() for e in ranking.estimates[:top]], "fitting": len(ranking.estimates),
            "why": why}


def _fits_only_with(cfg: Config, fitting: list[Estimate]) -> dict:
    """When no layout fits with the config's ZeRO stage and offload setting: what the layouts
    that fit change (`fits_only_with`: override keys, None when none fits) and how many fit."""
    own_offload = cfg.zero.offload_optimizer
    stages = sorted({e.candidate.zero for e in fitting if e.candidate.offload == own_offload})
    if stages:
        change = "zero.stage=" + " or ".join(map(str, stages))
    elif fitting:  # every one that fits moves the optimizer to the host
        change = "zero.offload_optimizer=true"
    else:
        change = None
    return {"fits_only_with": change, "fitting_with_it": len(fitting)}


def auto_line(auto: dict) -> str:
    """The plan's `auto` line from the report's `auto` data."""
    choice = AutoChoice(**{f.name: auto[f.name] for f in dataclasses.fields(AutoChoice)})
    if choice.fits:
        return choice.line()
    offload = " and optimizer offload" if auto["offload_optimizer"] else ""
    none_fits = (f"no layout of {auto['world']} ranks with zero.stage={auto['zero_stage']}{offload} fits "
                 f"{choice.memory_gib:.1f} GiB per device ({choice.gpu}; the smallest needs {choice.peak_gib:.1f} "
                 "GiB per rank)")
    if auto["fits_only_with"] is None:
        return (f"auto       {none_fits}, nor with any ZeRO stage or optimizer offload: add nodes; shown: the "
                "layout needing the least memory")
    change = auto["fits_only_with"]
    change = f"optimizer offload ({change})" if change == "zero.offload_optimizer=true" else change
    return (f"auto       fits only with {change}: {none_fits}; {auto['fitting_with_it']} layouts fit "
            f"with it (listed below); shown: the layout of ZeRO {auto['zero_stage']} needing the least memory")


def _structure(c: Candidate) -> tuple:
    """What makes two layouts structurally different (ZeRO 0 and 1 alone often tie)."""
    return c.layout.tp, c.layout.pp, c.layout.micro_batch, c.recompute, c.offload


def _why(ranked: list[Estimate], own: Estimate) -> dict[str, str]:
    """Each of the first structurally different layouts (tp, pp, micro-batch, recomputation,
    offload) against the next, and the fastest against the config's own layout."""
    why = {}
    distinct: list[Estimate] = []
    for e in ranked:
        if all(_structure(e.candidate) != _structure(d.candidate) for d in distinct):
            distinct.append(e)
        if len(distinct) == 4:
            break
    for a, b in zip(distinct, distinct[1:]):
        why[f"{a.candidate.describe()} over {b.candidate.describe()}"] = why_faster(a, b)
    if distinct and distinct[0].candidate != own.candidate:
        why[f"{distinct[0].candidate.describe()} over the config's layout"] = why_faster(distinct[0], own)
    return why


def format_report(r: dict) -> str:
    """The report as `python -m launcher.plan` prints it (without --json)."""
    lines = _summary_lines(r) + [""] + _memory_lines(r) + [""] + _rule_of_thumb_lines(r) + [""]
    return "\n".join(lines + _ranking_lines(r))


def _gib(value: float) -> float:
    return value / GIB


def _active(r: dict) -> str:
    """', 2.8B active per token' for an MoE model (FLOPs and MFU count these)."""
    return "" if r["active_params"] == r["params"] else f" ({r['active_params'] / 1e9:.3f}B active per token)"


def _summary_lines(r: dict) -> list[str]:
    """The cluster, the model, the auto note and the config's layout, one line each."""
    hw, lay = r["hardware"], r["layout"]
    lines = [
        f"plan       {r['config']} on {r['nodes']} x {r['gpus_per_node']} {hw['name']} ({hw['memory_gib']:g} GiB, "
        f"{hw['peak_tflops']:g} TFLOP/s, NVLink {hw['intra_node_gbps']:g} GB/s, network {hw['inter_node_gbps']:g} "
        f"GB/s per GPU; {100 * r['efficiency']:.0f}% of peak assumed for matmuls)",
        f"model      {r['params'] / 1e9:.3f}B params{_active(r)}, {r['dtype']}, {r['optimizer']}, global batch "
        f"{r['global_batch']} x {r['seq_len']} tokens",
    ]
    if r["auto"]:
        lines.append(auto_line(r["auto"]))
    context = f" x cp {lay['cp']}" if lay["cp"] > 1 else ""
    lines.append(f"layout     tp {lay['tp']}{context} x pp {lay['pp']} x dp {lay['dp']}, micro_batch {lay['micro_batch']}, "
                 f"ZeRO {lay['zero']}, recompute {lay['recompute']}, sequence parallel "
                 f"{'on' if lay['sequence_parallel'] else 'off'}: {'fits' if lay['fits'] else 'DOES NOT FIT'} "
                 f"({lay['peak_gib']:.1f} of {hw['memory_gib']:.1f} GiB), "
                 f"~{lay['tokens_per_s']:,.0f} tokens/s, MFU {100 * lay['mfu']:.1f}%")
    return lines


def _memory_lines(r: dict) -> list[str]:
    """One rank of each stage (up to 8; else the first two, the middle and the last two),
    row by row, and stage 0's activations under each recomputation mode."""
    lay = r["layout"]
    stages = lay["stages"]
    shown = list(range(len(stages))) if len(stages) <= 8 else sorted(
        {0, 1, len(stages) // 2, len(stages) - 2, len(stages) - 1})
    lines = [f"{'one rank, GiB':<22}" + "".join(f"{'stage ' + str(s):>11}" for s in shown)]
    for label, key in MEMORY_ROWS:
        cells = []
        for s in shown:
            v = stages[s][key]
            if key == "params":
                cells.append(f"{v / 1e6:>10.1f}M")
            elif key == "activations":
                cells.append(f"{_gib(v):>6.2f} ({stages[s]['in_flight']}x)".rjust(11))
            else:
                cells.append(f"{_gib(v):>11.2f}")
        lines.append(f"{label:<22}" + "".join(cells))
    acts = r["activations_per_micro_batch_stage0"]
    lines.append(f"activations of one micro-batch on stage 0, by recomputation: none {_gib(acts['none']):.2f}, "
                 f"selective {_gib(acts['selective']):.2f}, full {_gib(acts['full']):.2f} GiB"
                 + (" (sequence parallel)" if lay["sequence_parallel"] else ""))
    return lines


def _rule_of_thumb_lines(r: dict) -> list[str]:
    smallest = r["smallest_world"]
    return [f"rule of thumb  params(B) x 18 x 1.25 / GPU GB = {r['params'] / 1e9:.2f} x 18 x 1.25 / "
            f"{r['nominal_gb']:g} = {r['rule_of_thumb_gpus']:.1f} GPUs; per rank the planner needs "
            f"{'no layout under 65536 GPUs' if smallest is None else f'{smallest} GPUs at least'}: the rule "
            "counts model states only (16 bytes + 2 of buffers, 25% slack), not activations "
            "(x micro-batches in flight), the reduction bucket, or the replicated weights and "
            "gradients that ZeRO 1-2 and tensor/pipeline degrees leave on every rank"]


def _ranking_lines(r: dict) -> list[str]:
    """The layouts that fit, fastest first, and why the first ones win."""
    experts = any(e["ep"] != e["tp"] for e in r["ranked"])  # an MoE with experts over data ranks: an ep column
    context = any(e["cp"] > 1 for e in r["ranked"])  # context parallelism: a cp column
    lines = [f"layouts that fit: {r['fitting']} of {r['considered']} considered, fastest first",
             f"{'#':>3} {'tp':>3}{' cp' if context else ''} {'pp':>3} {'dp':>5}{' ep' if experts else ''} {'mb':>3} {'ZeRO':>4} {'recompute':>9} "
             f"{'SP':>3} {'offload':>7} {'GiB':>6} {'step s':>8} {'tokens/s':>11} {'MFU':>6} {'bubble':>6}"]
    for i, e in enumerate(r["ranked"], 1):
        ep = f" {e['ep']:>2}" if experts else ""
        cp = f" {e['cp']:>2}" if context else ""
        lines.append(f"{i:>3} {e['tp']:>3}{cp} {e['pp']:>3} {e['dp']:>5}{ep} {e['micro_batch']:>3} {e['zero']:>4} "
                     f"{e['recompute']:>9} {'yes' if e['sequence_parallel'] else 'no':>3} "
                     f"{'yes*' if e['offload'] else 'no':>7} {e['peak_gib']:>6.1f} "
                     f"{e['step_s']:>8.3f} {e['tokens_per_s']:>11,.0f} {100 * e['mfu']:>5.1f}% "
                     f"{100 * e['bubble']:>5.1f}%")
    if any(e["offload"] for e in r["ranked"]):
        lines.append("  * zero.offload_optimizer: true (the optimizer steps in host memory; its PCIe and CPU time "
                     "are in the step time)")
    for what, text in r["why"].items():
        lines.append(f"why {what}: {text}")
    return lines


def format_presets() -> str:
    lines = [f"{'preset':<7} {'name':<16} {'GiB':>6} {'TFLOP/s':>8} {'HBM GB/s':>9} {'NVLink':>7} {'network':>8} "
             f"{'PCIe':>5}  source"]
    for key, h in PRESETS.items():
        lines.append(f"{key:<7} {h.name:<16} {h.memory_gib:>6g} {h.peak_tflops:>8g} {h.hbm_gbps:>9g} "
                     f"{h.intra_node_gbps:>7g} {h.inter_node_gbps:>8g} {h.pcie_gbps:>5g}  {h.source}")
    lines.append("bandwidths per GPU and per direction; TFLOP/s dense bf16")
    return "\n".join(lines)


def why_faster(best: Estimate, other: Estimate) -> str:
    """The step-time terms where `best` gains most over `other`, in words."""
    names = {"compute": "compute (bubble included)", "tp_comm": "tensor-parallel collectives", "pp_comm": "pipeline sends",
             "dp_comm": "data-parallel reduction", "optimizer": "optimizer step", "offload": "offload traffic"}
    gains = sorted(((getattr(other.step, k) - getattr(best.step, k), v) for k, v in names.items()), reverse=True)
    said = [f"{v} {gain * 1e3:.0f} ms less" for gain, v in gains[:2] if gain > 0.005 * other.step.total]
    if best.step.bubble < other.step.bubble - 0.005:
        said.append(f"bubble {100 * best.step.bubble:.1f}% vs {100 * other.step.bubble:.1f}%")
    loss, what = gains[-1]
    if said and loss < -0.005 * other.step.total:
        said.append(f"despite {what} {-loss * 1e3:.0f} ms more")
    if said:
        return "; ".join(said)
    if best.peak.total < other.peak.total - 0.01 * other.peak.total:
        return "the same step time within 0.5%, less memory"
    return "the same step time within 0.5% and the same memory (a tie)"

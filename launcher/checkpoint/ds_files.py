"""DeepSpeed's checkpoint files: which file holds what, and opening one safely.

The one place that knows DeepSpeed's file names, the keys inside its files and the names
it saves our parameters under. Read by launcher/checkpoint/reader.py (full weights, for
export and generate) and launcher/checkpoint/reshard.py (this rank's slices of weights and
optimizer state, for a resume on another layout).

Where the state is on disk (DeepSpeed 0.19), for saved (stage s, tp rank t), m = s * tp + t:

    mp_rank_MM_model_states.pt        lr scheduler, counters; `param_shapes` (ZeRO >= 1: the
                                      names and tp-slice shapes of stage s, per group);
                                      ZeRO 0: the torch optimizer's state by index; pipeline
                                      1: the module's weights ('items.XX.*'); ZeRO 3: empty
                                      placeholders for the weights
    layer_XX-model_TT-model_states.pt pipeline > 1: item XX's weights of tp rank TT; a tied
                                      head is not saved (it is item 0's table)
    [bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt
                                      ZeRO 1/2 and the bf16 optimizer: dp rank D's flat fp32
                                      partition per group, its moments, and
                                      `param_slice_mappings` (name -> start, numel in it);
                                      ZeRO 3: the flat fp32 groups, each parameter cut into
                                      dp equal pieces (read as deepspeed/utils/zero_to_fp32.py
                                      does)
    zero_pp_rank_0_mp_rank_MM_model_states.pt
                                      ZeRO 3: `param_shapes` of tp rank MM

Parameter names as saved: 'items.X.key' (pipeline 1), 'X.key' (pipeline > 1), the tied
embedding on the last stage 'tied_modules.embed.embed.weight'; X is the pipeline item
(parallel.costs order: embedding, attention and MLP of each layer, final norm, head).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from launcher.config.schema import ModelConfig
from launcher.ds.seams import deepspeed_state_classes
from parallel.costs import pipeline_items

TIED_EMBEDDING = "tied_modules.embed.embed.weight"  # the last stage's copy of item 0's table
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def model_states_file(ckpt: Path, mp: int) -> Path:
    return ckpt / f"mp_rank_{mp:02d}_model_states.pt"


def zero3_model_states_file(ckpt: Path, mp: int) -> Path:
    return ckpt / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"


def layer_file(ckpt: Path, item: int, tp_rank: int) -> Path:
    return ckpt / f"layer_{item:02d}-model_{tp_rank:02d}-model_states.pt"


def layer_files(ckpt: Path, item: int) -> list[Path]:
    """Pipeline item `item`'s files of every saved tp rank, in tp order."""
    return sorted(ckpt.glob(f"layer_{item:02d}-model_*-model_states.pt"),
                  key=lambda p: int(p.name.split("-model_")[1]))


def optim_files(ckpt: Path, mp: int) -> list[Path]:
    """Model-parallel rank `mp`'s ZeRO (or bf16 optimizer) files, one per dp rank, in dp order."""
    found = []
    for path in ckpt.iterdir():
        match = _OPTIM_FILE.match(path.name)
        if match and int(match.group(2)) == mp:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def load_mmap(path: Path) -> dict:
    """torch.load that runs no code from the file, memory-mapped (pages are read when used)."""
    with torch.serialization.safe_globals(deepspeed_state_classes()):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------
# What the files hold
# --------------------------------------------------------------------------------------


def module_weights(model_states: dict) -> dict[str, torch.Tensor]:
    """Pipeline 1: the module's parameters by saved name ('items.X.key'), buffers left out."""
    buffers = set(model_states.get("buffer_names") or [])
    return {k: v for k, v in model_states["module"].items() if k not in buffers}


def param_shapes(model_states: dict) -> list[dict[str, tuple[int, ...]]]:
    """ZeRO >= 1: per parameter group, saved name -> tp-slice shape (empty for ZeRO 0)."""
    return [{name: tuple(shape) for name, shape in group.items()} for group in model_states.get("param_shapes") or []]


def torch_optimizer(model_states: dict) -> Optional[dict]:
    """ZeRO 0 with a torch optimizer: its state_dict ('state' by index, 'param_groups'), else None."""
    opt = model_states.get("optimizer")
    return opt if opt and "state" in opt else None


def optimizer_state(optim_states: dict) -> dict:
    """The optimizer part of a *_optim_states.pt file (read with the accessors below)."""
    return optim_states["optimizer_state_dict"]


def slice_mappings(opt: dict) -> list[dict]:
    """ZeRO 1/2, bf16: per group, saved name -> address (.start, .numel) in the flat partition."""
    return opt["param_slice_mappings"]


def fp32_partition(opt: dict, group: int) -> torch.Tensor:
    """ZeRO 1/2, bf16: this dp rank's flat fp32 master partition of one group."""
    return opt["single_partition_of_fp32_groups"][group]


def base_state(opt: dict, group: int) -> dict:
    """The torch optimizer's state of one flat group: ZeRO 1/2 save a list per group
    (elastic format), the bf16 optimizer torch's state_dict."""
    base = opt["base_optimizer_state"]
    return base[group] if isinstance(base, list) else base["state"][group]


def zero3_flat_groups(opt: dict) -> list[torch.Tensor]:
    """ZeRO 3: this dp rank's flat fp32 group of each parameter group."""
    return opt["fp32_flat_groups"]


def zero3_partition_count(opt: dict, default: int) -> int:
    """ZeRO 3: how many ways the optimizer was partitioned (the data degree)."""
    count = opt.get("partition_count", default)
    return max(count) if isinstance(count, list) else count


# --------------------------------------------------------------------------------------
# Parameter names: ours <-> DeepSpeed's
# --------------------------------------------------------------------------------------


def item_key(model: ModelConfig, ours: str) -> tuple[int, str]:
    """Our logical name -> (pipeline item index, key in that item's state dict):
    'layers.1.mlp.w_up.weight' -> (4, 'w_up.weight'); 'head.weight' -> (last, 'proj.weight')
    (the tied head is item 0's 'embed.weight')."""
    n_items = len(pipeline_items(model))
    if ours == "embed.weight" or (ours == "head.weight" and model.tie_embeddings):
        return 0, "embed.weight"
    if ours == "head.weight":
        return n_items - 1, "proj.weight"
    if ours == "norm.weight":
        return n_items - 2, "norm.weight"
    _, layer, block, rest = ours.split(".", 3)  # layers.{i}.attention|mlp.<rest>
    return 1 + 2 * int(layer) + (block == "mlp"), rest


def saved_name(item: int, key: str, pp: int) -> str:
    """The name DeepSpeed saves item `item`'s `key` under: 'items.X.key' (pipeline 1, and
    ZeRO 3's param_shapes), 'X.key' (pipeline > 1)."""
    return f"items.{item}.{key}" if pp == 1 else f"{item}.{key}"


def logical_name(model: ModelConfig, saved: str) -> str:
    """A parameter name as DeepSpeed saved it -> our logical name
    ('3.wq.weight' -> 'layers.1.attention.wq.weight'); the inverse of `item_key`."""
    if saved.startswith("tied_modules."):
        return "embed.weight"  # the only tied weight: the embedding, shared with the head
    item, key = saved.removeprefix("items.").split(".", 1)
    index, last = int(item), len(pipeline_items(model)) - 1
    if index == 0:
        return "embed.weight"
    if index == last:
        return "head.weight"
    if index == last - 1:
        return "norm.weight"
    layer, block = divmod(index - 1, 2)
    return f"layers.{layer}.{'mlp' if block else 'attention'}.{key}"

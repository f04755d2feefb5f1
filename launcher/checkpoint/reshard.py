"""Resume a checkpoint on another tensor, pipeline or data degree, or another ZeRO stage.

DeepSpeed's own loader needs the saving layout's files one for one (same tp x pp; a dp
change only through its elastic ZeRO 1/2 merge, and not for its bf16 optimizer), and its
universal-checkpoint route (`ds_to_universal`) is an offline pass over the whole checkpoint
that needs per-parameter tensor-parallel metadata DeepSpeed's model-side API records and
our model does not. Here every rank of the new layout builds its engine as for a fresh
start and fills it in place:

    for each parameter of this rank (one pipeline stage, one tp rank):
        fp32 master, exp_avg, exp_avg_sq  <- read from the saved files: the saved tp slices
                                             that overlap, each assembled from the ZeRO
                                             fragments of every saved dp rank
        -> this rank's tp slice           -> DeepSpeed's fragment API (safe_set_full_*),
                                             which keeps only this rank's ZeRO partition;
                                             a plain torch optimizer (ZeRO 0, fp32) gets
                                             the tensors in its state directly

Files are memory-mapped: a rank reads the pages of the tensors its stage needs, and opens
the optimizer files of the saved stages that hold them only (the small model-state files of
every saved stage say which holds what). The Adam step count, the
scheduler, DeepSpeed's step and sample counters come along; RNG states and PowerSGD's
error feedback are per rank and start afresh (as on any layout change).

Which file holds what, and the names parameters are saved under: launcher/checkpoint/ds_files.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from launcher.checkpoint.ds_files import (
    TIED_EMBEDDING,
    base_state,
    fp32_partition,
    layer_file,
    load_mmap,
    logical_name,
    model_states_file,
    module_weights,
    optim_files,
    optimizer_state,
    param_shapes,
    saved_name,
    slice_mappings,
    torch_optimizer,
)
from launcher.checkpoint.state import SavedLayout
from launcher.config.coerce import model_config
from launcher.ds.seams import (
    can_init_fragment_state,
    has_fragment_mapping,
    init_fragment_state,
)
from launcher.errors import ConfigError
from launcher.model import weights as hf_names

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's; Lion has exp_avg only


@dataclass
class _Slice:
    """Where one saved tp slice of a parameter is: its shape, and either ZeRO fragments
    [(optimizer file, group, start, numel) per dp rank, in order] or a ZeRO 0 torch
    optimizer entry (model file, group index of the state) plus the weight's file and key."""

    shape: tuple
    fragments: list
    zero0: Optional[tuple] = None  # (mp file, state index, weight file, weight key)


class SavedState:
    """The full (tp-gathered) fp32 master weights and optimizer moments of a checkpoint, by
    logical name, for any saved layout with ZeRO 0-2."""

    def __init__(self, ckpt: Path, layout: SavedLayout, model: dict):
        self.ckpt = ckpt
        self.model = model_config(model, "checkpoint.resume")
        self.layout = layout
        self.tp, self.pp, self.zero = layout.tp, layout.pp, layout.zero_stage
        self.mp = layout.model_ranks  # DeepSpeed's model ranks per stage: the expert group
        if self.zero == 3:
            raise ConfigError("zero.stage", f"checkpoint {ckpt} was saved with ZeRO 3: it resumes on its own layout "
                              f"only (tensor={self.tp} pipeline={self.pp} data={layout.dp} zero.stage=3)")
        self._files: dict = {}
        # logical name -> one _Slice per saved tp rank (an expert weight: per saved expert rank)
        self.index: dict[str, list[_Slice]] = {}
        self.step: Optional[torch.Tensor] = None  # the optimizer's step count
        # Which saved stages hold which parameters: from the small model-state files; the
        # optimizer files of a stage are opened when one of its parameters is asked for.
        self._stages: dict[str, list[int]] = {}
        for stage in range(self.pp):
            for name in self._stage_names(stage):
                self._stages.setdefault(logical_name(self.model, name), []).append(stage)
        self._indexed: set[int] = set()
        self.counters = self._open(self._need(model_states_file(ckpt, 0)))

    # ----------------------------------------------------------------- files
    def _need(self, path: Path) -> Path:
        if not path.is_file():
            raise ConfigError("checkpoint.resume", f"{path}: missing (saved with tensor={self.tp} "
                              f"pipeline={self.pp} zero.stage={self.zero})")
        return path

    def _open(self, path: Path) -> dict:
        if path not in self._files:
            self._files[path] = load_mmap(path)
        return self._files[path]

    def _optim_files(self, m: int) -> list[Path]:
        found = optim_files(self.ckpt, m)
        if not found:
            raise ConfigError("checkpoint.resume", f"{self.ckpt}: no ZeRO optimizer files for model-parallel rank {m}")
        return found

    # ----------------------------------------------------------------- index
    def _add(self, saved: str, m: int, piece: _Slice) -> None:
        """The slice of saved model rank m (expert rank m = its data rank in the expert group x
        tp + tp rank). A dense weight is taken from the expert group's first data rank (m < tp):
        its copies on the others are the same."""
        name = logical_name(self.model, saved)
        expert = hf_names.is_expert(name)
        if m >= self.tp and not expert:
            return
        slices = self.index.setdefault(name, [None] * (self.mp if expert else self.tp))
        if slices[m] is None:  # a tied weight appears on two stages, identical: the first wins
            slices[m] = piece

    def _stage_names(self, stage: int) -> list[str]:
        mp = self._open(self._need(model_states_file(self.ckpt, stage * self.mp)))
        if param_shapes(mp):
            return [name for group in param_shapes(mp) for name in group]
        return [w[0] for w in self._stage_weights(mp, stage, 0)]

    def _slices(self, name: str) -> list[_Slice]:
        for stage in self._stages.get(name, [])[:1]:  # a tied weight: its first stage's copy
            if stage not in self._indexed:
                for m in range(self.mp):
                    self._index_stage(stage, m)
                self._indexed.add(stage)
        slices = self.index.get(name)
        if slices is None or any(s is None for s in slices):
            raise ConfigError("checkpoint.resume", f"{self.ckpt}: no saved state for {name}")
        return slices

    def _index_stage(self, stage: int, t: int) -> None:
        m = stage * self.mp + t
        mp_file = self._need(model_states_file(self.ckpt, m))
        mp = self._open(mp_file)
        if self.zero == 0 and torch_optimizer(mp) is not None:
            self._index_torch_optimizer(mp_file, mp, stage, t)
            return
        shapes = {name: shape for group in param_shapes(mp) for name, shape in group.items()}
        where: dict[str, list] = {}
        for path in self._optim_files(m):
            opt = optimizer_state(self._open(path))
            for group, mapping in enumerate(slice_mappings(opt)):
                for name, address in mapping.items():
                    where.setdefault(name, []).append((path, group, address.start, address.numel))
            if self.step is None:
                self.step = base_state(opt, 0).get("step")  # None: saved before any step
        for name, fragments in where.items():
            self._add(name, t, _Slice(shapes[name], fragments))

    def _index_torch_optimizer(self, mp_file: Path, mp: dict, stage: int, t: int) -> None:
        """ZeRO 0 with a torch optimizer: its state is by index, in the order of the stage's
        parameters (launcher.training.optim.param_groups: matrices first, then gains), which
        is the order of the saved weights."""
        weights = self._stage_weights(mp, stage, t)  # [(saved name, file, key, shape)] in module order
        order = [w for w in weights if len(w[3]) >= 2] + [w for w in weights if len(w[3]) < 2]
        opt = torch_optimizer(mp)
        indices = [i for group in opt["param_groups"] for i in group["params"]]
        if len(indices) != len(order):
            raise ConfigError("checkpoint.resume", f"{mp_file}: {len(indices)} optimizer entries for "
                              f"{len(order)} parameters of stage {stage}")
        for i, (saved, path, key, shape) in zip(indices, order):
            self._add(saved, t, _Slice(shape, [], zero0=(mp_file, i, path, key)))
            if self.step is None and i in opt["state"]:
                self.step = opt["state"][i]["step"]

    def _stage_weights(self, mp: dict, stage: int, t: int) -> list:
        if self.pp == 1:
            return [(k, None, k, tuple(v.shape)) for k, v in module_weights(mp).items()]
        parts = self._parts()
        out = []
        items = range(parts[stage], parts[stage + 1])
        if self.model.tie_embeddings and stage == self.pp - 1 and 0 not in items:
            # the last stage's head is the tied embedding: DeepSpeed registers it first
            embed = layer_file(self.ckpt, 0, t)
            out.append((TIED_EMBEDDING, embed, "embed.weight", tuple(self._open(embed)["embed.weight"].shape)))
        for item in items:
            path = layer_file(self.ckpt, item, t)
            if not path.is_file():  # a tied head: saved with item 0 only
                continue
            for key, value in self._open(path).items():
                out.append((saved_name(item, key, self.pp), path, key, tuple(value.shape)))
        return out

    def _parts(self) -> tuple[int, ...]:
        parts = self.layout.parts
        if not parts:
            raise ConfigError("checkpoint.resume", f"{self.ckpt}: saved with ZeRO 0 and pipeline {self.pp} before "
                              "stage boundaries were recorded; resume it on its own layout once to re-save it")
        return parts

    # ----------------------------------------------------------------- reading
    def _slice_tensor(self, piece: _Slice, what: str) -> torch.Tensor:
        if piece.zero0 is not None:
            mp_file, i, path, key = piece.zero0
            if what == "fp32":
                source = module_weights(self._open(mp_file)) if path is None else self._open(path)
                return source[key].detach().float().reshape(piece.shape)
            return torch_optimizer(self._open(mp_file))["state"][i][what].detach().float().reshape(piece.shape)
        flat = []
        for path, group, start, numel in piece.fragments:
            opt = optimizer_state(self._open(path))
            source = fp32_partition(opt, group) if what == "fp32" else base_state(opt, group)[what]
            flat.append(source.detach()[start:start + numel])
        out = torch.cat(flat) if len(flat) > 1 else flat[0].clone()
        if out.numel() != math.prod(piece.shape):
            raise ConfigError("checkpoint.resume", f"{self.ckpt}: fragments of {out.numel()} elements for a slice "
                              f"of shape {piece.shape}")
        return out.float().view(piece.shape)

    def slice_for(self, name: str, what: str, dim: Optional[int], rank: int, size: int) -> torch.Tensor:
        """This rank's tp slice (rank of size along dim; dim None: replicated) of `what`
        ('fp32' or a moment), reading only the saved slices that overlap it."""
        slices = self._slices(name)
        if dim is None:  # replicated over tp: every saved tp rank holds it whole
            return self._slice_tensor(slices[0], what)
        saved_width = slices[0].shape[dim]
        width = saved_width * len(slices) // size
        start, stop = rank * width, (rank + 1) * width
        parts = []
        for t, piece in enumerate(slices):
            lo, hi = t * saved_width, (t + 1) * saved_width
            if hi <= start or lo >= stop:
                continue  # this saved slice is not read at all
            a, b = max(lo, start) - lo, min(hi, stop) - lo
            parts.append(self._slice_tensor(piece, what).narrow(dim, a, b - a))
        return torch.cat(parts, dim).contiguous()

    def moments(self) -> list[str]:
        some = self._slices(next(iter(self._stages)))[0]
        if some.zero0 is not None:
            mp_file, i, _, _ = some.zero0
            state = torch_optimizer(self._open(mp_file))["state"].get(i, {})
        else:
            path, group, _, _ = some.fragments[0]
            state = base_state(optimizer_state(self._open(path)), group)
        return [k for k in MOMENTS if k in state]

    def close(self) -> None:
        self._files.clear()


def load_resharded(ds_engine, ckpt: Path, saved_layout: SavedLayout, model: dict, tp: tuple[int, int],
                   experts: tuple[int, int]) -> None:
    """Fill this rank's engine (built for its own layout) from a checkpoint of another
    layout: weights, fp32 master, optimizer moments and step, scheduler, counters. `tp`,
    `experts`: this rank's (rank, degree) in its tp group and its expert group.
    Not a collective; every rank reads its own slices."""
    saved = SavedState(ckpt, saved_layout, model)
    optimizer = ds_engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrap a torch optimizer
    moments = saved.moments()
    stepped = saved.step is not None  # a checkpoint of the starting weights (step 0) has no optimizer state
    if stepped and can_init_fragment_state(optimizer):
        # ZeRO 1/2 and the bf16 optimizer create the torch optimizer's state, and link each
        # parameter's fragment of it, at their first step; do both now so that the fragment
        # API below has a state to write into (zeros, overwritten at once).
        for group in base.param_groups:
            for flat in group["params"]:
                if not base.state[flat]:
                    base.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                        **{k: torch.zeros_like(flat) for k in moments}}
        init_fragment_state(optimizer)
    with torch.no_grad():
        for param in ds_engine.module.parameters():  # each once: a tied weight is one parameter
            dim = hf_names.tp_dim(param.logical_name)  # split over tp in the saved and in this layout
            rank, size = experts if hf_names.is_expert(param.logical_name) else tp  # experts: over the group
            master = saved.slice_for(param.logical_name, "fp32", dim, rank, size)
            if tuple(master.shape) != tuple(param.shape):
                raise ConfigError("checkpoint.resume", f"{ckpt}: {param.logical_name} slice {tuple(master.shape)} "
                                  f"for rank {rank} of {size}, the parameter is {tuple(param.shape)}")
            param.copy_(master.to(param.dtype))
            values = {k: saved.slice_for(param.logical_name, k, dim, rank, size) for k in moments}
            if has_fragment_mapping(param):  # DeepSpeed's ZeRO 1/2 or bf16 optimizer: its partition only
                safe_set_full_fp32_param(param, master)
                for key, value in values.items():
                    safe_set_full_optimizer_state(param, value, key)
            elif stepped:  # a torch optimizer on the parameters themselves (ZeRO 0, fp32)
                state = base.state[param]
                state["step"] = saved.step.clone().float()
                state.update({k: v.to(param.dtype) for k, v in values.items()})
    for state in base.state.values() if stepped else ():  # the flat groups of ZeRO / bf16: their step count
        state["step"] = saved.step.clone().to(state["step"].dtype) if torch.is_tensor(state.get("step")) \
            else saved.step.item()
    counters = saved.counters
    ds_engine.global_steps = counters["global_steps"]
    ds_engine.global_samples = counters.get("global_samples", ds_engine.global_steps * ds_engine.train_batch_size())
    ds_engine.skipped_steps = counters.get("skipped_steps", 0)
    if ds_engine.lr_scheduler is not None and counters.get("lr_scheduler"):
        ds_engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    saved.close()

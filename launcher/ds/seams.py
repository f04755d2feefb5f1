"""Every place the launcher reaches into DeepSpeed beyond its public API, in one module.

DeepSpeed has no hook for a few things the launcher needs (PowerSGD as the data-parallel
reduction, a gradient norm that counts each parameter once, timeouts on its groups, our
stage boundaries, verified and elastic checkpoint loads, a quiet start without compiles).
Each replaces, overrides or calls one DeepSpeed name here, and nowhere else in the house.

`SEAMS` lists them with why and what each touches, checked against `TESTED_DEEPSPEED`.
tests/test_seams.py fails when one of those names is missing from the installed DeepSpeed,
or when a private DeepSpeed name appears outside this module. A launch on another DeepSpeed
version is refused at start (`check_deepspeed_version`), naming the seams, unless
LAUNCHER_UNCHECKED_DEEPSPEED=1 says the user has run that test on it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import sys
import types
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from deepspeed.comm import comm as ds_comm
from deepspeed.pipe import PipelineModule
from deepspeed.runtime import bf16_optimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils.tensor_fragment import fragment_address

from launcher.errors import ConfigError
from parallel.comm_bytes import CollectiveBytes
from parallel.topology import ProcessGroups

TESTED_DEEPSPEED = "0.19.8"  # the version setup.cfg pins and every seam below was read against
UNCHECKED_ENV = "LAUNCHER_UNCHECKED_DEEPSPEED"


@dataclass(frozen=True)
class Seam:
    function: str  # ours, in this module
    touches: str  # DeepSpeed's dotted name (module.Class.attribute) that it replaces, overrides or calls
    how: str  # "replaces", "overrides", "calls" or "reads"
    why: str


_ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
SEAMS: tuple[Seam, ...] = (
    Seam("keep_fp32_grad_norm", f"{_ENGINE}.clip_fp32_gradients", "replaces",
         "fp32 + ZeRO 0 clips but drops the norm and counts a pipeline-tied weight twice"),
    Seam("keep_fp32_grad_norm", f"{_ENGINE}._global_grad_norm", "replaces",
         "where get_global_grad_norm() reads the norm we computed"),
    Seam("install_dp_reduction", f"{_ENGINE}.allreduce_gradients", "replaces",
         "PowerSGD becomes the data-parallel gradient reduction (compression.method=powersgd)"),
    Seam("install_dp_reduction", "deepspeed.runtime.pipe.engine.PipelineEngine._bf16_reduce_grads", "replaces",
         "the pipeline engine's reduction under its bf16 optimizer"),
    Seam("install_dp_reduction",
         "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.gradient_reduction_w_predivide", "replaces",
         "ZeRO 1 still files each rank's partition; its averaging all-reduce of equal tensors becomes the identity"),
    Seam("dp_parameters", "deepspeed.runtime.bf16_optimizer.BF16_Optimizer.bf16_groups", "reads",
         "the bf16 optimizer's parameter order, the same on every data-parallel peer"),
    Seam("dp_gradients", "deepspeed.runtime.bf16_optimizer.BF16_Optimizer.fp32_groups_gradients", "reads",
         "where the bf16 optimizer accumulates gradients (fp32) at the accumulation boundary"),
    Seam("count_dp_bytes", "deepspeed.comm.torch.TorchBackend.all_gather_function", "replaces",
         "DeepSpeed bound its all-gather before our byte counter wrapped torch's (logging.comm_bytes)"),
    Seam("count_dp_bytes", "deepspeed.comm.torch.TorchBackend.reduce_scatter_function", "replaces",
         "the same for its reduce-scatter"),
    Seam("groups_carry_timeout", "deepspeed.comm.torch.TorchBackend.new_group", "replaces",
         "groups DeepSpeed creates get parallel.collective_timeout_s instead of torch's default"),
    Seam("capture_timer_logs", "deepspeed.utils.timer.SynchronizedWallClockTimer.log", "replaces",
         "DeepSpeed prints and resets its step timers; logging.time_breakdown keeps the values"),
    Seam("StagedPipelineModule", "deepspeed.runtime.pipe.module.PipelineModule._partition_layers", "overrides",
         "our stage boundaries (parallel.partition) instead of DeepSpeed's methods"),
    Seam("StagedPipelineModule", "deepspeed.runtime.pipe.module.PipelineModule._set_bounds", "calls",
         "the part of _partition_layers that builds this stage's layers"),
    Seam("deepspeed_load_checkpoint", f"{_ENGINE}._get_all_zero_checkpoints", "replaces",
         "growing dp: DeepSpeed indexes the saved shard list at the new dp rank (for fields all shards hold)"),
    Seam("deepspeed_load_checkpoint", f"{_ENGINE}.seq_dp_world_size", "replaces",
         "its engine refuses any dp change before its elastic ZeRO loader (which handles it) runs"),
    Seam("deepspeed_load_checkpoint", "deepspeed.runtime.checkpoint_engine.TorchCheckpointEngine.load", "replaces",
         "every checkpoint file read with torch.load(weights_only=True)"),
    Seam("recording", "deepspeed.runtime.checkpoint_engine.TorchCheckpointEngine.save", "replaces",
         "files are hashed while written (no second read for the manifest)"),
    Seam("init_fragment_state", "deepspeed.runtime.bf16_optimizer.BF16_Optimizer._lazy_init_hp_params_optimizer_state",
         "calls", "resharding writes optimizer fragments before the first step created them"),
    Seam("has_fragment_mapping", "deepspeed.utils.mixed_precision_linkage.link_hp_params", "reads",
         "a parameter DeepSpeed's ZeRO 1/2 or bf16 optimizer maps (its `_hp_mapping`) gets fragment writes"),
    Seam("skip_compile_imports", "deepspeed.runtime.zero.muon.muon_optimizer.MuonWithAuxAdam", "replaces",
         "its module compiles Muon's kernels at import (~1 s of CPU per process)"),
    Seam("skip_compile_imports", "deepspeed.runtime.zero.muon.original_muon.muon_update", "replaces",
         "imported by every ZeRO 1/2 gradient partition, called only for Muon parameters"),
    Seam("skip_shm_build", "deepspeed.comm.torch.build_shm_op", "replaces",
         "on CPU it JIT-compiles a C++ op at start (27-82 s, silent, on a fresh install) for inference only"),
    Seam("quiet_memory_reports", "deepspeed.runtime.bf16_optimizer.see_memory_usage", "replaces",
         "its bf16 optimizer prints 16 lines of memory figures at start, forced on (logging.level=debug keeps them)"),
)


def installed_deepspeed() -> str:
    return importlib.metadata.version("deepspeed")


def check_deepspeed_version(installed: Optional[str] = None) -> None:
    """Refuse, in one line naming the seams, a DeepSpeed other than the one they were checked
    against, unless $LAUNCHER_UNCHECKED_DEEPSPEED=1."""
    installed = installed or installed_deepspeed()
    if installed == TESTED_DEEPSPEED or os.environ.get(UNCHECKED_ENV) == "1":
        return
    names = ", ".join(dict.fromkeys(s.function for s in SEAMS))
    raise ConfigError("deepspeed", f"version {installed} is installed, but the launcher's DeepSpeed seams ({names}; "
                      f"launcher/ds/seams.py) were checked against {TESTED_DEEPSPEED}: pip install "
                      f"deepspeed=={TESTED_DEEPSPEED}, or run tests/test_seams.py on {installed} and set "
                      f"{UNCHECKED_ENV}=1")


def seam_target_present(dotted: str) -> bool:
    """Whether DeepSpeed still has `dotted` (module.Class.attribute): a class attribute, or an
    instance attribute its class's source assigns (`self.name = ...`)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for i, name in enumerate(parts[cut:]):
            if hasattr(owner, name):
                owner = getattr(owner, name)
            elif i == len(parts) - cut - 1 and inspect.isclass(owner):
                return any(f"self.{name} =" in inspect.getsource(cls) or f"self.{name}:" in inspect.getsource(cls)
                           for cls in owner.__mro__ if cls.__module__.startswith("deepspeed"))
            else:
                return False
        return True
    return False


# --- Steps: gradient norm, data-parallel reduction, timers ---
def keep_fp32_grad_norm(engine) -> None:
    """fp32 with ZeRO 0: DeepSpeed's `clip_fp32_gradients` clips but throws the norm away
    (`get_global_grad_norm()` stays None), and counts a pipeline-tied weight on both of its
    stages. This replacement counts each parameter once (`mark_grad_norm_owners` in launcher/training/engine.py, skipping
    DeepSpeed's `ds_pipe_replicated` copies), clips by the same rule and keeps the norm."""
    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        counted = [p.grad.detach().float().pow(2).sum() for p in params
                   if is_model_parallel_parameter(p) and not getattr(p, "ds_pipe_replicated", False)]
        sq = torch.stack(counted).sum() if counted else torch.zeros((), device=params[0].device)
        dist.all_reduce(sq, group=engine.mpu.get_model_parallel_group())  # the ranks holding one model replica
        norm = sq.sqrt()
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef)
        engine._global_grad_norm = norm.item()

    engine.clip_fp32_gradients = clip


def dp_parameters(engine) -> list[torch.nn.Parameter]:
    """The parameters whose gradients DeepSpeed averages over data parallel, in a fixed
    order (the same on every data-parallel peer)."""
    if isinstance(engine.optimizer, BF16_Optimizer):
        return [p for params in engine.optimizer.bf16_groups for p in params]
    return [p for p in engine.module.parameters() if p.requires_grad]


def dp_gradients(engine) -> list[torch.Tensor]:
    """Where those gradients are at the accumulation boundary: `param.grad`, or with the bf16
    optimizer (bf16 with ZeRO 0/1) its fp32 accumulators, flat per param group."""
    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return [g.view(p.shape) for params, grads in zip(opt.bf16_groups, opt.fp32_groups_gradients)
                for p, g in zip(params, grads)]
    grads = [p.grad for p in dp_parameters(engine)]
    if any(g is None for g in grads):
        raise RuntimeError("compression: a parameter got no gradient; every parameter must take part in the step")
    return grads


def install_dp_reduction(engine, reduce_now: Callable[[], None]) -> None:
    """Make `reduce_now` (which leaves every data-parallel rank holding the same averaged
    gradients, `dp_gradients`) the data-parallel gradient reduction of a DeepSpeed engine
    (ZeRO 0/1).

    DeepSpeed reduces gradients in `allreduce_gradients` (called by `backward`, and by the
    pipeline engine's ReduceGrads instruction) or, for the pipeline engine with its bf16
    optimizer, in `_bf16_reduce_grads`. Both become: ours at the accumulation boundary. ZeRO
    0 and the bf16 optimizer have nothing left to do. ZeRO 1's optimizer still runs its
    reduction to file each rank's partition of the gradient, with its collective
    (`gradient_reduction_w_predivide`, an averaging all-reduce) replaced by the identity:
    the average of equal tensors is the tensor. The equivalence tests (PowerSGD's exact
    warm-up = `none`) guard them."""
    zero_reduce = engine.allreduce_gradients if isinstance(engine.optimizer, DeepSpeedZeroOptimizer) else None

    def allreduce_gradients(bucket_size=None) -> None:
        if not engine.is_gradient_accumulation_boundary():
            return  # ZeRO 0/1 reduce only at the boundary
        reduce_now()
        if zero_reduce is not None:
            zero_reduce()

    if zero_reduce is not None:
        engine.optimizer.gradient_reduction_w_predivide = lambda tensor, communication_data_type: tensor
    engine.allreduce_gradients = allreduce_gradients
    engine._bf16_reduce_grads = allreduce_gradients


def capture_timer_logs(ds_engine, captured_ms: dict) -> None:
    """Add what DeepSpeed's wall-clock timers report into `captured_ms` (name -> ms) as it
    logs them: DeepSpeed prints and resets its timers itself at each step."""
    timers, real_log = ds_engine.timers, ds_engine.timers.log

    def log(names, normalizer=1.0, reset=True, **kwargs):
        for name in names:
            if name in timers.get_timers():
                value = timers.get_timers()[name].elapsed(reset=False) / normalizer
                captured_ms[name] = captured_ms.get(name, 0.0) + value
        return real_log(names, normalizer=normalizer, reset=reset, **kwargs)

    timers.log = log


def count_dp_bytes(groups: ProcessGroups) -> CollectiveBytes:
    """Start counting this rank's data-parallel collective bytes (logging.comm_bytes)."""
    counter = CollectiveBytes(groups.dp_ranks).install()
    backend = ds_comm.cdb
    if backend is not None:  # it picked its all-gather / reduce-scatter before the wrapper existed
        backend.all_gather_function = backend.get_all_gather_function()
        backend.reduce_scatter_function = backend.get_reduce_scatter_function()
    return counter

# --- Process groups and the pipeline module ---
def groups_carry_timeout(timeout: timedelta) -> None:
    """Make the groups DeepSpeed creates itself (pipeline grid, p2p, tied weights, ZeRO,
    deepspeed.utils.groups) carry our timeout.

    torch gives a group made without `timeout=` its backend's default (30 min gloo, 10 min
    NCCL; torch 2.13 `_new_group_with_tag` -> `_get_default_timeout`), not the world group's.
    Every DeepSpeed group goes through `deepspeed.comm.new_group(ranks)` ->
    `TorchBackend.new_group(ranks)` -> `torch.distributed.new_group(ranks)`, with no timeout.
    So we replace that one method on DeepSpeed's backend object (`deepspeed.comm.comm.cdb`),
    leaving torch.distributed itself untouched; assigning it again on a second call replaces,
    never stacks. (DeepSpeed's `init_device_mesh` path is not covered; we do not use it.)"""
    def new_group(ranks, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return dist.new_group(ranks, **kwargs)

    ds_comm.cdb.new_group = new_group


class StagedPipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule with the stage boundaries we computed
    (parallel.partition): `parts[s]:parts[s + 1]` are the items of stage s. DeepSpeed has no
    public way to pass boundaries, so `_partition_layers` is overridden."""

    def __init__(self, layers: Sequence, parts: Sequence[int], **kwargs):
        layers = list(layers)
        stages = kwargs["topology"].get_dim("pipe")
        if len(parts) != stages + 1 or parts[0] != 0 or parts[-1] != len(layers):
            raise ValueError(f"boundaries {list(parts)} do not cover {len(layers)} layers in {stages} stages")
        if any(b <= a for a, b in zip(parts, parts[1:])):
            raise ValueError(f"boundaries {list(parts)} leave a stage empty")
        self._explicit_parts = [int(p) for p in parts]
        # (DeepSpeed's constructor ends with `self.to(cuda:$LOCAL_RANK)`: launcher/training/launch_env.py
        # export_env makes LOCAL_RANK the device index we picked.)
        super().__init__(layers, partition_method="explicit", **kwargs)

    def _partition_layers(self, method: str = "explicit") -> None:
        self.parts = list(self._explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

# --- Checkpoints: save, load, reshard ---
def deepspeed_state_classes() -> list:
    """The DeepSpeed classes its own checkpoints pickle (loss scalers, the ZeRO stage enum,
    the bf16 optimizer's fragment addresses): plain data holders, allowed by name so that
    every file is read with `torch.load(weights_only=True)`, which runs no code from the
    file. Found by loading checkpoints of every engine path (ZeRO 0-3, fp32/bf16/fp16,
    pipeline) with weights_only=True; tests/test_checkpoint.py loads each path this way."""
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    """torch.load that cannot execute code from the file (DeepSpeed's engine loads with
    weights_only=False)."""
    with torch.serialization.safe_globals(deepspeed_state_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


class _ClampedList(list):
    """A list whose out-of-range integer indices give its last element (see `deepspeed_load_checkpoint`)."""
    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = len(self) - 1
        return super().__getitem__(index)


def deepspeed_load_checkpoint(ds_engine, ckpt: Path, saved_dp: int, current_dp: int) -> None:
    """DeepSpeed's own loader, for a checkpoint of this layout (the data degree may differ)."""
    ds_engine.checkpoint_engine.load = load_weights_only
    real_dp, real_reader = ds_engine.seq_dp_world_size, ds_engine._get_all_zero_checkpoints
    if saved_dp != current_dp:
        ds_engine.seq_dp_world_size = saved_dp
        if current_dp > saved_dp:
            # Growing dp: DeepSpeed also reads the shard list at index `new dp rank` (only for
            # the global fields every shard holds alike) before merging the whole list.
            ds_engine._get_all_zero_checkpoints = lambda *a: _ClampedList(real_reader(*a) or [])
    try:
        path, _ = ds_engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    finally:
        ds_engine.seq_dp_world_size = real_dp
        ds_engine._get_all_zero_checkpoints = real_reader
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")


class RecordingEngine:
    """DeepSpeed's TorchCheckpointEngine with `save` through `Written`; everything else
    (create, commit, makedirs, load, preserves_storage_sharing: its clone decisions) is
    the wrapped engine's."""
    def __init__(self, inner, written):
        self._inner = inner
        self._written = written

    def save(self, state_dict, path: str) -> None:
        self._written.torch_save(state_dict, path, zipfile=self._inner.zipfile_serialization)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def recording(ds_engine, written):
    """For the length of the block, DeepSpeed's files go through `written`. Another engine
    than DeepSpeed's default (a configured fast or decoupled writer) is left alone: its files
    are then checksummed from disk when the save is finished."""
    inner = ds_engine.checkpoint_engine
    if type(inner) is not TorchCheckpointEngine:
        yield
        return
    ds_engine.checkpoint_engine = RecordingEngine(inner, written)
    try:
        yield
    finally:
        ds_engine.checkpoint_engine = inner


def has_fragment_mapping(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed's ZeRO 1/2 or bf16 optimizer keeps this parameter's fp32 master and
    moments as fragments of its flat buffers (write them with deepspeed.utils' safe_set_*)."""
    return hasattr(param, "_hp_mapping")


def init_fragment_state(optimizer) -> None:
    """ZeRO 1/2 and the bf16 optimizer link each parameter to its fragment of the optimizer
    state at their first step; link them now (the state must exist: zeros, overwritten next)."""
    optimizer._lazy_init_hp_params_optimizer_state()


def can_init_fragment_state(optimizer) -> bool:
    return hasattr(optimizer, "_lazy_init_hp_params_optimizer_state")


def _not_muon(*args, **kwargs):
    raise RuntimeError("launcher/ds/seams.py stood in for DeepSpeed's Muon: no launcher optimizer is Muon")


def skip_compile_imports() -> None:
    """Spare each process ~1 s of CPU at start when nothing compiles (model.compile off).
    DeepSpeed's ZeRO optimizers import its Muon modules, which run torch.compile at import, only
    to ask `isinstance(optimizer, MuonWithAuxAdam)` or to hold `muon_update` for Muon
    parameters: the launcher's optimizers (AdamW, Lion) never are Muon."""
    for module, name, stand_in in [("muon_optimizer", "MuonWithAuxAdam", type("MuonWithAuxAdam", (), {})),
                                   ("original_muon", "muon_update", _not_muon)]:
        module = f"deepspeed.runtime.zero.muon.{module}"
        if module not in sys.modules:
            sys.modules[module] = types.ModuleType(module, "a stand-in: no launcher optimizer is Muon")
            setattr(sys.modules[module], name, stand_in)


def skip_shm_build() -> None:
    """Its comm backend builds a CPU shared-memory all-reduce at start (C++, JIT) for its inference
    all-reduce only. (The attribute `deepspeed.comm.torch` is torch itself, star-imported.)"""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def quiet_memory_reports() -> None:
    """Silence the memory figures DeepSpeed's bf16 optimizer prints (forced) while it builds."""
    bf16_optimizer.see_memory_usage = lambda message, force=False: None

"""What a checkpoint records about the run it belongs to (launcher_state.json, rng/).

- `SavedLayout`: how the state is cut (tensor, pipeline and data degrees, ZeRO stage,
  dtype, pipeline stage boundaries), and what follows from comparing it with this run's:
  the same layout (every rank's files mean the same), a layout DeepSpeed's own loader reads,
  or one to reshard (launcher/checkpoint/reshard.py).
- `LauncherState`: step, tokens seen, the sampler's position, the layout and the config
  fingerprint (the fields a resume must not change); `launcher_state.json` in every
  checkpoint, its JSON unchanged since checkpoints were first written.
- Before any process starts: the layout of the checkpoint a launch would resume
  (`resume_layout`, for the planner's `auto`) and the refusals a resume cannot get past
  (`check_resume_config`).
- Every rank's RNG states as plain data (loadable with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.checkpoint.store import (
    STATE,
    checkpoint_root,
    explicit_resume,
    published,
    resume_candidates,
)
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.formats.tokenizer import load_tokenizer
from launcher.planning.plan import Plan
from parallel.layout import expert_degree_fits


@dataclass(frozen=True)
class SavedLayout:
    """How a checkpoint's state is cut; `layout` in launcher_state.json, e.g.
    {"tp": 2, "pp": 2, "dp": 2, "zero_stage": 1, "dtype": "bf16", "parts": [0, 4, 8]}."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    dtype: str  # fp32 | bf16 | fp16
    # Pipeline stage boundaries over the items (which layers each stage's files hold);
    # None: a checkpoint written before they were recorded.
    parts: Optional[tuple[int, ...]] = None
    # The expert-parallel degree when it is above tp (experts over data ranks too; DeepSpeed's
    # model-parallel files are then numbered over the expert group); 0: the tensor degree.
    ep: int = 0
    cp: int = 1  # the context degree: DeepSpeed's per-rank files are numbered over dp x cp

    @property
    def model_ranks(self) -> int:
        """DeepSpeed's model-parallel ranks per pipeline stage: the `mp_rank_MM` files of one
        stage (parallel/layout.py `Layout.ds_model`)."""
        return self.ep or self.tp

    @classmethod
    def of_run(cls, cfg: Config, plan: Plan) -> SavedLayout:
        lay = plan.layout
        return cls(tp=lay.tp, pp=lay.pp, dp=lay.dp, zero_stage=cfg.zero.stage, dtype=plan.dtype,
                   parts=tuple(plan.parts), ep=lay.ep, cp=lay.cp)

    def to_json(self) -> dict:
        """The JSON object, keys in the order checkpoints have always had them."""
        out = {"tp": self.tp, "pp": self.pp, "dp": self.dp, "zero_stage": self.zero_stage, "dtype": self.dtype}
        if self.parts is not None:
            out["parts"] = list(self.parts)
        if self.ep:
            out["ep"] = self.ep
        if self.cp > 1:
            out["cp"] = self.cp
        return out

    @classmethod
    def from_json(cls, record: dict) -> SavedLayout:
        """TypeError on a record that is not a layout (callers treat the checkpoint as unreadable)."""
        fields = dict(record)
        parts = fields.pop("parts", None)
        layout = cls(**fields, parts=None if parts is None else tuple(parts))
        degrees = (layout.tp, layout.pp, layout.dp, layout.ep, layout.cp, *(layout.parts or ()))
        # a damaged record must not reach range(tp) or a file name: the same refusal as a missing field
        if (not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 20 for n in degrees)
                or min(layout.tp, layout.pp, layout.dp, layout.cp) < 1 or layout.zero_stage not in (0, 1, 2, 3)
                or layout.dtype not in ("fp32", "bf16", "fp16")
                or (layout.ep and not expert_degree_fits(layout.ep, layout.tp, layout.dp * layout.cp))):
            raise TypeError(f"not a layout: {record}")
        return layout

    def describe(self) -> str:
        experts = f" (experts over {self.ep} ranks)" if self.ep else ""
        context = f" x context {self.cp}" if self.cp > 1 else ""
        return (f"tensor {self.tp}{context} x pipeline {self.pp} x data {self.dp}{experts}, ZeRO {self.zero_stage}, "
                f"{self.dtype}")


def _same_cut(saved: SavedLayout, current: SavedLayout) -> bool:
    """tp, pp, ZeRO stage, dtype and stage boundaries alike; a checkpoint written before
    `parts` was recorded counts as having this run's boundaries."""
    return ((saved.tp, saved.pp, saved.model_ranks, saved.zero_stage, saved.dtype)
            == (current.tp, current.pp, current.model_ranks, current.zero_stage, current.dtype)
            and (saved.parts is None or saved.parts == current.parts))


def same_layout(saved: SavedLayout, current: SavedLayout) -> bool:
    """Every rank's files mean the same on both (RNG and PowerSGD state are per rank)."""
    return _same_cut(saved, current) and (saved.dp, saved.cp) == (current.dp, current.cp)


def deepspeed_loads(saved: SavedLayout, current: SavedLayout) -> bool:
    """Whether DeepSpeed's own loader reads this checkpoint for this run: the same tp, pp,
    stage boundaries, ZeRO stage and dtype; the data degree may differ with fp32 and ZeRO
    0-2 (its elastic ZeRO format). Anything else is resharded (launcher/checkpoint/reshard.py)."""
    if not _same_cut(saved, current):
        return False
    if saved.cp != current.cp:  # DeepSpeed's data degree is dp x cp: another cp is resharded
        return False
    # with experts over data ranks DeepSpeed's data degree is not ours: only the very same layout
    return saved.dp == current.dp or (current.dtype == "fp32" and current.zero_stage <= 2 and not current.ep
                                      and current.cp == 1)


def resume_layout(cfg: Config) -> Optional[SavedLayout]:
    """The layout of the checkpoint this launch would resume from, when it can tell before
    starting; None for a fresh start. The planner keeps its tensor and pipeline degrees for
    `auto`."""
    if cfg.checkpoint.resume == "none":
        return None
    explicit = explicit_resume(cfg)
    try:
        candidates = resume_candidates(checkpoint_root(cfg), explicit)
    except OSError:
        return None
    for candidate in candidates:
        try:
            return LauncherState.read(candidate).layout
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_resume_config(cfg: Config, plan: Plan) -> None:
    """Before any process starts: refuse what a resume cannot do, as one-line ConfigErrors."""
    root = checkpoint_root(cfg)
    existing = published(root)
    mode = cfg.checkpoint.resume
    if mode == "none":
        if existing and not cfg.checkpoint.overwrite:
            raise ConfigError("checkpoint.resume", f"none, but {root} holds checkpoints (newest {existing[0].name}); "
                              "set checkpoint.overwrite=true to delete them and start over, or resume: auto")
        return
    if mode == "required" and not existing:
        raise ConfigError("checkpoint.resume", f"required, but {root} holds no checkpoint")
    explicit = explicit_resume(cfg)
    current = SavedLayout.of_run(cfg, plan)
    for candidate in [explicit] if explicit else existing:
        try:
            saved = LauncherState.read(candidate)
        except (OSError, ValueError, TypeError):
            continue  # unreadable: the verification at start skips it with a warning
        changed = fingerprint_diff(saved.fingerprint, fingerprint(cfg))
        if changed:
            raise ConfigError(changed[0], f"differs from checkpoint {candidate} (changed: {', '.join(changed)}); "
                              "these must stay the same to resume: restore them, or start a new run "
                              "(run.name / checkpoint.dir)")
        if 3 in (saved.layout.zero_stage, current.zero_stage) and not same_layout(saved.layout, current):
            raise ConfigError("zero.stage", f"checkpoint {candidate} was saved with {saved.layout.describe()}, "
                              f"this run has {current.describe()}: a ZeRO 3 checkpoint resumes on its own "
                              "layout, and a layout change resumes into ZeRO 0-2 only (docs/CHECKPOINTS.md)")


def fingerprint(cfg: Config, weights_from: Optional[dict] = None) -> dict:
    """Config fields a resume must not change: they define the weights' shapes, the
    optimizer step's batch and the sample stream (changing them would silently train a
    different run). `weights_from` (launcher.hf.weights.weights_source: where the run's
    initial weights came from, model.init_from) is recorded, not compared: a resume loads
    the checkpoint's weights whatever model.init_from says."""
    model = dataclasses.asdict(cfg.model)
    model.pop("init_from")
    model.pop("compile")  # how the blocks run, not what they compute
    out = {"model": model, "global_batch": cfg.parallel.global_batch,
           "seed": cfg.train.seed, "data.tokenizer": load_tokenizer(cfg.data.tokenizer).sha256,
           "data.val_fraction": cfg.data.val_fraction}
    # Recorded, not compared: a resume may change the schedule, and says what that does.
    out["schedule"] = {"train.steps": cfg.train.steps, "optimizer.lr": cfg.optimizer.lr,
                       "schedule.warmup_steps": cfg.schedule.warmup_steps, "schedule.min_lr": cfg.schedule.min_lr}
    if weights_from is not None:
        out["weights_from"] = weights_from
    return out


_FINGERPRINT_KEYS = {"global_batch": "parallel.global_batch", "seed": "train.seed"}  # as the config spells them
_RECORDED_ONLY = ("weights_from", "schedule")


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Config keys of the fields that differ, e.g. ['model.hidden', 'parallel.global_batch']."""
    out = []
    for key in sorted((set(saved) | set(current)) - set(_RECORDED_ONLY)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in fingerprint_diff(a, b)]
        elif a != b:
            out.append(_FINGERPRINT_KEYS.get(key, key))
    return out


@dataclass
class LauncherState:
    """launcher_state.json: where the run is and what it must stay to be resumed."""

    step: int
    tokens_seen: int
    consumed_samples: int
    layout: SavedLayout
    fingerprint: dict  # config fields that must not change across a resume
    data: Optional[dict] = None  # launcher.data.sampling.SampleSource.state_dict: the position in every source

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "layout": self.layout.to_json()}, indent=1)

    @classmethod
    def read(cls, ckpt: Path) -> LauncherState:
        """OSError, ValueError or TypeError when the file is missing or not a state."""
        record = json.loads((ckpt / STATE).read_text())
        if not isinstance(record, dict):
            raise TypeError(f"{ckpt / STATE}: not a JSON object")
        state = cls(**{**record, "layout": SavedLayout.from_json(record.get("layout"))})
        if not isinstance(state.fingerprint, dict) or not isinstance(state.fingerprint.get("model"), dict):
            raise TypeError(f"{ckpt / STATE}: no model in its fingerprint")
        return state


def numpy_state_to_plain(state: dict) -> dict:
    """numpy's `get_state(legacy=False)` with its key array as a tensor: loadable by
    `torch.load(weights_only=True)`, which refuses numpy objects (they unpickle as code)."""
    return {**state, "state": {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}}


def plain_to_numpy_state(state: dict) -> dict:
    return {**state, "state": {**state["state"], "key": state["state"]["key"].numpy().astype(np.uint32)}}


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generators, as plain lists, numbers and tensors."""
    state = {"python": random.getstate(), "numpy": numpy_state_to_plain(np.random.get_state(legacy=False)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(plain_to_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.checkpoint.store import STATE, checkpoint_root, explicit_resume, published

LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage", "dtype")


def layout_record(cfg, plan) -> dict:
    """How the run's state is cut: the degrees, ZeRO stage, dtype and the pipeline stage
    boundaries over the items (`parts`: which layers each stage's files hold)."""
    lay = plan.layout
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": cfg.zero.stage, "dtype": plan.dtype,
            "parts": list(plan.parts)}


def same_layout(saved: dict, current: dict) -> bool:
    """Every rank's files mean the same on both (RNG and PowerSGD state are per rank).
    A checkpoint written before `parts` was recorded counts as having this run's boundaries."""
    return all(saved.get(k) == current.get(k) for k in LAYOUT_KEYS) and saved.get("parts", current["parts"]) == \
        current["parts"]


def deepspeed_loads(saved: dict, current: dict) -> bool:
    """Whether DeepSpeed's own loader reads this checkpoint for this run: the same tp, pp,
    stage boundaries, ZeRO stage and dtype; the data degree may differ with fp32 and ZeRO
    0-2 (its elastic ZeRO format). Anything else is resharded (launcher.reshard)."""
    keep = ("tp", "pp", "zero_stage", "dtype")
    if any(saved.get(k) != current.get(k) for k in keep) or saved.get("parts", current["parts"]) != current["parts"]:
        return False
    return saved["dp"] == current["dp"] or (current["dtype"] == "fp32" and current["zero_stage"] <= 2)


def describe_layout(layout: dict) -> str:
    return (f"tensor {layout['tp']} x pipeline {layout['pp']} x data {layout['dp']}, ZeRO {layout['zero_stage']}, "
            f"{layout['dtype']}")


def resume_layout(cfg) -> Optional[dict]:
    """The layout record (tp, pp, dp, zero_stage, dtype) of the checkpoint this launch would
    resume from, when it can tell before starting; None for a fresh start. The planner keeps
    its tensor and pipeline degrees for `auto`."""
    if cfg.checkpoint.resume == "none":
        return None
    explicit = explicit_resume(cfg)
    try:
        candidates = [explicit] if explicit else published(checkpoint_root(cfg))
    except OSError:
        return None
    for candidate in candidates:
        try:
            return LauncherState.read(candidate).layout
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_resume_config(cfg, plan) -> None:
    """Before any process starts: refuse what a resume cannot do, as one-line ConfigErrors."""
    from launcher.errors import ConfigError

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
    current = layout_record(cfg, plan)
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
        if 3 in (saved.layout["zero_stage"], current["zero_stage"]) and not same_layout(saved.layout, current):
            raise ConfigError("zero.stage", f"checkpoint {candidate} was saved with {describe_layout(saved.layout)}, "
                              f"this run has {describe_layout(current)}: a ZeRO 3 checkpoint resumes on its own "
                              "layout, and a layout change resumes into ZeRO 0-2 only (docs/CHECKPOINTS.md)")


def fingerprint(cfg, weights_from: Optional[dict] = None) -> dict:
    """Config fields a resume must not change: they define the weights' shapes, the
    optimizer step's batch and the sample stream (changing them would silently train a
    different run). `weights_from` (launcher.hf_weights.weights_source: where the run's
    initial weights came from, model.init_from) is recorded, not compared: a resume loads
    the checkpoint's weights whatever model.init_from says."""
    from launcher.formats.tokenizer import load_tokenizer

    model = dataclasses.asdict(cfg.model)
    model.pop("init_from")
    model.pop("compile")  # how the blocks run, not what they compute
    out = {"model": model, "global_batch": cfg.parallel.global_batch,
           "seed": cfg.train.seed, "data.tokenizer": load_tokenizer(cfg.data.tokenizer).sha256,
           "data.val_fraction": cfg.data.val_fraction}
    if weights_from is not None:
        out["weights_from"] = weights_from
    return out


_FINGERPRINT_KEYS = {"global_batch": "parallel.global_batch", "seed": "train.seed"}  # as the config spells them
_RECORDED_ONLY = ("weights_from",)


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
    step: int
    tokens_seen: int
    consumed_samples: int
    layout: dict  # tp, pp, dp, zero_stage, dtype
    fingerprint: dict  # config fields that must not change across a resume
    data: Optional[dict] = None  # launcher.data.SampleSource.state_dict: the position in every source

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)

    @classmethod
    def read(cls, ckpt: Path) -> "LauncherState":
        return cls(**json.loads((ckpt / STATE).read_text()))


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

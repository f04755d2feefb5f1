"""Every check that runs before a process group or tensor exists, in one place.

`--dry-run` and the real launch call the same `preflight`, so a dry run that passes never
ends in a configuration error at launch. The one difference is the device: the launch asks
the machine it runs on (`launcher/planning/precision.py: detect_device_support`), a dry run assumes the
GPU cluster the config is meant for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from launcher.checkpoint.state import check_resume_config
from launcher.checkpoint.store import (
    MANIFEST,
    STATE,
    checkpoint_root,
    explicit_resume,
    published,
    resume_candidates,
)
from launcher.config.derived import run_dir
from launcher.config.schema import Config
from launcher.data.shards import read_manifest
from launcher.data.sources import (
    EMBEDDED,
    check_split_size,
    data_sources,
    embedded_byte_streams,
    open_dataset,
    source_key,
)
from launcher.ds.config import check_deepspeed_config, deepspeed_config
from launcher.errors import ConfigError
from launcher.formats.tokenizer import load_tokenizer
from launcher.hf.weights import check_hf_weights
from launcher.metrics.tracking import check_wandb_login
from launcher.planning.plan import Plan, make_plan
from launcher.planning.precision import DeviceSupport


def preflight(cfg: Config, world_size: int, device: DeviceSupport) -> tuple[Plan, dict]:
    """(plan, DeepSpeed config) for this world size, or a ConfigError naming the key."""

    plan = make_plan(cfg, world_size, device)
    check_compile(cfg, device)
    check_data(cfg)
    check_init_from(cfg)
    ds_config = deepspeed_config(cfg, plan)
    check_deepspeed_config(ds_config, cfg.deepspeed, plan)
    check_output_dirs(cfg)
    check_explicit_resume(cfg)
    try:
        check_resume_config(cfg, plan)
    except OSError as err:  # a checkpoint directory we may not list or read
        raise ConfigError("checkpoint.dir", f"cannot read {err.filename}: {err.strerror or err}") from None
    check_wandb_login(cfg.logging.wandb)
    return plan, ds_config


def check_compile(cfg: Config, device: DeviceSupport) -> None:
    """model.compile builds kernels at the first step: C++ on a CPU (inductor), and Triton's
    launchers with a C compiler on a GPU. Without one, torch fails deep inside the first
    forward; say so before anything starts."""
    if not cfg.model.compile:
        return
    variable, names, what = (("CC", ("gcc", "cc", "clang"), "a C compiler (Triton builds its kernel launchers)")
                             if device.is_gpu else ("CXX", ("g++", "c++", "clang++"), "a C++ compiler (inductor's CPU "
                                                    "backend)"))
    if os.environ.get(variable) or any(shutil.which(name) for name in names):
        return
    raise ConfigError("model.compile", f"true needs {what} on {device.name}: none of {', '.join(names)} is on PATH "
                      f"and ${variable} is unset; install one (apt-get install {names[0]}) or set model.compile=false")


def check_init_from(cfg: Config) -> None:
    """model.init_from holds every tensor the config needs, with its shape (the files'
    headers only), unless the run resumes a checkpoint, whose weights it loads instead."""

    if not cfg.model.init_from:
        return
    if cfg.checkpoint.resume != "none" and (explicit_resume(cfg) or published(checkpoint_root(cfg))):
        return
    check_hf_weights(cfg.model, Path(cfg.model.init_from))


def check_output_dirs(cfg: Config) -> None:
    """The run directory and the checkpoint directory can be created: no NUL in the path, no
    file where a directory must be (writability is the launch's business: a dry run may
    check a cluster's paths on a laptop)."""

    run_key = "run.dir" if cfg.run.dir else "run.name"
    for key, path in ((run_key, run_dir(cfg)), ("checkpoint.dir" if cfg.checkpoint.dir else run_key,
                                               checkpoint_root(cfg))):
        if "\x00" in str(path):
            raise ConfigError(key, f"{str(path)!r} contains a NUL character")
        for parent in (path, *path.parents):
            try:
                if parent.is_dir():
                    break
                if parent.exists() or parent.is_symlink():
                    raise ConfigError(key, f"{path} cannot be a directory: {parent} is a file")
            except OSError as err:  # e.g. a parent we may not look into
                raise ConfigError(key, f"cannot look at {parent}: {err.strerror or err}") from None


def check_explicit_resume(cfg: Config) -> None:
    """`checkpoint.resume: <path>` names a checkpoint (a step-NNNNNNNN directory) or a run
    directory holding checkpoints, not any directory: else the launch would stop with 'no
    checkpoint verifies'."""
    path = explicit_resume(cfg)
    if path is None:
        return
    files = [(path / name).is_file() for name in (STATE, MANIFEST)]
    if all(files) or (not any(files) and resume_candidates(checkpoint_root(cfg), path)):  # a checkpoint, a run
        return
    missing = [name for name in (STATE, MANIFEST) if not (path / name).is_file()]
    raise ConfigError("checkpoint.resume", f"{path} is not a checkpoint (no {missing[0]}) nor a run directory with "
                      "checkpoints: give a run directory, one of its checkpoints/step-NNNNNNNN directories, or auto")


def check_data(cfg: Config) -> None:
    """Every dataset is a prepared directory tokenized by this run's tokenizer, and its
    training and held-out parts each hold at least one sequence (seq_len + 1 tokens). Reads
    manifests and boundary indexes only. The embedded corpus is prepared at launch, into the
    run directory, and checked there."""

    data = cfg.data
    tokenizer = load_tokenizer(data.tokenizer)
    named = [(source_key(i, data), s.path) for i, s in enumerate(data_sources(data))]
    if data.val_path:
        named.append(("data.val_path", data.val_path))
    for key, path in named:
        held_out = key != "data.val_path" and not data.val_path
        if path == EMBEDDED:
            if data.tokenizer == "byte":  # other tokenizers: checked once prepared, at launch
                train, val = embedded_byte_streams(data.val_fraction if held_out else None)
                _check_splits(cfg, key, path, train, val if held_out else None)
            continue
        made_by = read_manifest(path, key)["tokenizer"]
        if made_by.get("sha256") != tokenizer.sha256:
            raise ConfigError(key, f"{path} was prepared with tokenizer {made_by.get('name')} "
                              f"({str(made_by.get('sha256'))[:12]}), not data.tokenizer={data.tokenizer} "
                              f"({tokenizer.sha256[:12]}): prepare it again with --tokenizer {data.tokenizer}, "
                              "or train with the tokenizer it was prepared with")
        dataset = open_dataset(path, Path(path), data.val_fraction if held_out else None, key)
        _check_splits(cfg, key, path, dataset.train, dataset.val if held_out else None)


def _check_splits(cfg: Config, key: str, path: str, train, val) -> None:

    check_split_size(train, cfg.model.seq_len, key, path if key == "data.val_path" else f"the training part of {path}")
    if val is not None:
        check_split_size(val, cfg.model.seq_len, "data.val_fraction",
                         f"the held-out part of {path} ({cfg.data.val_fraction:g} of its tokens)")

"""Which dtype a run trains in, decided before launch from what the device can do.

`precision.dtype: auto` is bf16 on a GPU that supports it (fp16 on one that only has fp16,
e.g. V100; fp32 with ZeRO 0 and no pipeline, where DeepSpeed would accumulate bf16
gradients in bf16), and fp32 on CPU (CPU bf16/fp16 kernels are slower than fp32 on most hosts and
the CPU is our test bed, where fp32 gives exact comparisons). An explicit bf16 or fp16 that
the device cannot run is refused with one line (exit 2) instead of DeepSpeed's traceback
("Type fp16 is not supported on your device") from inside `deepspeed.initialize`.

What the device supports is asked of DeepSpeed's accelerator, the same object that refuses
later: on CPU fp16 needs oneDNN fp16 kernels (AVX-512 FP16 / AMX-FP16), which many x86
CPUs lack.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.schema import Config
from launcher.errors import ConfigError


@dataclass(frozen=True)
class DeviceSupport:
    """What the device the ranks will train on can compute in."""

    name: str  # for messages: "cpu", "cuda (NVIDIA H100 80GB HBM3)", ...
    is_gpu: bool
    bf16: bool
    fp16: bool


# --dry-run validates for the cluster the config is meant for, not the laptop it runs on.
ASSUMED_GPU = DeviceSupport(name="cuda (assumed by --dry-run)", is_gpu=True, bf16=True, fp16=True)


def detect_device_support() -> DeviceSupport:
    """Ask DeepSpeed's accelerator (cuda when a GPU is visible, else cpu) what it supports."""
    # lazy: this module is on the torch-free path of `plan` and `--dry-run`
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    is_gpu = acc.device_name() != "cpu"
    if is_gpu:
        name = f"{acc.device_name()} ({torch.cuda.get_device_name()})"
    else:
        name = "cpu"
    return DeviceSupport(name=name, is_gpu=is_gpu, bf16=bool(acc.is_bf16_supported()),
                         fp16=bool(acc.is_fp16_supported()))


def resolve_dtype(cfg: Config, device: DeviceSupport) -> str:
    """fp32 | bf16 | fp16; a ConfigError naming precision.dtype when the device can't."""
    requested = cfg.precision.dtype
    if requested == "auto":
        # bf16 only where DeepSpeed accumulates its gradients in fp32: ZeRO >= 1 or a pipeline
        # (launcher/ds/config.py bf16_gradient_settings refuses the rest)
        if device.is_gpu and device.bf16 and (cfg.zero.stage > 0 or cfg.parallel.pipeline > 1):
            return "bf16"
        if device.is_gpu and device.bf16:
            return "fp32"
        if device.is_gpu and device.fp16:
            return "fp16"
        return "fp32"
    supported = {"fp32": True, "bf16": device.bf16, "fp16": device.fp16}[requested]
    if not supported:
        instead = "bf16 or fp32" if requested == "fp16" and device.bf16 else "fp32"
        raise ConfigError("precision.dtype", f"{requested} is not supported on this device ({device.name}); "
                          f"use precision.dtype={instead} (or auto)")
    return requested

"""The cluster a launch or a dry run plans for: nodes x GPUs per node of one `Hardware`.

`detect_cluster` reads the device a launch runs on (its memory, and the preset its name
matches); `assumed_cluster` is what `--dry-run` assumes (nodes of up to 8 H100s);
`gpu_preset` and `size_gib` read the `--gpu` and `--gpu-memory` options.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from launcher.errors import ConfigError
from parallel.hardware import CPU, GIB, PRESETS, Hardware, preset
from parallel.planner import Cluster


def assumed_cluster(world_size: int, hardware: Hardware = PRESETS["h100"]) -> Cluster:
    """What --dry-run plans for: nodes of up to 8 GPUs of `hardware` (H100 by default)."""
    per_node = math.gcd(max(world_size, 1), 8)
    return Cluster(nodes=max(world_size, 1) // per_node, gpus_per_node=per_node, hardware=hardware)


def detect_cluster(world_size: int, local_world_size: Optional[int], device) -> Cluster:
    """The cluster this launch runs on: the device's own memory; GPU figures from the preset
    its name matches (H100's when none does); on CPU, the available host memory shared by
    this node's ranks. `local_world_size` None (not told by the launcher): the GPUs this node
    has, on CPU every rank (the cautious share)."""
    import torch  # lazy: this module is on the torch-free path of `plan` and `--dry-run`

    cuda = getattr(device, "type", "cpu") == "cuda"
    if local_world_size is None:
        local_world_size = torch.cuda.device_count() if cuda else world_size
    per_node = max(1, min(local_world_size, world_size))
    nodes = max(1, world_size // per_node)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        try:
            hardware = preset(props.name)
        except KeyError:
            hardware = dataclasses.replace(PRESETS["h100"], name=f"{props.name} (H100 figures assumed)")
        return Cluster(nodes, per_node, hardware.with_memory(props.total_memory / GIB))
    return Cluster(nodes, per_node, CPU.with_memory(host_available_bytes() / per_node / GIB))


def host_available_bytes() -> float:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), else
    the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def gpu_preset(name: str) -> Hardware:
    try:
        return preset(name)
    except KeyError:
        raise ConfigError("--gpu", f"unknown GPU {name!r}; presets: {', '.join(PRESETS)} "
                          "(python -m launcher.plan takes --gpu-memory and bandwidths for others)") from None


def size_gib(text: str) -> float:
    """'80GB', '80GiB', '80' -> 80.0 GiB (a GPU's "80GB" are 80 GiB)."""
    cleaned = text.strip().upper().removesuffix("GB").removesuffix("GIB").removesuffix("I").strip()
    try:
        value = float(cleaned)
    except ValueError:
        raise ConfigError("--gpu-memory", f"expected a size such as 80GB, got {text!r}") from None
    if not 0 < value < 1e6:
        raise ConfigError("--gpu-memory", f"must be > 0 GiB, got {text!r}")
    return value


def nominal_gb(hardware: Hardware) -> float:
    """The size a GPU is sold as (80 for 79.6 GiB usable), for the rule of thumb."""
    return float(round(hardware.memory_gib)) if hardware.memory_gib < 100 else float(math.ceil(hardware.memory_gib))

"""What one accelerator and its node can do: the figures the planner's cost model uses.

One table of published peak figures (dense, no sparsity) per GPU, each with its source.
Links are per direction: NVIDIA quotes NVLink as the sum of both directions (900 GB/s on
H100 = 450 GB/s each way); a ring all-reduce is limited by one direction. The network
figure is one NIC per GPU, as in DGX/HGX systems (A100: 8 x 200 Gb/s HDR InfiniBand, H100
and H200: 8 x 400 Gb/s NDR), also per direction. Memory is what `torch.cuda.get_device_properties`
reports on each part (an "80GB" A100 or H100: 79.3 / 79.6 GiB; the 141 GB H200: 140.4 GiB).

Pure data, no torch: `python -m launcher.plan` runs on a laptop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

GB = 1e9  # bandwidths are decimal GB/s, as vendors quote them
GIB = 1024**3  # memory: an "80GB" part holds 80 GiB, of which the device reports ~79.6 usable


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float  # device memory as the device reports it (torch total_memory), GiB
    peak_tflops: float  # dense bf16/fp16 tensor-core peak (fp32 runs use the same table: TF32 is half)
    hbm_gbps: float  # device memory bandwidth, GB/s
    intra_node_gbps: float  # NVLink (or the CPU test bed's shared memory), per direction, per GPU
    inter_node_gbps: float  # network, per direction, per GPU
    pcie_gbps: float  # host <-> device, per direction (CPU optimizer offload)
    host_gbps: float  # host memory bandwidth of a whole node (CPU Adam is bound by it)
    framework_gb: float  # CUDA context, cuBLAS/NCCL workspaces: memory no tensor of ours holds
    source: str
    efficiency: float = 0.5  # achievable fraction of peak for the model's matmuls (an assumption: docs/SCALING.md)
    touched_only: bool = False  # memory counts once written (host pages), not when allocated (GPU caching allocator)

    def with_memory(self, memory_gib: Optional[float]) -> "Hardware":
        return self if memory_gib is None else dataclasses.replace(self, memory_gib=memory_gib)


PRESETS: dict[str, Hardware] = {
    "a100": Hardware(
        "A100-SXM4-80GB", memory_gib=79.3, peak_tflops=312, hbm_gbps=2039, intra_node_gbps=300,
        inter_node_gbps=25, pcie_gbps=25, host_gbps=200, framework_gb=1.5,
        source="NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOPS BF16 dense, 2,039 GB/s HBM2e, "
               "NVLink 600 GB/s (both directions), PCIe Gen4 64 GB/s (both); DGX A100: 8x 200 Gb/s HDR"),
    "h100": Hardware(
        "H100-SXM5-80GB", memory_gib=79.6, peak_tflops=989, hbm_gbps=3350, intra_node_gbps=450,
        inter_node_gbps=50, pcie_gbps=50, host_gbps=300, framework_gb=2.0,
        source="NVIDIA H100 Tensor Core GPU datasheet (2023): 989 TFLOPS BF16 dense (1,979 with sparsity), "
               "3.35 TB/s HBM3, NVLink 900 GB/s (both directions), PCIe Gen5 128 GB/s (both); "
               "DGX H100: 8x 400 Gb/s NDR"),
    "h200": Hardware(
        "H200-SXM-141GB", memory_gib=140.4, peak_tflops=989, hbm_gbps=4800, intra_node_gbps=450,
        inter_node_gbps=50, pcie_gbps=50, host_gbps=300, framework_gb=2.0,
        source="NVIDIA H200 Tensor Core GPU datasheet (2024): 989 TFLOPS BF16 dense, 141 GB HBM3e at "
               "4.8 TB/s, NVLink 900 GB/s (both directions), PCIe Gen5 128 GB/s (both)"),
}

# Export variants with the same compute and memory as their preset (their NVLink is slower).
ALIASES = {"h800": "h100", "a800": "a100"}

# The CPU test bed (gloo, one process per "device"): rough figures of a 2-core VM, only so
# that `auto` and the refusal run the same code on CPU as on a GPU. Never a prediction.
CPU = Hardware("cpu", memory_gib=0.0, peak_tflops=0.05, hbm_gbps=10, intra_node_gbps=5, inter_node_gbps=1,
               pcie_gbps=10, host_gbps=10, framework_gb=0.5, touched_only=True,
               source="not a published figure: a rough 2-core VM, for tests")


def preset(name: str) -> Hardware:
    """A preset by its short name (a100, h100, h200), or by a device name that contains it
    ("NVIDIA H100 80GB HBM3")."""
    key = name.strip().lower().replace("-", "").replace(" ", "")
    for short in (*PRESETS, *ALIASES):
        if short in key:
            return PRESETS[ALIASES.get(short, short)]
    raise KeyError(name)


def peak_tflops_of(device_name: str) -> Optional[float]:
    """Published dense bf16 peak of a CUDA device name, or None when it is not in the table."""
    try:
        return preset(device_name).peak_tflops
    except KeyError:
        return None

"""What the launcher knows about DeepSpeed: the config it generates (config.py), process
group start-up (distributed.py), the pipeline topology (pipeline.py), and every patch of
DeepSpeed's internals (seams.py, with the version they were checked against).

Importing this package first tells DeepSpeed its accelerator (`choose_deepspeed_accelerator`),
so that the modules below, which import DeepSpeed at their top, never let it probe: no
"unable to detect" warnings on a CPU machine (DeepSpeed prints them to stdout, into --json
output). Code outside launcher/ds that imports DeepSpeed does so after this package.
"""

from __future__ import annotations

import os

import torch


def choose_deepspeed_accelerator() -> None:
    """Tell DeepSpeed its accelerator before it is imported (idempotent)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


choose_deepspeed_accelerator()

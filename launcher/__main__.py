"""`python -m launcher`: the commands there are, and what each is for."""

from __future__ import annotations

import sys

VERBS = (
    ("train", "train a model: torchrun / srun / mpirun -m launcher.train [--config FILE] [section.key=value ...]"),
    ("plan", "which layouts fit a model on a cluster, and how fast each would run"),
    ("prepare", "tokenize text files (jsonl, txt, gz) into a prepared dataset for data.path"),
    ("export", "write a checkpoint as a Hugging Face model directory (safetensors + config.json)"),
    ("generate", "sample text from a checkpoint or a Hugging Face model directory"),
    ("report", "plot a run's metrics (loss, throughput, memory) to PNG files"),
)


def main() -> int:
    print("usage: python -m launcher.<command> [--help]\n\ncommands:")
    for verb, what in VERBS:
        print(f"  {verb:<9} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

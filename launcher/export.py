"""Export a checkpoint as a Hugging Face `LlamaForCausalLM` directory (transformers, vLLM, llama.cpp).

    python -m launcher.export --checkpoint RUN_DIR_OR_CHECKPOINT --out DIR [--dtype bf16|fp16|fp32]
                              [--max-shard-gb 5]

RUN_DIR: its newest published checkpoint. Any tensor, pipeline and ZeRO layout (0-3), in one
process on CPU: each Hugging Face tensor is assembled from its tp slices read from disk
(memory-mapped), concatenated along the sharded dimension, cast and added to the output
shard being filled; at most one output shard is held in memory. Output:

    config.json, generation_config.json
    model.safetensors                       (below --max-shard-gb), or
    model-0000K-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json (+ tokenizer_config.json) when the run used a Hugging Face tokenizer

Which of DeepSpeed's files hold the weights of each layout: launcher/checkpoint/ds_files.py;
the reading: launcher/checkpoint/reader.py; the writing: launcher/hf/export.py.

A padded vocabulary (model.vocab above the tokenizer's size) is trimmed back: to the
vocab_size of the Hugging Face model the run started from (model.init_from, recorded in the
checkpoint), else to the tokenizer's size when the run's config.yaml names one that loads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from launcher.cli import ArgumentParser
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError

DTYPE_CHOICES = ("bf16", "fp16", "fp32")  # launcher/checkpoint/reader.py DTYPES (tests/test_export.py: the same)

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    parser = ArgumentParser(prog="python -m launcher.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a "
                        "checkpoint directory (.../checkpoints/step-NNNNNNNN)")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it already holds files")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="dtype of the exported weights (default: the checkpoint's)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="largest safetensors file in GB (default 5); above it the model is sharded")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # lazy: torch and DeepSpeed (checkpoint reading) are not needed for --help
    from launcher.checkpoint.reader import DTYPES, resolve_checkpoint
    from launcher.ds.seams import check_deepspeed_version
    from launcher.hf.export import export

    try:
        check_deepspeed_version()  # DeepSpeed's checkpoint files are read through the seams
        if not 0 < args.max_shard_gb < 1e9:  # also refuses nan and inf
            raise ConfigError("--max-shard-gb", f"must be > 0 and finite, got {args.max_shard_gb}")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise ConfigError("--out", f"{out} already exists and is not an empty directory: give a new one, or "
                              "--overwrite to replace it")
        ckpt, run = resolve_checkpoint(Path(args.checkpoint))
        summary = export(ckpt, run, out, DTYPES[args.dtype] if args.dtype else None,
                         int(args.max_shard_gb * 1e9))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    print(summary.line(ckpt, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

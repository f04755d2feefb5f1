"""A quick look at what a run learned: continue a prompt, in one process, from any layout.

    python -m launcher.generate (--checkpoint RUN_DIR_OR_CHECKPOINT | --hf DIR) --prompt "..."
                                [--max-new-tokens 64] [--temperature 0] [--top-p 1.0] [--seed 0]
                                [--json] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                                [--tokenizer byte|FILE|DIR]

A sanity check, not a server: one sequence, the model unsharded on one device (a checkpoint
of any tensor, pipeline and ZeRO layout is gathered by launcher/checkpoint/reader.py), decoding
with a KV cache (launcher/model/llama.py: LlamaModel.decode). `--temperature 0` (the default) is
greedy decoding, which gives the tokens `transformers`' `generate(do_sample=False)` gives on
the same weights; above 0 it samples from softmax(logits / T), restricted to the smallest set
of tokens whose probability reaches --top-p, with a generator seeded by --seed. Generation
stops after --max-new-tokens or at the end-of-sequence token.

The prompt is encoded as the weights were trained: a run's checkpoint with its own tokenizer
(no special tokens, as launcher.prepare encodes documents); a Hugging Face directory with
its tokenizer's special tokens (a BOS for Llama), as `transformers` does. The tokenizer is
the run's, or the directory's tokenizer.json, else its SentencePiece tokenizer.model;
`--tokenizer` names another (byte, a tokenizer.json or .model file, or a directory holding
one), for a directory that ships none or a checkpoint copied away from its run. `--json` prints one
object, {"prompt_ids": [...], "generated_ids": [...], "text": "<the generated text>"}.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from launcher.cli import ArgumentParser
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError, show_value

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    parser = ArgumentParser(prog="python -m launcher.generate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    source.add_argument("--hf", help="a Hugging Face Llama directory")
    parser.add_argument("--tokenizer", default=None, metavar="byte|FILE|DIR",
                        help="the tokenizer: byte, a tokenizer.json, a SentencePiece tokenizer.model, or a directory "
                        "holding one (default: the run's, or the --hf directory's)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    return parser.parse_args(argv)


def check_args(args, cuda_available: bool) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError("--temperature", f"must be >= 0 (0 = greedy), got {args.temperature}")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")
    if not -(1 << 63) <= args.seed < 1 << 64:  # what torch.Generator.manual_seed takes
        raise ConfigError("--seed", f"must be a 64-bit integer, got {show_value(args.seed)}")
    if any("\ud800" <= c <= "\udfff" for c in args.prompt):  # argv's bytes that are not UTF-8 (surrogateescape)
        raise ConfigError("--prompt", "is not UTF-8 text")
    if args.device not in (None, "cpu", "cuda") or (args.device == "cuda" and not cuda_available):
        raise ConfigError("--device", f"{args.device!r}: expected cpu, or cuda on a machine with a GPU")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # lazy: torch, DeepSpeed (checkpoint reading) and the model are not needed for --help
    import torch

    from launcher.ds.seams import check_deepspeed_version
    from launcher.inference.loading import from_checkpoint, from_hf
    from launcher.inference.sampling import generate

    try:
        check_deepspeed_version()  # a checkpoint is read through the seams
        check_args(args, torch.cuda.is_available())
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        start = time.perf_counter()
        loaded = (from_checkpoint(Path(args.checkpoint), args.tokenizer) if args.checkpoint else
                  from_hf(Path(args.hf), args.tokenizer))
        prompt_ids = loaded.encode(args.prompt)
        if not prompt_ids:
            raise ConfigError("--prompt", "encodes to no tokens: give some text")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        loaded.model.to(device=device, dtype=dtype)
        loaded_s = time.perf_counter() - start
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    start = time.perf_counter()
    generated = generate(loaded, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, device)
    seconds = time.perf_counter() - start
    text = loaded.decode(generated)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "generated_ids": generated, "text": text}))
    else:
        print(f"{args.prompt}{text}")
        print(f"[{loaded.source}: {len(prompt_ids)} prompt + {len(generated)} generated tokens, loaded in "
              f"{loaded_s:.1f} s, {len(generated) / seconds:.1f} tokens/s on {device}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

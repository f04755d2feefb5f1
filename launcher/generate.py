"""A quick look at what a run learned: continue a prompt, in one process, from any layout.

    python -m launcher.generate (--checkpoint RUN_DIR_OR_CHECKPOINT | --hf DIR) --prompt "..."
                                [--max-new-tokens 64] [--temperature 0] [--top-p 1.0] [--seed 0]
                                [--json] [--device cpu|cuda] [--dtype fp32|bf16|fp16]

A sanity check, not a server: one sequence, the model unsharded on one device (a checkpoint
of any tensor, pipeline and ZeRO layout is gathered by launcher.export's reader), decoding
with a KV cache (launcher.model: LlamaModel.decode). `--temperature 0` (the default) is
greedy decoding, which gives the tokens `transformers`' `generate(do_sample=False)` gives on
the same weights; above 0 it samples from softmax(logits / T), restricted to the smallest set
of tokens whose probability reaches --top-p, with a generator seeded by --seed. Generation
stops after --max-new-tokens or at the end-of-sequence token.

The prompt is encoded as the weights were trained: a run's checkpoint with its own tokenizer
(no special tokens, as launcher.prepare encodes documents); a Hugging Face directory with
its tokenizer's special tokens (a BOS for Llama), as `transformers` does. `--json` prints one
object, {"prompt_ids": [...], "generated_ids": [...], "text": "<the generated text>"}.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from launcher.config import CONFIG_ERROR_EXIT_CODE, ConfigError, ModelConfig, model_config
from launcher.launch_env import choose_deepspeed_accelerator


@dataclass
class Loaded:
    model: "torch.nn.Module"  # launcher.model.LlamaModel, tp 1
    config: ModelConfig
    vocab: int  # the rows that mean something (a padded vocabulary's extra rows are never sampled)
    encode: "callable"  # str -> list[int]
    decode: "callable"  # list[int] -> str
    eos: set[int]
    source: str


def _build(config: ModelConfig):
    from launcher.model import LlamaModel, layer_specs
    from parallel.tensor_parallel import NO_TP

    return LlamaModel(layer_specs(config, NO_TP, seed=None)).eval()  # every weight is loaded next


def from_checkpoint(path: Path) -> Loaded:
    """A checkpoint of any layout: each full tensor gathered from its slices on disk."""
    from launcher.export import CheckpointReader, resolve_checkpoint, run_tokenizer, trimmed_vocab

    ckpt, run = resolve_checkpoint(path)
    reader = CheckpointReader(ckpt)
    tok = run_tokenizer(run, reader.state)
    if tok is None:
        raise ConfigError("--checkpoint", f"{ckpt}: its run's tokenizer cannot be found (the run directory's "
                          "config.yaml names data.tokenizer); pass the run directory, not a copied checkpoint")
    model = _build(reader.model)
    with torch.no_grad():
        # each parameter once (a tied head's is the embedding's), in pipeline-item order, as the reader prefers
        for param in model.parameters():
            param.copy_(reader.tensor(param.logical_name))
    reader.close()
    return Loaded(model, reader.model, trimmed_vocab(reader.model, reader.state, tok),
                  encode=lambda text: [int(i) for i in tok.encode_batch([text])[0]], decode=tok.decode,
                  eos={tok.eod_id}, source=str(ckpt))


def from_hf(directory: Path) -> Loaded:
    """A Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)."""
    from launcher.hf_weights import check_hf_weights, hf_model_values, load_hf_weights, read_hf_config
    from launcher.tokenizer import load_tokenizer

    config = model_config(hf_model_values(directory, key="--hf"), "--hf")
    check_hf_weights(config, directory, key="--hf")
    tok = load_tokenizer(str(directory), key="--hf")
    model = _build(config)
    load_hf_weights(model, directory, tp_rank=0, tp_size=1, key="--hf")
    eos = _eos_ids(directory, read_hf_config(directory, "--hf")) or {tok.eod_id}

    def encode(text: str) -> list[int]:  # with the tokenizer's special tokens (BOS), as transformers does
        return list(tok.tokenizer.encode(text, add_special_tokens=True).ids)

    return Loaded(model, config, config.vocab, encode=encode, decode=tok.decode, eos=eos, source=str(directory))


def _eos_ids(directory: Path, config: dict) -> set[int]:
    """generation_config.json's eos_token_id (an id or a list), else config.json's."""
    try:
        eos = json.loads((directory / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        eos = None
    if eos is None:
        eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from a (vocab,) row of logits: the argmax at temperature 0; else a sample
    from softmax(logits / temperature) over the smallest set of most likely tokens whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # keep token k when the tokens before it hold less than top_p: the first one always
    keep = (ordered.cumsum(0) - ordered) < top_p
    kept = ordered * keep
    pick = torch.multinomial((kept / kept.sum()).float().cpu(), 1, generator=generator)
    return int(order[pick.to(order.device)])


@torch.no_grad()
def generate(loaded: Loaded, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
             seed: int, device: torch.device) -> list[int]:
    from launcher.model import Attention, KVCache

    model = loaded.model
    capacity = len(prompt_ids) + max_new_tokens
    like = next(model.parameters())
    caches = [KVCache.empty(1, m.kv_heads, capacity, m.head_dim, like) for m in model.items
              if isinstance(m, Attention)]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model.decode(ids, caches)[0, -1, :loaded.vocab].float()
        token = next_token(logits, temperature, top_p, generator)
        out.append(token)
        if token in loaded.eos:
            break
        ids = torch.tensor([[token]], device=device)
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    from launcher.train import _ArgumentParser

    parser = _ArgumentParser(prog="python -m launcher.generate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    source.add_argument("--hf", help="a Hugging Face Llama directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    return parser.parse_args(argv)


def check_args(args) -> None:
    import math

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError("--temperature", f"must be >= 0 (0 = greedy), got {args.temperature}")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")
    if args.device not in (None, "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError("--device", f"{args.device!r}: expected cpu, or cuda on a machine with a GPU")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    choose_deepspeed_accelerator()
    try:
        check_args(args)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        start = time.perf_counter()
        loaded = from_checkpoint(Path(args.checkpoint)) if args.checkpoint else from_hf(Path(args.hf))
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

"""`launcher.prepare` throughput against the tokenizer's own encode_batch, side by side in
one run on the same generated text.

    python bench/prepare.py [--mb 32] [--tokenizer PATH] [--workers N] [--chunk-mb MB]

Text: English-like documents (a Zipf-distributed lexicon of pseudo-words, sentences,
paragraphs) from random.Random(0), written as one .jsonl of about --mb MB. Tokenizer: a
byte-level BPE (vocabulary --vocab, default 8000) trained here on the first MBs of that
text, or --tokenizer PATH.

(1) encode_batch, one thread (TOKENIZERS_PARALLELISM=false), in batches the size prepare
    uses, tokens kept as arrays: what one worker could do at best, the per-worker anchor
    (MB/s of text); and the same in N processes at once: how far this machine's cores
    scale at all (shared caches, memory bandwidth, turbo, SMT siblings).
(2) `prepare` with --workers 1 and with --workers = the core count (or --workers): the
    whole call (reading, JSON, encoding, writing shards, fsync; worker start-up included),
    each into a fresh directory. MB/s of jsonl input, tokens/s (the same tokens as (1)),
    and per worker the ratio to (1): close to 1 means the workers spend their time in the
    tokenizer, and N workers go as fast as N processes of (1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYLLABLES = ["ka", "to", "re", "an", "de", "mi", "lo", "su", "ver", "pro", "con", "ing", "tion", "al", "er", "est",
             "ly", "un", "in", "com", "ex", "pre", "dis", "ment", "ness", "or", "at", "en", "ti", "ca", "ble", "ous",
             "ic", "ter", "the", "ma", "ri", "po", "sta", "gra"]
COMMON = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
          "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they"]
MB = 1 << 20


def generate(mb: float, seed: int = 0) -> list[str]:
    """Documents of about `mb` MB: common words and 30,000 pseudo-words, Zipf-distributed."""
    rng = random.Random(seed)
    lexicon = COMMON + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(30_000)]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    cum = [0.0]
    for w in weights:
        cum.append(cum[-1] + w)
    cum = cum[1:]
    docs, size = [], 0
    while size < mb * MB:
        words = rng.choices(lexicon, cum_weights=cum, k=rng.randint(50, 1500))
        sentences, i = [], 0
        while i < len(words):
            n = rng.randint(4, 25)
            sentence = " ".join(words[i:i + n])
            sentences.append(sentence[:1].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ","]))
            i += n
        doc = "\n\n".join(" ".join(sentences[j:j + 5]) for j in range(0, len(sentences), 5))
        docs.append(doc)
        size += len(doc)
    return docs


def train_tokenizer(docs: list[str], vocab: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    sample, size = [], 0
    for doc in docs:  # the first few MB are plenty for a vocabulary this size
        sample.append(doc)
        size += len(doc)
        if size > 4 * MB:
            break
    tokenizer.train_from_iterator(sample, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(path))


def encode_anchor(tokenizer, docs: list[str]) -> tuple[float, int]:
    """Seconds and tokens for encode_batch over `docs`, one thread, prepare's batch sizes."""
    from launcher.data.prepare_tasks import BATCH_CHARS, BATCH_DOCS

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokens, batch, chars = 0, [], 0
    start = time.perf_counter()
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
            batch, chars = [], 0
    if batch:
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
    return time.perf_counter() - start, tokens


_BARRIER = None


def _set_barrier(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _encode_slice(spec: str, docs: list[str]) -> tuple[float, int]:
    from launcher.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec)
    _BARRIER.wait()  # all processes encode at once
    return encode_anchor(tokenizer, docs)


def encode_in_parallel(spec: str, docs: list[str], processes: int) -> float:
    """Tokens/s of encode_batch in `processes` one-thread processes at once."""
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    slices = [docs[i::processes] for i in range(processes)]
    with cf.ProcessPoolExecutor(processes, mp_context=ctx, initializer=_set_barrier,
                                initargs=(ctx.Barrier(processes),)) as pool:
        results = list(pool.map(_encode_slice, [spec] * processes, slices))
    return sum(n for _, n in results) / max(t for t, _ in results)


def time_to_first_step(docs: list[str], work: Path, factor: int, repeats: int) -> None:
    """Open a small and a `factor`x larger prepared dataset and take the first batch, in
    process (median of `repeats`) and through `python -m launcher.train` (spawn to the
    first step's record): the start must not grow with the corpus."""
    import statistics
    import subprocess

    from launcher.config.load import config_from_dict
    from launcher.data.batches import open_run_data
    from launcher.data.prepare import PrepareOptions, prepare

    sizes = {}
    for name, copies in (("small", 1), (f"{factor}x", factor)):
        src = work / f"first-step-{name}.jsonl"
        with open(src, "w") as f:
            for _ in range(copies):
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        out = work / f"first-step-{name}"
        # 1 MB tasks: the larger dataset has ~100x the shards too (the start is O(shards))
        manifest = prepare([str(src)], "byte", out, PrepareOptions(workers=os.cpu_count(), progress=False, chunk_mb=1))
        src.unlink()
        sizes[name] = (out, manifest["tokens"], len(manifest["shards"]))
    print(f"\ntime to the first training step (byte tokens; {factor}x the documents):")
    for name, (out, tokens, shards) in sizes.items():
        cfg = config_from_dict({"data": {"path": str(out)}, "model": {"seq_len": 256}})
        opened = []
        for _ in range(repeats):
            start = time.perf_counter()
            data = open_run_data(cfg.data, cfg.model.seq_len, 0, work, global_batch=8, micro_batch=8, dp=1, dp_rank=0)
            data.train.next_step()
            opened.append(time.perf_counter() - start)
        run_dir = work / f"run-{name}"
        start = time.time()
        subprocess.run([sys.executable, "-m", "launcher.train", f"data.path={out}", "train.steps=1",
                        "schedule.warmup_steps=0", "train.eval_every=0", "parallel.tensor=1", "parallel.pipeline=1",
                        "zero.stage=0", "model.seq_len=256", f"run.dir={run_dir}"], cwd=REPO, check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])  # after the launch event
        print(f"  {name:>6}: {tokens / 1e6:9.1f}M tokens in {shards:3d} shards: open + first batch "
              f"{statistics.median(opened) * 1e3:7.1f} ms (median of {repeats}); launch -> step 1 record "
              f"{first['time'] - start:5.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=32, help="MB of generated text (default 32)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: a BPE trained here)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of the BPE trained here")
    parser.add_argument("--workers", type=int, default=None, help="the many-worker run (default: the core count)")
    parser.add_argument("--chunk-mb", type=float, default=None,
                        help="prepare's --chunk-mb (default: the input / (4 x workers), so every worker is busy)")
    parser.add_argument("--first-step", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the first training step on a small and a 100x larger dataset")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    from launcher.data.prepare import PrepareOptions, prepare
    from launcher.formats.tokenizer import load_tokenizer

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    many = args.workers or cores
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.dir))
    try:
        docs = generate(args.mb)
        data = work / "text.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        in_mb = data.stat().st_size / MB
        spec = args.tokenizer or str(work / "tokenizer.json")
        if args.tokenizer is None:
            train_tokenizer(docs, args.vocab, Path(spec))
        tok = load_tokenizer(spec)
        text_mb = sum(len(d.encode()) for d in docs) / MB
        print(f"text: {len(docs):,} documents, {text_mb:.1f} MB of text, {in_mb:.1f} MB as jsonl; tokenizer "
              f"{'BPE trained here' if args.tokenizer is None else spec} (vocabulary {tok.vocab_size:,}); "
              f"{cores} cores; --chunk-mb {args.chunk_mb or in_mb / (4 * many):.2f}")

        seconds, tokens = encode_anchor(tok, docs)
        anchor = tokens / seconds  # the same tokens throughout: every rate below is tokens / its seconds
        row = lambda what, mbs, rate, tail="": print(  # noqa: E731
            f"{what:<40} {mbs:7.2f} MB/s {rate:12,.0f} tokens/s{tail}")
        row("(1) encode_batch, 1 thread", text_mb / seconds, anchor)
        together = anchor
        if many > 1:
            together = encode_in_parallel(spec, docs, many)
            row(f"(1) encode_batch, {many} processes at once", text_mb * together / tokens, together,
                f"  per process {together / many / anchor:.2f} x (1)")
        chunk_mb = args.chunk_mb or in_mb / (4 * many)  # about 4 shards per worker: all of them busy
        for workers in sorted({1, many}):
            out = work / f"out-{workers}"
            start = time.perf_counter()
            manifest = prepare([str(data)], spec, out,
                               PrepareOptions(workers=workers, progress=False, chunk_mb=chunk_mb))
            seconds = time.perf_counter() - start
            assert manifest["tokens"] == tokens + manifest["documents"]  # the same tokens, and an EOD each
            rate = tokens / seconds
            row(f"(2) prepare --workers {workers}", in_mb / seconds, rate,
                f"  per worker {rate / workers / anchor:.2f} x (1)"
                + (f", {rate / together:.2f} x {many} processes at once" if workers > 1 else ""))
            shutil.rmtree(out)
        print(f"per-worker ratio, --workers {many}: {rate / many / anchor:.2f}")
        if args.first_step:
            time_to_first_step(docs[:max(1, len(docs) // 8)], work, factor=100, repeats=3)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

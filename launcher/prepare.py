"""Text files -> the token shards training reads: `python -m launcher.prepare`.

    python -m launcher.prepare --input 'corpus/*.jsonl.gz' notes.txt --tokenizer path/to/tokenizer.json \\
        --out data/web [--text-field text] [--workers N] [--max-bad 0] [--eod-token TOK] [--chunk-mb 256]

Inputs are paths or globs (each expanded and sorted, in the order given, duplicates dropped):
    .jsonl, .jsonl.gz   one document per line: the string at --text-field; blank lines skipped
    .txt, .txt.gz       the WHOLE file is one document (for many documents, write jsonl)

Output: the layout of launcher/data/shards.py (shards/NNNNNN.bin/.idx/.json, tokenizer.json,
manifest.json written last), and beside it DIR/prepare-plan.json (what the directory is
being prepared from: inputs and sizes, tokenizer, text field, chunk size; written first, a
re-run with other inputs is refused), shards/NNNNNN.bad (a shard's bad lines, written
before its record) and DIR/bad_lines.txt (all of them, in input order).

Work split. The tasks depend on the inputs and --chunk-mb only, never on --workers: each
uncompressed .jsonl is cut into byte ranges of about --chunk-mb ending at a line break; a
.txt (one document) and a .gz (a gzip stream cannot be entered midway) are one task each.
Task i writes shard i, so the output is byte-identical for any worker count, and a re-run
skips every shard whose record exists and matches its task: a killed run continues where it
stopped and ends with the same bytes. Several processes preparing the same directory at once
(ranks preparing the embedded corpus) write identical files by atomic renames.

Why each worker writes its own shards: Megatron's preprocess_data.py sends every worker's
tokens back to one process that writes them all, and that writer caps the whole run. Here a
worker process owns a tokenizer (spawned, never forked: the Rust tokenizer's thread pool
does not survive a fork; one thread each, TOKENIZERS_PARALLELISM=false, so N workers use N
cores), encodes batches of documents with the tokenizer's encode_batch, appends the
end-of-document token to each and streams them to its shard's temporary file; only byte and
token counts travel back, for the progress bar.

Bad lines (not UTF-8, invalid JSON, the field missing or not a string) are reported as
file:line and skipped while there are at most --max-bad of them (counted in the records and
the manifest); one more fails the run with exit 2, naming the first.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

from launcher.cli import ArgumentParser
from launcher.data.prepare import PrepareOptions, prepare
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m launcher.prepare", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help=".jsonl / .jsonl.gz (a document per line) or .txt / .txt.gz (the whole file is ONE "
                             "document); quote globs")
    parser.add_argument("--tokenizer", required=True, help="`byte`, a tokenizer.json, or a directory holding one")
    parser.add_argument("--out", required=True, help="the output directory (a new one per dataset)")
    parser.add_argument("--text-field", default="text", help="the jsonl field holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPU count)")
    parser.add_argument("--max-bad", type=int, default=0, help="bad lines skipped before the run fails (default: 0)")
    parser.add_argument("--eod-token", default=None, help="the end-of-document token (default: the tokenizer's)")
    parser.add_argument("--chunk-mb", type=float, default=256, help="MB of jsonl per shard (default: 256)")
    try:
        args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return int(done.code or 0)
    try:
        if unknown:
            raise ConfigError(unknown[0], "unknown option (python -m launcher.prepare --help)")
        options = PrepareOptions(text_field=args.text_field, workers=args.workers, max_bad=args.max_bad,
                                 eod_token=args.eod_token, chunk_mb=args.chunk_mb)
        prepare(args.input, args.tokenizer, Path(args.out), options)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; the same command continues", file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print("error: a worker process died (out of memory?); finished shards are kept; the same command "
              "continues", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m launcher.prepare`: the shards hold exactly the tokenizer's own tokens with an
end-of-document token after each document, whatever the worker count; a re-run is a no-op, a
killed run continues to the same bytes; every bad input is one line on stderr and exit 2."""

import contextlib
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import base_env

from launcher.data.prepare import BAD_LINES, PLAN, PrepareOptions, prepare
from launcher.data.shards import FORMAT, read_manifest, shard_paths
from launcher.formats.tokenizer import load_tokenizer
from launcher.prepare import main
from launch import WORKDIR  # noqa: E402

WORDS = ["the", "model", "reads", "tokens", "from", "shards", "and", "learns", "which", "word", "comes", "next",
         "pipeline", "tensor", "données", "Übung", "并行", "stage", "rank", "loss", "step", "\t", "\n"]


def documents(n: int, seed: int, longest: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest))) for _ in range(n)]


def jsonl(docs: list[str]) -> str:
    return "".join(json.dumps({"id": i, "text": d}, ensure_ascii=i % 2 == 0) + "\n" for i, d in enumerate(docs))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A BPE tokenizer trained here, and one input of each kind (with their documents)."""
    from bpe import train_bpe

    root = tmp_path_factory.mktemp("prepare")
    train_bpe(documents(200, 0), 300, root / "tokenizer.json")

    web, books, preface, notes = documents(120, 1), documents(15, 2), "\n".join(documents(4, 3)), "x\n\ny  "
    (root / "web.jsonl").write_text(jsonl(web[:60]) + "\n  \n" + jsonl(web[60:]))  # blank lines are skipped
    with gzip.open(root / "books.jsonl.gz", "wt") as f:
        f.write(jsonl(books))
    (root / "preface.txt").write_text(preface)  # a whole .txt is one document
    with gzip.open(root / "notes.txt.gz", "wt") as f:
        f.write(notes)
    inputs = [str(root / name) for name in ("web.jsonl", "books.jsonl.gz", "preface.txt", "notes.txt.gz")]
    return SimpleNamespace(root=root, tokenizer=str(root / "tokenizer.json"), inputs=inputs,
                           docs=[*web, *books, preface, notes])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def run_cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.prepare", *args], cwd=WORKDIR, env=base_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_shards_hold_the_tokenizers_tokens_and_an_eod_after_each_document(corpus, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(corpus.inputs, corpus.tokenizer, out, PrepareOptions(workers=1, chunk_mb=0.002, progress=False))
    tok = load_tokenizer(corpus.tokenizer)
    expected = [np.append(ids, tok.eod_id) for ids in tok.encode_batch(corpus.docs)]

    assert manifest == read_manifest(out, "test")
    assert manifest["tokenizer"] == {"name": corpus.tokenizer, "sha256": tok.sha256, "vocab_size": 300,
                                     "eod_id": tok.tokenizer.token_to_id("<|endoftext|>")}
    assert manifest["format"] == FORMAT and manifest["dtype"] == "uint16" and manifest["text_field"] == "text"
    assert manifest["sources"] == [{"path": p, "bytes": os.path.getsize(p)} for p in corpus.inputs]
    assert manifest["documents"] == len(corpus.docs) and manifest["bad_lines"] == 0
    assert manifest["tokens"] == sum(map(len, expected))
    assert (out / "tokenizer.json").read_bytes() == Path(corpus.tokenizer).read_bytes()
    shards = manifest["shards"]
    assert len(shards) > 4 and [s["source"] for s in shards[-3:]] == [1, 2, 3]  # web.jsonl is cut in ranges
    assert [s["name"] for s in shards] == [f"{i:06d}" for i in range(len(shards))]

    docs = iter(expected)
    for record in shards:
        bin_path, idx_path, rec_path = shard_paths(out, record["name"])
        assert json.loads(rec_path.read_text()) == record
        tokens, bounds = np.fromfile(bin_path, "<u2"), np.fromfile(idx_path, "<i8")
        mine = [next(docs) for _ in range(record["documents"])]
        assert len(tokens) == record["tokens"] == sum(map(len, mine))
        assert bounds.tolist() == np.cumsum([0, *map(len, mine)]).tolist()
        assert tokens.tolist() == np.concatenate([np.zeros(0, np.int64), *mine]).tolist()
    assert next(docs, None) is None


def test_any_worker_count_writes_the_same_bytes_and_a_rerun_is_a_no_op(corpus, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    a = prepare(corpus.inputs, corpus.tokenizer, one, PrepareOptions(workers=1, chunk_mb=0.003, progress=False))
    b = prepare(corpus.inputs, corpus.tokenizer, two, PrepareOptions(workers=2, chunk_mb=0.003, progress=True))
    assert a == b and len(a["shards"]) > 3
    assert shard_bytes(one) == shard_bytes(two)
    assert "2 workers" in capsys.readouterr().out

    mtimes = {p: p.stat().st_mtime_ns for p in two.rglob("*")}
    assert prepare(corpus.inputs, corpus.tokenizer, two, PrepareOptions(workers=2, chunk_mb=0.003)) == b
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in two.rglob("*")} == mtimes


def test_an_interrupted_run_continues_to_the_same_bytes(corpus, tmp_path):
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    prepare(corpus.inputs, corpus.tokenizer, clean, PrepareOptions(workers=1, chunk_mb=0.002, progress=False))
    prepare(corpus.inputs, corpus.tokenizer, broken, PrepareOptions(workers=1, chunk_mb=0.002, progress=False))
    # What a kill leaves: no manifest, shards without records, a dead process's temporary files.
    (broken / "manifest.json").unlink()
    for name in ("000001", "000003"):
        shard_paths(broken, name)[2].unlink()
    shard_paths(broken, "000002")[0].write_bytes(b"torn")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = broken / "shards" / f"000004.bin.tmp.{os.uname().nodename}.{int(dead.stdout)}.abc"
    stale.write_bytes(b"half")
    prepare(corpus.inputs, corpus.tokenizer, broken, PrepareOptions(workers=2, chunk_mb=0.002, progress=False))
    assert not stale.exists()
    assert shard_bytes(broken) == shard_bytes(clean)
    assert (broken / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_a_killed_run_continues_to_the_same_bytes(corpus, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text(jsonl(documents(3000, 5, longest=120)))  # ~2 MB: a few seconds on one worker
    args = ["--input", str(big), "--tokenizer", corpus.tokenizer, "--workers", "1", "--chunk-mb", "0.05"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.prepare", *args, "--out", str(killed)], cwd=WORKDIR,
                            env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not shard_paths(killed, "000000")[2].exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "the run ended before it could be killed: give it more input"
    assert not (killed / "manifest.json").exists()
    result = run_cli(*args, "--out", str(killed))
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout and "(0 already done)" not in result.stdout
    prepare([str(big)], corpus.tokenizer, clean, PrepareOptions(workers=1, chunk_mb=0.05, progress=False))
    assert shard_bytes(killed) == shard_bytes(clean)


def test_concurrent_preparers_of_one_directory_agree(corpus, tmp_path):
    """What ranks preparing the embedded corpus into one cache directory do."""
    out = tmp_path / "shared"
    args = ["--input", *corpus.inputs, "--tokenizer", corpus.tokenizer, "--out", str(out), "--workers", "1",
            "--chunk-mb", "0.002"]
    procs = [subprocess.Popen([sys.executable, "-m", "launcher.prepare", *args], cwd=WORKDIR, env=base_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    prepare(corpus.inputs, corpus.tokenizer, tmp_path / "alone",
            PrepareOptions(workers=1, chunk_mb=0.002, progress=False))
    assert shard_bytes(out) == shard_bytes(tmp_path / "alone")


# --------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2
# --------------------------------------------------------------------------------------


def call_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), stderr
    return lines[0]


def test_a_malformed_line_fails_naming_file_and_line(corpus, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(documents(200, 7)) + '{"text": "fine"}\n{"text": \n' + jsonl(["after"]))
    result = run_cli("--input", str(data), "--tokenizer", corpus.tokenizer, "--out", str(tmp_path / "out"),
                     "--chunk-mb", "0.001", "--workers", "2")  # the bad line is in a later byte range
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        f"config error: {data}:202: invalid JSON (Expecting value) — at least 1 bad line, more than --max-bad 0 "
        f"(listed in {tmp_path / 'out' / BAD_LINES})")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("line, reason", [
    (b'{"content": "x"}', "no 'text' field (fields: 'content'); name the text field with --text-field"),
    (b'{"text": ["x"]}', "field 'text' is a JSON array, not a string"),
    (b'"just a string"', "a JSON string, not an object with a 'text' field"),
    (b'{"text": "caf\xe9"}', "not UTF-8 (byte 0xe9 at column 14)"),
    (b'{"text": "\\udc00"}', "field 'text' holds an unpaired surrogate escape (\\ud800-\\udfff), not text"),
])
def test_bad_lines_are_named(corpus, tmp_path, line, reason):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "ok"}\n' + line + b"\n")
    code, _, err = call_main("--input", str(data), "--tokenizer", corpus.tokenizer, "--out", str(tmp_path / "o"))
    assert code == 2
    assert one_error_line(err).startswith(f"config error: {data}:2: {reason} — ")


def test_a_txt_that_is_not_utf8_is_named_by_line(corpus, tmp_path):
    data = tmp_path / "book.txt.gz"
    data.write_bytes(gzip.compress("one\ntwo\n".encode() + b"thr\xffee\n"))
    code, _, err = call_main("--input", str(data), "--tokenizer", corpus.tokenizer, "--out", str(tmp_path / "o"))
    assert code == 2 and one_error_line(err).startswith(f"config error: {data}:3: not UTF-8 (byte 0xff at offset 11)")


def test_bad_lines_up_to_max_bad_are_skipped_and_counted(corpus, tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    data.write_bytes(b'{"text": "one"}\nnot json\n{"text": "two"}\n')
    code, stdout, _ = call_main("--input", str(data), "--tokenizer", corpus.tokenizer, "--out", str(out),
                                "--max-bad", "1")
    assert code == 0
    manifest = read_manifest(out, "test")
    assert manifest["bad_lines"] == 1 and manifest["shards"][0]["bad_lines"] == 1 and manifest["documents"] == 2
    listed = f"{data}:2: invalid JSON (Expecting value)"
    assert (out / BAD_LINES).read_text() == listed + "\n"
    assert f"skipped bad line: {listed}" in stdout


def test_a_glob_matching_nothing_and_a_missing_tokenizer_are_one_line(corpus, tmp_path):
    result = run_cli("--input", str(tmp_path / "nothing*.jsonl"), "--tokenizer", corpus.tokenizer,
                     "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == f"config error: --input: no file matches {tmp_path}/nothing*.jsonl"
    code, _, err = call_main("--input", *corpus.inputs, "--tokenizer", str(tmp_path / "none.json"),
                             "--out", str(tmp_path / "o"))
    assert code == 2 and one_error_line(err).startswith("config error: --tokenizer: ")
    assert "none.json" in err


def test_a_broken_gzip_file_is_one_line(corpus, tmp_path):
    whole = gzip.compress(jsonl(documents(50, 9)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    for name, reason in (("cut.jsonl.gz", "Compressed file ended before the end-of-stream marker was reached"),
                         ("plain.txt.gz", "Not a gzipped file (b'no')")):
        code, _, err = call_main("--input", str(tmp_path / name), "--tokenizer", corpus.tokenizer,
                                 "--out", str(tmp_path / name.split(".")[0]))
        assert code == 2
        assert one_error_line(err) == f"config error: {tmp_path / name}: not a readable gzip file ({reason})"


@pytest.mark.parametrize("args, expected", [
    (["--input", "{root}/notes.csv"], "--input: {root}/notes.csv: expected .jsonl, .txt, .jsonl.gz or .txt.gz"),
    (["--input", "{root}/web.jsonl", "--workers", "0"], "--workers: must be at least 1, got 0"),
    (["--input", "{root}/web.jsonl", "--chunk-mb", "nan"], "--chunk-mb: must be a positive number, got nan"),
    (["--input", "{root}/web.jsonl", "--bogus"], "--bogus: unknown option (python -m launcher.prepare --help)"),
    (["--input", "{root}/web.jsonl", "--workers", "many"], "--workers: invalid int value: 'many'"),
])
def test_usage_mistakes_are_one_line(corpus, tmp_path, args, expected):
    (corpus.root / "notes.csv").write_text("a,b\n")
    code, _, err = call_main(*(a.format(root=corpus.root) for a in args), "--tokenizer", corpus.tokenizer,
                             "--out", str(tmp_path / "o"))
    assert code == 2 and one_error_line(err) == f"config error: {expected.format(root=corpus.root)}"


def test_an_output_of_other_inputs_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    prepare(corpus.inputs[:1], corpus.tokenizer, out, PrepareOptions(workers=1, chunk_mb=0.002, progress=False))
    code, _, err = call_main("--input", *corpus.inputs, "--tokenizer", corpus.tokenizer, "--out", str(out))
    assert code == 2 and "holds a dataset prepared from other inputs or with another tokenizer" in one_error_line(err)
    (out / "manifest.json").unlink()  # unfinished: the plan decides
    code, _, err = call_main("--input", *corpus.inputs, "--tokenizer", corpus.tokenizer, "--out", str(out))
    assert code == 2 and "holds an unfinished preparation with other inputs" in one_error_line(err)
    assert json.loads((out / PLAN).read_text())["sources"][0]["path"] == corpus.inputs[0]
    code, _, err = call_main("--input", *corpus.inputs[:1], "--tokenizer", "byte", "--out", str(out))
    assert code == 2 and "with other tokenizer" in one_error_line(err)
    code, _, err = call_main("--input", *corpus.inputs[:1], "--tokenizer", corpus.tokenizer, "--out", str(out),
                             "--chunk-mb", "1")
    assert code == 2 and "with other --chunk-mb" in one_error_line(err)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("")
    code, _, err = call_main("--input", *corpus.inputs, "--tokenizer", "byte", "--out", str(tmp_path / "mine"))
    assert code == 2 and "holds other files (thesis.tex, ...)" in one_error_line(err)


# Any bytes on the lines of a jsonl file: a dataset whose counts add up, or one line and exit 2.
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
LINE = st.one_of(
    st.binary(max_size=40),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"text": st.text(max_size=30)}).map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    st.fixed_dictionaries({"text": JSON}).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=30, deadline=None)
@given(lines=st.lists(LINE, min_size=1, max_size=6), max_bad=st.sampled_from([0, 100]))
def test_any_line_bytes_prepare_or_fail_in_one_line(corpus, lines, max_bad):
    content = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fuzz.jsonl"
        data.write_bytes(content)
        code, _, err = call_main("--input", str(data), "--tokenizer", corpus.tokenizer, "--out", f"{tmp}/out",
                                 "--max-bad", str(max_bad), "--workers", "1")
        if code == 2:
            assert one_error_line(err).startswith(f"config error: {data}:")
            return
        assert code == 0, err
        manifest = read_manifest(f"{tmp}/out", "test")
        rows = content.split(b"\n")
        rows[0] = rows[0].removeprefix(b"\xef\xbb\xbf")
        assert manifest["documents"] + manifest["bad_lines"] == sum(1 for row in rows if row.strip())
        bounds = np.fromfile(shard_paths(Path(tmp) / "out", "000000")[1], "<i8")
        assert len(bounds) == manifest["documents"] + 1 and bounds[-1] == manifest["tokens"]

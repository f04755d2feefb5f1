"""Checkpoint files hashed while written (launcher/checkpoint/writer.py) and the manifest built from
those hashes: in one process, no engine."""

import torch

from launcher.checkpoint.save import manifest_entries
from launcher.checkpoint.store import checksum_file
from launcher.checkpoint.writer import HashingFile, Written


def test_hash_and_size_written_equal_the_file_on_disk(tmp_path):
    state = {"w": torch.randn(1000, 300), "step": 7, "nested": [torch.arange(10), (torch.ones(3),)]}
    written = Written(tmp_path)
    written.torch_save(state, tmp_path / "a.pt")
    written.write_bytes(tmp_path / "b.json", b'{"x": 1}')
    assert written.entries == {
        name: {"file": name, "size": (tmp_path / name).stat().st_size, "xxh3": checksum_file(tmp_path / name)}
        for name in ("a.pt", "b.json")}
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert torch.equal(loaded["nested"][1][0], torch.ones(3))


def test_writeback_while_writing_keeps_every_byte(tmp_path):
    """The disk write started every few bytes (posix_fadvise) changes nothing in the file."""
    data = [bytes(range(256)) * 40, b"x" * 5000, bytes(7)]
    with HashingFile(tmp_path / "f", writeback_every=4096) as f:
        for chunk in data:
            f.write(chunk)
    assert (tmp_path / "f").read_bytes() == b"".join(data)
    assert (f.size, f.hexdigest()) == (len(b"".join(data)), checksum_file(tmp_path / "f"))


def test_manifest_takes_hashes_written_and_reads_only_files_nobody_recorded(tmp_path):
    written = Written(tmp_path)
    written.torch_save({"w": torch.randn(100)}, tmp_path / "model.pt")
    (tmp_path / "zero_to_fp32.py").write_text("# written by other means")
    recorded = dict(written.entries["model.pt"], xxh3="0" * 16)  # a hash that is not the file's
    entries = manifest_entries(tmp_path, [[recorded]])
    assert [e["file"] for e in entries] == ["model.pt", "zero_to_fp32.py"]
    assert entries[0]["xxh3"] == "0" * 16  # taken as written: the file is not read back
    assert entries[1] == {"file": "zero_to_fp32.py", "size": 24, "xxh3": checksum_file(tmp_path / "zero_to_fp32.py")}

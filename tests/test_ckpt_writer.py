"""Checkpoint files hashed while written (launcher/ckpt_writer.py) and the manifest built from
those hashes: in one process, no engine."""

import io

import torch

from launcher.checkpoint import checksum_file, manifest_entries
from launcher.ckpt_writer import Written, saveable


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


def test_saveable_copies_only_views_smaller_than_their_storage(tmp_path):
    flat = torch.randn(1 << 20)  # 4 MiB, like one of DeepSpeed's flat buffers
    own = torch.randn(256)
    state = {"view": flat[:256], "own": own, "param": torch.nn.Parameter(torch.randn(4))}
    out = saveable(state)
    assert out["own"].data_ptr() == own.data_ptr()  # written as it is: no copy
    assert out["view"].data_ptr() != flat.data_ptr() and torch.equal(out["view"], flat[:256])
    assert type(out["param"]) is torch.Tensor and not out["param"].requires_grad  # detached, as DeepSpeed's clone
    written = Written(tmp_path)
    written.torch_save(out, tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < 64 << 10  # not the 4 MiB flat buffer
    raw = io.BytesIO()
    torch.save(state, raw)
    assert raw.tell() > 4 << 20  # what torch.save of the view alone would write


def test_manifest_takes_hashes_written_and_reads_only_files_nobody_recorded(tmp_path):
    written = Written(tmp_path)
    written.torch_save({"w": torch.randn(100)}, tmp_path / "model.pt")
    (tmp_path / "zero_to_fp32.py").write_text("# written by other means")
    recorded = dict(written.entries["model.pt"], xxh3="0" * 16)  # a hash that is not the file's
    entries = manifest_entries(tmp_path, [[recorded]])
    assert [e["file"] for e in entries] == ["model.pt", "zero_to_fp32.py"]
    assert entries[0]["xxh3"] == "0" * 16  # taken as written: the file is not read back
    assert entries[1] == {"file": "zero_to_fp32.py", "size": 24, "xxh3": checksum_file(tmp_path / "zero_to_fp32.py")}

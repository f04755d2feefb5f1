"""Files the launcher writes follow the umask, as other tools' outputs do (a team shares
checkpoints): not the 0600 of a private temporary file."""

import os

import pytest

from launcher.files import shared_file_mode, write_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_atomic_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert shared_file_mode() == mode
        assert os.umask(umask) == umask  # reading it left it as it was
        write_atomic(tmp_path / "latest", b"step-00000001")
    finally:
        os.umask(previous)
    assert (tmp_path / "latest").stat().st_mode & 0o777 == mode
    assert (tmp_path / "latest").read_bytes() == b"step-00000001"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary left behind

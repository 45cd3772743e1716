"""drp_kernels.io.atomic_write: umask permissions, all-or-nothing replacement, no leftovers."""
import os
import stat

import pytest

from drp_kernels.io import TMP_PREFIX, atomic_write


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_files_get_the_umask_permissions(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda f: f.write(b"abc"))
    finally:
        os.umask(old)
    assert path == str(tmp_path / "f.bin")
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    # the same as a plain open() would give
    old = os.umask(mask)
    try:
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == mode


def test_text_and_binary_content(tmp_path):
    atomic_write(tmp_path / "t.txt", lambda f: f.write("é\n"), binary=False)
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"\x00\x01"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]

    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.json", interrupted)
    assert os.listdir(tmp_path) == ["f.json"]


def test_temporary_files_are_named_for_sweeping(tmp_path, monkeypatch):
    seen = []

    def spy(f):
        seen.append(os.path.basename(f.name) if isinstance(f.name, str) else None)
        seen.extend(os.listdir(tmp_path))
        f.write(b"x")
    atomic_write(tmp_path / "last.pt", spy)
    temps = [n for n in seen if n and n.startswith(TMP_PREFIX + "last.pt.")]
    assert temps, seen
    assert os.listdir(tmp_path) == ["last.pt"]


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="writer must be callable"):
        atomic_write(tmp_path / "f", b"data")
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", lambda f: f.write(b"x"))
    assert os.listdir(tmp_path) == []

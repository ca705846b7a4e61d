import os

import pytest

from lmforge.fsutil import atomic_dir, atomic_write_text


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d"):
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_written_files_are_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755

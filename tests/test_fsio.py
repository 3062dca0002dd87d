import os

import pytest

from esmm import fsio


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_text_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    fsio.write_text(path, "one")
    fsio.write_text(path, "two")
    assert path.read_text() == "two"
    assert _leftovers(tmp_path) == []


def test_failure_inside_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), fsio.atomic_write(path, "w") as f:
        f.write("half a fi")
        raise RuntimeError("writer died")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
    path = tmp_path / "data.bin"
    with fsio.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(OSError), fsio.atomic_path(path) as tmp:
        os.remove(tmp)  # the writer failed to produce a file: fsync of it raises
    assert path.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_two_writers_use_distinct_temporary_names(tmp_path):
    path = tmp_path / "x"
    with fsio.atomic_path(path) as a, fsio.atomic_path(path) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"


def test_new_files_get_the_umask_mode_and_rewrites_keep_theirs(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "report.md"
        fsio.write_text(path, "a")
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        fsio.write_text(path, "b")
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)

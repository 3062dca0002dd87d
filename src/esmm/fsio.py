"""Crash-safe file output: every file esmm writes goes through here.

A file is written under a unique temporary name in its destination folder, flushed and fsynced,
renamed over the destination, and the folder is fsynced so the rename itself survives a power
loss. A failure at any point removes the temporary file and leaves the previous file (if any)
untouched, so a reader never sees half a file.

    with atomic_write(path, "w") as f:        # a file object
        f.write(text)

    with atomic_path(path) as tmp:           # a path, for writers that open files themselves
        pq.write_table(table, tmp)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _file_mode(path: Path) -> int:
    """The mode the file would get from a plain ``open``: kept if it exists, else 0o666 less umask.

    mkstemp creates files 0o600, which would make every rewritten output private.
    """
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _temp_name(path: Path) -> Path:
    """A unique, hidden name beside ``path`` (same folder, so the rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))
    finally:
        os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it to ``path``.

    For writers that take a path (pyarrow, torch.jit.save, onnx). The temporary file exists
    (empty) when yielded; the writer may replace it.
    """
    dest = Path(path)
    tmp = _temp_name(dest)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file (``mode`` "w" or "wb"); rename it to ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder, if any."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def prepare_file_output(path: str | Path, option: str = "--out") -> Path:
    """Check that ``path`` can be written as a file and create its folder.

    Raises:
        UsageError: ``path`` is an existing folder, or one of its parents is a file.
    """
    from esmm.errors import EsmmError, UsageError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {p}: is a folder; expected a file name")
    blocker = _file_ancestor(p)
    if blocker is not None:
        raise UsageError(f"{option} {p}: {blocker} is a file, not a folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EsmmError(f"{option} {p}: cannot create its folder ({e.strerror})") from None
    return p


def prepare_dir_output(path: str | Path, option: str = "--out") -> Path:
    """Check that ``path`` can be used as an output folder and create it.

    Raises:
        UsageError: ``path`` or one of its parents is an existing file.
    """
    from esmm.errors import EsmmError, UsageError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {p}: is a file; expected a folder")
    blocker = _file_ancestor(p)
    if blocker is not None:
        raise UsageError(f"{option} {p}: {blocker} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EsmmError(f"{option} {p}: cannot create it ({e.strerror})") from None
    return p

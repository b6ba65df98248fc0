"""Writing files atomically: a reader, or a job resumed after a crash, finds the old file or the complete new one,
never a truncated one. The content goes to a hidden temporary sibling (same folder, so the rename cannot cross file
systems), is flushed to disk when ``durable``, and is renamed over the target.

>>> with atomic_path(folder / "grid.png", durable=False) as tmp:
...     image.save(tmp, format="PNG")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "fsync_path", "write_bytes_atomic", "write_text_atomic"]


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "", durable: bool = True) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; when the block ends without an error it is renamed
    onto ``path`` (fsynced before and, with its folder, after the rename when ``durable``). On an error the
    temporary file is removed and ``path`` is untouched. ``suffix`` ends the temporary name (for writers that insist
    on an extension, such as ``np.savez``). The name carries the process id: concurrent writers never share it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """``path`` holds exactly ``data`` afterwards, or its old content if the write failed. The file gets the usual
    permissions (the user's umask)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, durable: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable)

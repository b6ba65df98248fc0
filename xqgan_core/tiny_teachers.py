"""Tiny random-weight teachers for every installed aligner that offers one (``xqgan-run make-tiny-teachers``).

Each teacher plugin writes a tiny network of its real architecture with random weights into a folder
(``TeacherAligner.save_tiny_teacher``) and says which aligner options read it; the result is a list of
``[[aligners]]`` tables. Their features mean nothing: for tests and CPU-sized runs
(``configs/xqgan-sc-tiny-aligned.toml``), never for real training.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from .catalog import catalog


def make_tiny_teachers(folder: str | Path, only: Collection[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """Write the tiny teachers of the installed aligners (``only``: of these names) into ``folder``.

    Returns the ``[[aligners]]`` tables that read them (``use`` + options, paths as ``folder`` was given) and the
    names of the aligners that offer no tiny teacher. ValueError for a name in ``only`` that is not installed."""
    entries = catalog().of_kind("aligner")
    unknown = sorted(set(only) - {e.name for e in entries})
    if unknown:
        raise ValueError(f"no such aligner installed: {', '.join(unknown)} "
                         f"(installed: {', '.join(e.name for e in entries) or 'none'})")
    tables, without = [], []
    for entry in entries:
        if only and entry.name not in only:
            continue
        save = getattr(entry.load(), "save_tiny_teacher", None)
        options = save(Path(folder)) if save is not None else None
        if options is None:
            without.append(entry.name)
        else:
            tables.append({"use": entry.name, **options})
    return tables, without

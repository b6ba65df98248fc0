"""The fault-tolerant image dataset behind the built-in data sources, and the random crop / flip draws they share.

Broken files never stop a run: they are reported once (a ``BadImageWarning`` naming path and reason), collected by
a ``ProblemLog`` and skipped, the item falling back to the next readable image. Reports made inside DataLoader
worker processes reach the main process through a small append-only log file, so ``entries()`` sees them too.

Item keys: an ``int`` draws its random choices (crop position, scale, flip) from torch's global RNG; a tuple
``(index, seed)`` draws them from a ``torch.Generator`` seeded with ``seed``, so the item depends on the key alone
(not on the global or a DataLoader worker's RNG): a sampler that yields such keys makes a run exactly resumable.
Crops are drawn with ``xqgan_core.images.square_box`` / ``render``.
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
import uuid
import warnings
import weakref
from typing import Any, Union

import torch

from .errors import ImageReadError, NoReadableImageError

Item = dict[str, Any]
#: A dataset key: an index, or (index, seed) for an item whose random choices depend on ``seed`` only.
ItemKey = Union[int, tuple[int, int]]

_SEED_MASK = (1 << 64) - 1  # torch.Generator seeds are unsigned 64-bit


class BadImageWarning(UserWarning):
    """An image file could not be read and is skipped."""


# ----------------------------------------------------------------------------------------------------------------
# Random choices of an item (crop position, scale, flip)


def uniform(rng: torch.Generator | None = None) -> float:
    """One draw from U[0, 1): from ``rng``, or torch's global RNG when None."""
    return float(torch.rand((), generator=rng))


def random_position(rng: torch.Generator | None = None) -> tuple[float, float]:
    u = torch.rand(2, generator=rng)
    return (float(u[0]), float(u[1]))


def coin(rng: torch.Generator | None = None) -> bool:
    return uniform(rng) < 0.5


def parse_key(key: Any) -> tuple[int, torch.Generator | None]:
    """An item key -> (index, the generator its random choices come from; None = torch's global RNG)."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an index or (index, seed), got {key!r}")
        index, seed = operator.index(key[0]), operator.index(key[1])
        return index, torch.Generator().manual_seed(seed & _SEED_MASK)
    return operator.index(key), None


# ----------------------------------------------------------------------------------------------------------------
# Problem reporting


class ProblemLog:
    """Unreadable sources, reported once each, shared between the main process and DataLoader workers.

    Every report is appended as one JSON line to a private temp file (created only when a problem occurs, removed
    when the owning object is collected), so a worker's findings reach ``entries()`` in the main process.
    """

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._file = os.path.join(tempfile.gettempdir(), f"xqgan-data-problems-{self._owner}-{uuid.uuid4().hex}.jsonl")
        self._seen: dict[str, str] = {}
        weakref.finalize(self, _remove_log, self._file, self._owner)

    def report(self, source: str, reason: str) -> None:
        if source in self._seen:
            return
        self._seen[source] = reason
        if source in dict(self._shared()):  # another process has already warned about it
            return
        try:
            with open(self._file, "a", encoding="utf-8") as f:
                f.write(json.dumps([source, reason]) + "\n")
        except OSError:
            pass  # an unwritable temp dir only costs cross-process visibility
        warnings.warn(BadImageWarning(f"skipping {source}: {reason}"), stacklevel=3)

    def entries(self) -> list[str]:
        merged = dict(self._seen)
        for source, reason in self._shared():
            merged.setdefault(source, reason)
        return [f"{source}: {reason}" for source, reason in merged.items()]

    def _shared(self) -> list[tuple[str, str]]:
        try:
            with open(self._file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                source, reason = json.loads(line)
            except ValueError:
                continue  # a line being written concurrently
            out.append((source, reason))
        return out


def _remove_log(path: str, owner: int) -> None:
    if os.getpid() == owner:  # forked workers inherit this finalizer; only the creator deletes
        try:
            os.remove(path)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------------------
# The dataset


class FallbackDataset(torch.utils.data.Dataset):
    """A dataset whose items may fail to load: a failure is reported once and the next readable item is served
    (its own ``index`` in the item dict).

    Keys are ``ItemKey``s (see the module docstring). Subclasses implement ``_load(i, rng) -> Item`` raising
    ``ImageReadError``, drawing every random choice from ``rng`` (None = the global RNG) through the helpers
    above, and ``_source(i)`` for messages.
    """

    def __init__(self, size: int, problems: ProblemLog, what: str) -> None:
        self._size = size
        self._problems = problems
        self._bad: set[int] = set()
        self._what = what

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: ItemKey) -> Item:
        index, rng = parse_key(key)
        if not -self._size <= index < self._size:
            raise IndexError(f"index {index} out of range for {self._size} items")
        index %= self._size
        for step in range(self._size):  # bounded: each item is tried at most once
            j = (index + step) % self._size
            if j in self._bad:
                continue
            try:
                return self._load(j, rng)
            except ImageReadError as exc:
                self._bad.add(j)
                self._problems.report(exc.path or self._source(j), exc.reason or str(exc))
        raise NoReadableImageError(
            f"none of the {self._size} images of {self._what} could be read; see the warnings above for each file"
        )

    def _load(self, i: int, rng: torch.Generator | None) -> Item:
        raise NotImplementedError

    def _source(self, i: int) -> str:
        return f"item {i}"

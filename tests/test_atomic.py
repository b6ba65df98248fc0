"""xqgan_core.atomic: a target holds its old content or the complete new one, and no temporary file is left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xqgan_core.atomic import atomic_path, write_text_atomic


def test_a_finished_write_replaces_the_target(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_text("old")
    assert write_text_atomic(target, "new") == target and target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_a_failed_write_keeps_the_old_content_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target, durable=False) as tmp:
            tmp.write_bytes(b"half a pic")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_the_suffix_serves_writers_that_add_an_extension(tmp_path: Path) -> None:
    target = tmp_path / "stats.npz"
    with atomic_path(target, suffix=".npz") as tmp:
        assert tmp.name.startswith(".stats.npz.tmp-") and tmp.suffix == ".npz"
        np.savez(tmp, mu=np.zeros(3))
    assert np.load(target)["mu"].shape == (3,) and [p.name for p in tmp_path.iterdir()] == ["stats.npz"]

"""pytest fixtures of the kit: an offline hub and a throw-away TORCH_HOME, as CI uses them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmp_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty TORCH_HOME so no test depends on (or pollutes) a shared weight cache."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    yield home


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_torch_home: Path) -> Iterator[Path]:
    """No model-hub access (a miss fails at once instead of retrying) and an empty TORCH_HOME."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("XQGAN_OFFLINE", "1")  # no LPIPS backbone download attempt
    yield tmp_torch_home

"""Every shipped run file validates against the installed plugins (presets must not rot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xqgan_core import Registry

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = sorted([ROOT / "registry.toml", *(ROOT / "configs").glob("*.toml")])


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_run_file_validates(path):
    reg = Registry.from_toml(path)
    assert reg.config.encoder.config.out_dim == reg.config.decoder.config.in_dim
    q = reg.config.quantizer.build()
    assert q.dim == reg.config.encoder.config.out_dim, "the quantizer's dim must match the encoder's out_dim"


def test_presets_cover_the_paper_hierarchies():
    names = {p.stem for p in RUN_FILES}
    assert {"xqgan-v-vp2-16384", "xqgan-v-msvr10p2-4096", "xqgan-v-msbr10p2-16384"} <= names

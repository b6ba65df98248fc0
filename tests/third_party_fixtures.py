"""Builds throw-away third-party plugin distributions in a temporary folder and pip-installs them.

Each is installed with ``pip install --target`` into its own site folder, which tests put on ``sys.path`` /
``PYTHONPATH``: the real pip build, dist-info and entry points, without leaving anything in the shared venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TINYQ = '''
"""A tiny third-party quantizer: nearest of K learned codes, straight-through."""
import torch
from torch import nn
from xqgan_core import ComponentSpec, component, config, option, positive
from xqgan_core.interfaces import Quantizer, QuantOut


class TinyQuantizer(Quantizer):
    plugin_api = 1

    @config
    class Config:
        codebook_size: int = option(16, help="Number of codes.", validator=positive())
        dim: int = option(4, help="Code dimension.", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.dim, self.codebook_size = config.dim, config.codebook_size
        self.codes = nn.Parameter(torch.randn(config.codebook_size, config.dim))

    def forward(self, z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        idx = torch.cdist(flat, self.codes).argmin(1)
        zq = self.codes[idx].view(z.shape[0], z.shape[2], z.shape[3], self.dim).permute(0, 3, 1, 2)
        loss = ((zq - z.detach()) ** 2).mean()
        return QuantOut(z + (zq - z).detach(), idx.view(z.shape[0], *z.shape[2:]), {"codebook": loss})

    def indices_to_codes(self, indices):
        return self.codes[indices].permute(0, 3, 1, 2)


class NestedQuantizer(Quantizer):
    """Delegates to an inner quantizer given as a nested table: exercises component nesting."""

    plugin_api = 1

    @config
    class Config:
        inner: ComponentSpec = component("quantizer", default={"use": "tinyq"}, help="The wrapped quantizer.")
        scale: float = option(1.0, help="Multiplier applied before quantization.", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.inner = config.inner.build()
        self.dim, self.codebook_size = self.inner.dim, self.inner.codebook_size

    def forward(self, z):
        return self.inner(z * self.config.scale)

    def indices_to_codes(self, indices):
        return self.inner.indices_to_codes(indices)
'''


BACKBONE = '''
"""A tiny patchify encoder / unpatchify decoder, enough to make a complete run file."""
import torch
from torch import nn
from xqgan_core import config, option, positive
from xqgan_core.interfaces import Decoder, Encoder


class PatchEncoder(Encoder):
    plugin_api = 1

    @config
    class Config:
        out_dim: int = option(4, help="Latent channels.", validator=positive())
        patch: int = option(4, help="Patch size (= downsampling factor).", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.out_dim, self.downsample = config.out_dim, config.patch
        self.proj = nn.Conv2d(3, config.out_dim, config.patch, stride=config.patch)

    def forward(self, x):
        return self.proj(x)


class PatchDecoder(Decoder):
    plugin_api = 1

    @config
    class Config:
        in_dim: int = option(4, help="Latent channels.", validator=positive())
        patch: int = option(4, help="Patch size (= upsampling factor).", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.in_dim = config.in_dim
        self.proj = nn.ConvTranspose2d(config.in_dim, 3, config.patch, stride=config.patch)

    @property
    def last_layer(self):
        return self.proj.weight

    def forward(self, z):
        return self.proj(z)
'''


def _write_package(root: Path, dist: str, module: str, files: dict[str, str], entry_points: dict[str, dict[str, str]]) -> Path:
    pkg = root / dist
    (pkg / "src" / module).mkdir(parents=True)
    (pkg / "src" / module / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / "src" / module / name).write_text(textwrap.dedent(text))
    eps = "\n".join(
        f'[project.entry-points."{group}"]\n' + "\n".join(f'{k} = "{v}"' for k, v in items.items())
        for group, items in entry_points.items()
    )
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "0.0.1"
            dependencies = ["xqgan-core"]

            [tool.setuptools.packages.find]
            where = ["src"]
            """
        )
        + "\n"
        + eps
        + "\n"
    )
    return pkg


def _pip_install(pkg: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(pkg)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def third_party_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Site folders: 'main' (tinyq + a broken plugin + an outdated one) and 'dupe' (another 'tinyq')."""
    root = tmp_path_factory.mktemp("third_party")
    main_site, dupe_site = root / "site-main", root / "site-dupe"
    good = _write_package(
        root, "xqgan-plugin-tinyq", "xqgan_plugin_tinyq", {"quantizer.py": TINYQ, "backbone.py": BACKBONE},
        {
            "xqgan.quantizer": {
                "tinyq": "xqgan_plugin_tinyq.quantizer:TinyQuantizer",
                "nested": "xqgan_plugin_tinyq.quantizer:NestedQuantizer",
            },
            "xqgan.encoder": {"patch": "xqgan_plugin_tinyq.backbone:PatchEncoder"},
            "xqgan.decoder": {"patch": "xqgan_plugin_tinyq.backbone:PatchDecoder"},
        },
    )
    broken = _write_package(
        root, "xqgan-plugin-broken", "xqgan_plugin_broken",
        {"quantizer.py": "import missing_dependency_xyz  # not installed\n", "old.py": TINYQ.replace("plugin_api = 1", "plugin_api = 0")},
        {"xqgan.quantizer": {"broken": "xqgan_plugin_broken.quantizer:Broken", "oldapi": "xqgan_plugin_broken.old:TinyQuantizer"}},
    )
    dupe = _write_package(
        root, "xqgan-plugin-tinyq-fork", "xqgan_plugin_tinyq_fork", {"quantizer.py": TINYQ},
        {"xqgan.quantizer": {"tinyq": "xqgan_plugin_tinyq_fork.quantizer:TinyQuantizer"}},
    )
    _pip_install(good, main_site)
    _pip_install(broken, main_site)
    _pip_install(dupe, dupe_site)
    return {"main": main_site, "dupe": dupe_site}


def env_with(*sites: Path) -> dict[str, str]:
    """Environment for a subprocess that sees the given plugin site folders."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(s) for s in sites] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch):
    """Put site folders on sys.path for in-process tests; the catalog is refreshed before and after."""
    from xqgan_core.catalog import catalog

    def add(*sites: Path) -> None:
        for s in sites:
            monkeypatch.syspath_prepend(str(s))
        catalog(refresh=True)

    yield add
    monkeypatch.undo()
    catalog(refresh=True)

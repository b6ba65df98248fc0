"""The plugin test kit must be able to fail: run it against a deliberately broken plugin and read the outcomes.

A throw-away distribution (a hand-written dist-info with entry points, so no pip build is needed) offers one
correct component per kind and, next to each, variants with exactly one defect. The kit's contract classes are
run on them in a pytest subprocess; each defect must fail the check written for it, the correct components must
pass everything, and a check that does not apply must be reported as skipped with its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

DIST = "xqgan-kit-probe"
MODULE = "xqgan_kit_probe"

COMPONENTS = '''
"""Correct tiny components, and subclasses that each break one promise of the plugin contract."""
import attrs
import torch
from torch import nn
from xqgan_core import config, option, positive
from xqgan_core.frozen import seeded
from xqgan_core.interfaces import Decoder, Discriminator, Encoder, Quantizer, QuantOut


class GoodQuantizer(Quantizer):
    """Nearest of K learned codes with a straight-through gradient."""

    plugin_api = 1

    @config
    class Config:
        codebook_size: int = option(16, help="Number of codes.", validator=positive())
        dim: int = option(4, help="Code dimension.", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.dim, self.codebook_size = config.dim, config.codebook_size
        self.codes = nn.Parameter(torch.randn(config.codebook_size, config.dim))

    def nearest(self, z):
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        return torch.cdist(flat, self.codes.detach()).argmin(1).view(z.shape[0], *z.shape[2:])

    def straight_through(self, z, zq):
        return z + (zq - z).detach()

    def forward(self, z):
        idx = self.nearest(z)
        zq = self.codes[idx].permute(0, 3, 1, 2)
        loss = ((zq - z.detach()) ** 2).mean() + 0.25 * ((zq.detach() - z) ** 2).mean()
        return QuantOut(self.straight_through(z, zq), self.public_indices(idx), {"codebook": loss})

    def public_indices(self, idx):
        return idx

    def private_indices(self, indices):
        return indices

    def indices_to_codes(self, indices):
        return self.codes[self.private_indices(indices)].permute(0, 3, 1, 2)

    def codebook_rows(self):
        return self.codes


class FixedCodes(GoodQuantizer):
    """Correct, but stores no codebook table (like lfq / bsq): the codebook-rows check does not apply."""

    def codebook_rows(self):
        return None


class NoStraightThrough(GoodQuantizer):
    def straight_through(self, z, zq):
        return zq  # the reconstruction gradient never reaches the encoder


class OffsetIndices(GoodQuantizer):
    """Consistent with itself, but its indices lie outside [0, codebook_size)."""

    def public_indices(self, idx):
        return idx + self.codebook_size

    def private_indices(self, indices):
        return indices - self.codebook_size


class CopiedCodebook(GoodQuantizer):
    def codebook_rows(self):
        return self.codes.detach().clone()  # a copy: a wrapper adding rows to it would train nothing


class MissingHelp(GoodQuantizer):
    @config
    class Config:
        codebook_size: int = option(16, help="Number of codes.", validator=positive())
        dim: int = option(4, help="Code dimension.", validator=positive())
        temperature: float = attrs.field(default=1.0)  # no help text


class NoisyInEval(GoodQuantizer):
    def forward(self, z):
        return super().forward(z + 0.5 * torch.randn_like(z))  # random even in eval mode


class DetachedLoss(GoodQuantizer):
    def forward(self, z):
        out = super().forward(z)
        return QuantOut(out.z_q, out.indices, {k: v.detach() for k, v in out.losses.items()})


class GoodEncoder(Encoder):
    plugin_api = 1

    @config
    class Config:
        out_dim: int = option(4, help="Latent channels.", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.out_dim, self.downsample = config.out_dim, 4
        self.proj = nn.Conv2d(3, config.out_dim, 4, stride=4)

    def forward(self, x):
        return self.proj(x)


class WrongDownsample(GoodEncoder):
    def __init__(self, config):
        super().__init__(config)
        self.downsample = 2  # the conv downsamples by 4


class GoodDecoder(Decoder):
    plugin_api = 1

    @config
    class Config:
        in_dim: int = option(4, help="Latent channels.", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.in_dim = config.in_dim
        self.proj = nn.ConvTranspose2d(config.in_dim, 3, 4, stride=4)

    @property
    def last_layer(self):
        return self.proj.weight

    def forward(self, z):
        return self.proj(z)


class CopiedLastLayer(GoodDecoder):
    @property
    def last_layer(self):
        return self.proj.weight.detach().clone()


class GoodDiscriminator(Discriminator):
    plugin_api = 1

    @config
    class Config:
        ndf: int = option(8, help="Channels of the first layer.", validator=positive())

    def __init__(self, config):
        super().__init__(config)
        self.net = nn.Sequential(nn.Conv2d(3, config.ndf, 4, stride=2), nn.LeakyReLU(0.2), nn.Conv2d(config.ndf, 1, 3))

    def forward(self, x):
        return self.net(x)


class DetachedInput(GoodDiscriminator):
    def forward(self, x):
        return self.net(x.detach())  # no gradient for the generator's adversarial loss


class FrozenFeatures(GoodDiscriminator):
    """Correct: a trainable net on the features of a frozen network held with hold_frozen."""

    def __init__(self, config):
        super().__init__(config)
        # never saved: built from a fixed seed, or a rebuild (resume, the round-trip check) would differ
        self.hold_frozen("features", seeded(lambda: nn.Conv2d(3, 3, 3, padding=1)))

    def forward(self, x):
        return self.net(self.features(x))


class TrainedFrozenPart(FrozenFeatures):
    def __init__(self, config):
        super().__init__(config)
        self.features.requires_grad_(True)  # the "frozen" network would be trained by whoever steps its grads
'''

#: kind -> entry-point name -> class in COMPONENTS
ENTRY_POINTS: dict[str, dict[str, str]] = {
    "quantizer": {
        "probe-good": "GoodQuantizer",
        "probe-fixed-codes": "FixedCodes",
        "probe-no-straight-through": "NoStraightThrough",
        "probe-offset-indices": "OffsetIndices",
        "probe-copied-codebook": "CopiedCodebook",
        "probe-missing-help": "MissingHelp",
        "probe-noisy-eval": "NoisyInEval",
        "probe-detached-loss": "DetachedLoss",
    },
    "encoder": {"probe-good": "GoodEncoder", "probe-wrong-downsample": "WrongDownsample"},
    "decoder": {"probe-good": "GoodDecoder", "probe-copied-last-layer": "CopiedLastLayer"},
    "discriminator": {"probe-good": "GoodDiscriminator", "probe-detached-input": "DetachedInput",
                      "probe-frozen-features": "FrozenFeatures", "probe-trained-frozen-part": "TrainedFrozenPart"},
}

CONTRACT = {"quantizer": "QuantizerContract", "encoder": "EncoderContract", "decoder": "DecoderContract",
            "discriminator": "DiscriminatorContract"}

#: test class -> the checks its defect must fail (other checks may fail too, as a consequence)
MUST_FAIL: dict[str, set[str]] = {
    "TestQuantizerNoStraightThrough": {"test_straight_through_gradient_is_identity_on_z_q", "test_gradient_reaches_input"},
    "TestQuantizerOffsetIndices": {"test_indices_in_range"},
    "TestQuantizerCopiedCodebook": {"test_codebook_rows_match_the_codebook"},
    "TestQuantizerMissingHelp": {"test_every_option_has_help"},
    "TestQuantizerNoisyEval": {"test_deterministic_in_eval_mode"},
    "TestQuantizerDetachedLoss": {"test_losses_are_finite_scalars"},
    "TestEncoderWrongDownsample": {"test_output_shape"},
    "TestDecoderCopiedLastLayer": {"test_last_layer_is_a_trained_parameter"},
    "TestDiscriminatorDetachedInput": {"test_gradient_reaches_input"},
    "TestDiscriminatorTrainedFrozenPart": {"test_frozen_parts_are_not_trained_or_saved"},
}
CORRECT = {"TestQuantizerGood", "TestQuantizerFixedCodes", "TestEncoderGood", "TestDecoderGood", "TestDiscriminatorGood",
           "TestDiscriminatorFrozenFeatures"}


def _class_name(kind: str, entry: str) -> str:
    words = entry.removeprefix("probe-").split("-")
    return "Test" + kind.capitalize() + "".join(w.capitalize() for w in words)


def _write_site(site: Path) -> None:
    """The probe package plus a minimal dist-info: what importlib.metadata (and so the catalog) reads."""
    (site / MODULE).mkdir(parents=True)
    (site / MODULE / "__init__.py").write_text("")
    (site / MODULE / "components.py").write_text(COMPONENTS)
    info = site / f"{MODULE}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(
            f"[xqgan.{kind}]\n" + "".join(f"{name} = {MODULE}.components:{cls}\n" for name, cls in names.items())
            for kind, names in ENTRY_POINTS.items()
        )
    )


def _write_tests(folder: Path) -> Path:
    imports = ", ".join(sorted(set(CONTRACT.values())))
    classes = "\n".join(
        f"class {_class_name(kind, name)}({CONTRACT[kind]}):\n    name = {name!r}\n    package = {DIST!r}\n"
        for kind, names in ENTRY_POINTS.items()
        for name in names
    )
    path = folder / "test_probe_contracts.py"
    path.write_text(f"from xqgan_core.testing import {imports}\n\n\n{classes}")
    (folder / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: none of this project's settings
    return path


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, tuple[str, str]]]:
    """test class -> test name -> (outcome, message) from the kit's run on the probe plugin."""
    root = tmp_path_factory.mktemp("kit_probe")
    site = root / "site"
    _write_site(site)
    tests = _write_tests(root)
    report = root / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", str(tests)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert report.is_file(), proc.stdout + proc.stderr
    result: dict[str, dict[str, tuple[str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, node.get("message", "")
        result.setdefault(cls, {})[case.get("name", "")] = (outcome, message)
    assert set(result) == CORRECT | set(MUST_FAIL), proc.stdout[-3000:]
    return result


@pytest.mark.parametrize("cls", sorted(MUST_FAIL))
def test_each_defect_fails_its_check(cls: str, outcomes: dict[str, dict[str, tuple[str, str]]]) -> None:
    failed = {name for name, (outcome, _) in outcomes[cls].items() if outcome == "failure"}
    assert MUST_FAIL[cls] <= failed, f"{cls}: expected failures {sorted(MUST_FAIL[cls])}, got {sorted(failed)}"


@pytest.mark.parametrize("cls", sorted(CORRECT))
def test_correct_components_pass(cls: str, outcomes: dict[str, dict[str, tuple[str, str]]]) -> None:
    bad = {name: result for name, result in outcomes[cls].items() if result[0] in ("failure", "error")}
    assert not bad, bad
    assert len(outcomes[cls]) >= 5  # the kit did run its checks on it


def test_a_check_that_does_not_apply_is_a_visible_skip(outcomes: dict[str, dict[str, tuple[str, str]]]) -> None:
    outcome, message = outcomes["TestQuantizerFixedCodes"]["test_codebook_rows_match_the_codebook"]
    assert outcome == "skipped" and "codebook_rows() is None" in message
    assert outcomes["TestQuantizerGood"]["test_codebook_rows_match_the_codebook"][0] == "passed"
    outcome, message = outcomes["TestDiscriminatorGood"]["test_frozen_parts_are_not_trained_or_saved"]
    assert outcome == "skipped" and "no frozen parts" in message
    assert outcomes["TestDiscriminatorFrozenFeatures"]["test_frozen_parts_are_not_trained_or_saved"][0] == "passed"

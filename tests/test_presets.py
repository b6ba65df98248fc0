"""Every shipped run file validates, and each GPU preset is the paper row its name promises.

The 256-px models (~72 M parameters for the CNN, ~172 M for the ViT-B encoder + decoder) are built on the meta
device: shapes and parameter counts without memory or initialisation time. The SC (ViT) presets start from DINOv2
weights (``init = "dinov2"``); they are built here with random weights, and separately checked to fail fast, naming
the cache they looked in, when those weights are not available offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import huggingface_hub.constants
from torch import nn
import pytest
import torch

from xqgan_core import Registry
from xqgan_core.alignment import AlignmentInputs, shared_teachers
from xqgan_core.config import ComponentSpec
from xqgan_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = sorted([ROOT / "registry.toml", *(ROOT / "configs").glob("*.toml")])
#: CPU presets (validated with the run files above; each has its own end-to-end test)
CPU_PRESETS = {"xqgan-sc-tiny-msvr": "test_tiny_sc_preset.py", "xqgan-sc-tiny-aligned": "test_tiny_aligned_preset.py"}
#: GPU presets: each is a paper row
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.toml") if p.stem not in CPU_PRESETS)


@dataclass(frozen=True)
class PaperRow:
    """What a preset's name promises (XQ-GAN paper, Table 2 naming: P = product branches, R = residual scales)."""

    branches: int  # P
    code: str  # the innermost quantizer: vq or bsq
    codebook_size: int  # codes per codebook (bsq: 2**bits)
    code_dim: int | None  # dim of one vq code (bsq: its bits)
    scales: int | None  # multi-scale residual levels (None: single level)
    backbone: str = "cnn"  # "cnn" (XQ-GAN-V) or "vit" (XQ-GAN-SC)
    grid: int = 16  # side of each branch's token grid (the last scale)
    tokens: int = 256  # tokens per branch (multi-scale: the sum over scales of side^2)
    params: tuple[float, float] = (70e6, 74e6)  # encoder + quantizer + decoder
    lr_base: float = 1e-4  # lr = lr_base x (global batch / 128)
    disc_start_epoch: int | None = None  # SC rows: the reference's disc_epoch_start
    discriminator: str = "patchgan"  # SC rows: the reference's DINO discriminator
    aligners: tuple[tuple[str, int], ...] = ()  # (aligner, product branch): the paper's aligned runs
    normalized_alignment: bool = False  # the reference's clip_norm: l2-normalised, logit scale annealed 1 -> 100


def _sc_row(code: str, size: int, dim: int, scales: int | None, grid: int, tokens: int, disc_epoch: int,
            aligners: tuple[tuple[str, int], ...], normalized: bool = False) -> PaperRow:
    """An XQ-GAN-SC row: ViT-B/16 encoder (~86 M) + ViT-B/16 decoder (~86 M) + codebooks / phis, 2 branches, the
    paper's start lr 3e-5 per 128 images (Sec. 7.1), the DINO discriminator and the aligners of the reference."""
    return PaperRow(
        branches=2, code=code, codebook_size=size, code_dim=dim, scales=scales, backbone="vit",
        grid=grid, tokens=tokens, params=(170e6, 175e6), lr_base=3e-5, disc_start_epoch=disc_epoch,
        discriminator="dino", aligners=aligners, normalized_alignment=normalized,
    )


#: DINOv2 on the semantic branch (the last: the reference aligns quant_list[-1]), CLIP on the detail branch 0
SEMANTIC_AND_DETAIL = (("dinov2", -1), ("clip", 0))


#: XQ-GAN-V (the CNN backbone) at 256 px: 16x downsampling, so every branch sees a 16x16 token grid.
#: XQ-GAN-SC (the ViT backbone): K x K learned latent queries per branch (K = 11 for the 10-scale rows, 16 for VP2).
PAPER_ROWS: dict[str, PaperRow] = {
    "xqgan-v-vq16-256": PaperRow(branches=1, code="vq", codebook_size=16384, code_dim=8, scales=None),
    "xqgan-v-vp2-16384": PaperRow(branches=2, code="vq", codebook_size=16384, code_dim=32, scales=None),
    "xqgan-v-msvr10p2-4096": PaperRow(branches=2, code="vq", codebook_size=4096, code_dim=32, scales=10, tokens=680),
    "xqgan-v-msbr10p2-16384": PaperRow(branches=2, code="bsq", codebook_size=16384, code_dim=14, scales=10, tokens=680),
    "xqgan-sc-msvr10p2-4096": _sc_row("vq", 4096, 32, scales=10, grid=11, tokens=286, disc_epoch=56,
                                      aligners=SEMANTIC_AND_DETAIL),
    "xqgan-sc-msbr10p2-16384": _sc_row("bsq", 16384, 14, scales=10, grid=11, tokens=286, disc_epoch=64,
                                       aligners=SEMANTIC_AND_DETAIL, normalized=True),
    "xqgan-sc-vp2-16384": _sc_row("vq", 16384, 32, scales=None, grid=16, tokens=256, disc_epoch=56,
                                  aligners=(("dinov2", -1),)),  # the released VP2 YAML has no detail guide
}
RESOLUTION = 256
SC_PRESETS = [p for p in PRESETS if p.stem in PAPER_ROWS and PAPER_ROWS[p.stem].backbone == "vit"]
IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 1024  # ImageNet-1k train at the paper's batch 1024: 1251


def _random_init(spec: ComponentSpec) -> ComponentSpec:
    """``spec`` with ``init = ""`` (random weights) where the component has an ``init`` option."""
    if not hasattr(spec.config, "init"):
        return spec
    return attrs.evolve(spec, config=attrs.evolve(spec.config, init=""))


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_run_file_validates(path: Path) -> None:
    reg = Registry.from_toml(path)
    assert reg.config.encoder.config.out_dim == reg.config.decoder.config.in_dim
    q = reg.config.quantizer.build()
    assert q.dim == reg.config.encoder.config.out_dim, "the quantizer's dim must match the encoder's out_dim"


def test_every_preset_has_a_paper_row() -> None:
    assert {p.stem for p in PRESETS} == set(PAPER_ROWS)


def test_every_cpu_preset_exists_and_has_its_test() -> None:
    for stem, test in CPU_PRESETS.items():
        assert (ROOT / "configs" / f"{stem}.toml").is_file() and (ROOT / "tests" / test).is_file()


def _single_level(spec: Any, row: PaperRow) -> None:
    """The innermost quantizer table: vq with its codebook and dim, or bsq with its bits."""
    assert spec.use == row.code
    if row.code == "vq":
        assert (spec.config.codebook_size, spec.config.dim) == (row.codebook_size, row.code_dim)
        assert spec.config.l2_norm, "XQ-GAN's VQ is l2-normalised"
    else:
        assert 2**spec.config.bits == row.codebook_size and spec.config.bits == row.code_dim
        assert spec.config.entropy_weight == pytest.approx(0.1)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_the_paper_row_it_names(path: Path) -> None:
    row = PAPER_ROWS[path.stem]
    cfg = Registry.from_toml(path).config
    assert cfg.data.config.resolution == RESOLUTION
    assert cfg.encoder.use == cfg.decoder.use == row.backbone

    # the quantizer hierarchy: P product branches x (multi-scale residual levels) x the single-level code
    spec = cfg.quantizer
    if row.branches > 1:
        assert spec.use == "pq" and spec.config.branches == row.branches
        spec = spec.config.branch
    if row.scales is not None:
        assert spec.use == "msrq"
        scales = spec.config.scales
        assert len(scales) == row.scales and list(scales) == sorted(scales)
        assert scales[-1] == row.grid, "the last scale is the full token grid"
        assert sum(s * s for s in scales) == row.tokens
        assert (spec.config.dropout.rate, spec.config.dropout.min_levels) == (pytest.approx(0.1), 3)
        spec = spec.config.code
    _single_level(spec, row)

    # built on the meta device: the token grid, the latent width and the model size
    with torch.device("meta"):
        encoder = _random_init(cfg.encoder).build()
        decoder = _random_init(cfg.decoder).build()
        quantizer = cfg.quantizer.build()
        latents = encoder(torch.empty(1, 3, RESOLUTION, RESOLUTION))
        images = decoder(torch.empty(1, decoder.in_dim, row.grid, row.grid))
    assert tuple(latents.shape) == (1, quantizer.dim, row.grid, row.grid)
    assert tuple(images.shape) == (1, 3, RESOLUTION, RESOLUTION)
    assert quantizer.dim == row.branches * row.code_dim  # each branch quantizes its own channel group
    assert quantizer.num_levels == (row.scales or 1)
    layout = quantizer.token_layout(row.grid, row.grid)
    assert (layout.branches, layout.length) == (row.branches, row.tokens)  # tokens per branch
    assert set(layout.vocab_sizes) == {row.codebook_size}
    if row.backbone == "vit":  # the encoder's query branches are the product quantizer's branches
        assert cfg.encoder.config.branches == row.branches and cfg.encoder.config.latent_size == row.grid
    params = sum(p.numel() for m in (encoder, decoder, quantizer) for p in m.parameters())
    lo, hi = row.params
    assert lo < params < hi, f"{params / 1e6:.1f} M parameters, expected {lo / 1e6:.0f}-{hi / 1e6:.0f} M"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_as_the_paper_does(path: Path) -> None:
    """GPU settings, the perceptual loss that may not silently switch off, and lr = base x (global batch / 128)."""
    row = PAPER_ROWS[path.stem]
    cfg = Registry.from_toml(path).config
    assert cfg.device is not None and cfg.device.use == "cuda"
    assert cfg.train.precision == "bf16"
    assert cfg.loss.perceptual > 0 and cfg.loss.require_perceptual
    global_batch = 8 * cfg.train.batch_size * cfg.train.grad_accum  # the 8-GPU node the presets are written for
    assert cfg.train.lr == pytest.approx(row.lr_base * global_batch / 128)
    assert cfg.train.disc_lr == pytest.approx(1e-4 * global_batch / 128)
    assert cfg.loss.adversarial > 0 and [d.use for d in cfg.discriminators] == [row.discriminator]
    assert [(a.use, a.config.branch) for a in cfg.aligners] == list(row.aligners)


@pytest.mark.parametrize("path", SC_PRESETS, ids=lambda p: p.stem)
def test_sc_preset_follows_the_reference_recipe(path: Path) -> None:
    """Batch 1024, 200 epochs, 1-epoch warm-up, cosine to 5e-5, disc start epoch, EMA, DINOv2 init, augmentation."""
    row = PAPER_ROWS[path.stem]
    cfg = Registry.from_toml(path).config
    t, epoch = cfg.train, IMAGENET_STEPS_PER_EPOCH
    assert 8 * t.batch_size * t.grad_accum == 1024
    assert (t.steps, t.warmup_steps) == (200 * epoch, epoch)
    assert t.lr * t.min_lr_ratio == pytest.approx(5e-5, rel=1e-3)
    assert cfg.loss.disc_start == row.disc_start_epoch * epoch
    assert t.ema_decay == pytest.approx(0.9999) and cfg.loss.lecam == pytest.approx(0.001)
    for part in (cfg.encoder.config, cfg.decoder.config):
        assert part.init == "dinov2" and part.drop_path == pytest.approx(0.1)
        assert (part.embed_dim, part.depth, part.num_heads, part.patch_size) == (768, 12, 12, 16)  # ViT-B/16
    data = cfg.data.config
    assert (data.resize_range, data.crop, data.flip) == ((256, 320), "random", True)


@pytest.mark.parametrize("path", SC_PRESETS, ids=lambda p: p.stem)
def test_sc_preset_without_cached_dinov2_fails_fast_naming_the_cache(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline with an empty Hugging Face cache: validation passes, building stops before any training."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = Registry.from_toml(path).config  # validation does not need the weights
    keys = {"encoder": cfg.encoder, "decoder": cfg.decoder, "discriminators.init (dino)": cfg.discriminators[0],
            **{f"aligners.{a.use}": a for a in cfg.aligners}}  # teachers and the DINO trunk: the same cache
    for key, spec in keys.items():
        with torch.device("meta"), pytest.raises(ConfigError) as info:
            spec.build()
        message = str(info.value)
        assert key in message and str(tmp_path) in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("path", SC_PRESETS, ids=lambda p: p.stem)
def test_sc_preset_aligns_and_discriminates_as_the_reference(path: Path) -> None:
    """The reference's guides (global InfoNCE, weight 0.1, DINOv2-B/16 and CLIP ViT-B/16 OpenAI at 256 px, its
    clip_norm ramp over the 200 epochs) and its DINO discriminator behind DiffAugment (translation 1/8, colour,
    cutout 0.2, always), at its disc start / LeCam / adaptive weight (checked above)."""
    row = PAPER_ROWS[path.stem]
    cfg = Registry.from_toml(path).config
    for spec in cfg.aligners:
        a = spec.config
        assert (a.mode, a.weight, a.logit_scale, a.gather) == ("global", pytest.approx(0.1), 1.0, True)
        assert a.normalize == row.normalized_alignment
        if a.normalize:
            assert (a.max_logit_scale, a.anneal_steps) == (100.0, 200 * IMAGENET_STEPS_PER_EPOCH)
        if spec.use == "dinov2":
            assert (a.variant, a.image_size, a.patch_size, a.weights) == ("base", 256, 16, "")
        else:
            assert (a.model, a.pretrained, a.image_size, a.weights) == ("ViT-B-16", "openai", 256, "")
    disc = cfg.discriminators[0].config
    assert (disc.init, disc.input_size, tuple(disc.feature_blocks)) == ("vit_small_patch16_224.dino", 224, (2, 5, 8, 11))
    loss = cfg.loss
    assert loss.diffaug == "translation,color,cutout" and loss.diffaug_prob == 1.0
    assert (loss.diffaug_translation, loss.diffaug_cutout) == (0.125, 0.2)
    assert loss.adaptive_weight and loss.disc_loss == "hinge" and loss.adversarial == pytest.approx(0.5)


def _tiny_teacher_overrides(cfg: Any, folder: Path) -> list[str]:
    """--set overrides replacing each aligner's teacher by a tiny random one of the real architecture, saved to a
    file (the real weights cannot be downloaded here)."""
    from xqgan_plugin_clip import tiny as clip_tiny
    from xqgan_plugin_dinov2 import tiny as dinov2_tiny

    modules = {"dinov2": dinov2_tiny, "clip": clip_tiny}
    overrides = []
    for i, spec in enumerate(cfg.aligners):
        tiny = modules[spec.use]
        options = tiny.tiny_options(tiny.save_tiny_weights(folder / f"{spec.use}.safetensors"))
        overrides += [f"aligners[{i}].{k}={v!r}" if isinstance(v, str) else f"aligners[{i}].{k}={v}"
                      for k, v in options.items()]
    return overrides


@pytest.mark.parametrize("path", SC_PRESETS, ids=lambda p: p.stem)
def test_sc_preset_aligners_fit_its_quantizer(path: Path, tmp_path: Path) -> None:
    """With tiny teachers substituted: every head maps its teacher's width to the code dimension of the branch it
    names, and the aligners return finite losses on the preset's own quantizer output, with a gradient to the
    encoder's latents."""
    row = PAPER_ROWS[path.stem]
    cfg = Registry.from_toml(path, overrides=_tiny_teacher_overrides(Registry.from_toml(path).config, tmp_path)).config
    quantizer = cfg.quantizer.build()
    with shared_teachers():
        aligners = nn.ModuleList([spec.build() for spec in cfg.aligners])
    for aligner in aligners:
        aligner.attach(quantizer)
        assert aligner.proj.in_features == aligner.teacher.cls_dim and aligner.proj.out_features == row.code_dim
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    for aligner, (_, branch) in zip(aligners, row.aligners):
        latents = torch.randn(4, quantizer.dim, row.grid, row.grid, requires_grad=True)
        inputs = AlignmentInputs(images=images, latents=latents, quant=quantizer(latents), quantizer=quantizer)
        (loss,) = aligner(inputs).values()
        assert torch.isfinite(loss)
        loss.backward()
        # the gradient reaches the encoder through the channel group of the branch the aligner names, and only it
        touched = latents.grad.abs().sum(dim=(0, 2, 3)).view(row.branches, row.code_dim).sum(1) > 0
        assert touched.tolist() == [i == branch % row.branches for i in range(row.branches)]

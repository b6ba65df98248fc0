"""Every shipped run file validates, and each GPU preset is the paper row its name promises.

The 256-px models (~72 M parameters for the CNN, ~172 M for the ViT-B encoder + decoder) are built on the meta
device: shapes and parameter counts without memory or initialisation time. The SC (ViT) presets start from DINOv2
weights (``init = "dinov2"``); they are built here with random weights, and separately checked to fail fast, naming
the cache they looked in, when those weights are not available offline.

The generator presets (``configs/var-*.toml``, a [generator] table) are the paper's VAR rows (Table 3) on the
reference's released tokenizers: their ~300 M-parameter models are built on the meta device too and bound to the
token layout of the matching tokenizer preset's quantizer.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import attrs
import huggingface_hub.constants
from torch import nn
import pytest
import torch

from xqgan_core import Registry
from xqgan_core.alignment import AlignmentInputs, shared_teachers
from xqgan_core.config import ComponentSpec, validate_component
from xqgan_core.errors import CheckpointError, ConfigError
from xqgan_core.generator_run import load_frozen_tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = sorted([ROOT / "registry.toml", *(ROOT / "configs").glob("*.toml")])
#: CPU presets (validated with the run files above; each has its own end-to-end test)
CPU_PRESETS = {"xqgan-sc-tiny-msvr": "test_tiny_sc_preset.py", "xqgan-sc-tiny-aligned": "test_tiny_aligned_preset.py",
               "xqgan-v-tiny-msvr": "test_generator_preset.py", "var-tiny": "test_generator_preset.py"}


def _is_generator_run(path: Path) -> bool:
    """A run file with a [generator] table (``RunConfig.kind == "generator"``), read without validating it."""
    with path.open("rb") as f:
        return "generator" in tomllib.load(f)


#: GPU tokenizer presets: each is a paper row (the generator presets have rows of their own: GENERATOR_ROWS)
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.toml") if p.stem not in CPU_PRESETS and not _is_generator_run(p))


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
    if reg.config.kind == "generator":  # no tokenizer tables: the frozen tokenizer is named by [tokenizer]
        assert reg.config.tokenizer is not None and reg.config.encoder is None
        return
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


# -- generator presets: VAR on the reference's released tokenizers (paper Table 3) ----------------------------------


@dataclass(frozen=True)
class GeneratorRow:
    """A VAR row of the paper's Table 3: the model, the released tokenizer it was trained on, and the model size the
    paper gives. That size is counted two ways: "var" = VAR's own model of that depth in VAR's code (its 4096-way head
    over 680 tokens; the d16 row's 310M), "blocks" = the transformer blocks alone (the d17 row's 362M)."""

    depth: int
    tokenizer_file: str  # in the Hugging Face repo qiuk6/XQ-GAN (the reference README's links)
    tokenizer_preset: str  # configs/<name>.toml: the same tokenizer as a run file; its quantizer gives the layout
    vocab_size: int  # codes per product branch
    input_channels: int  # the next-scale inputs: 2 branches x the code dim (vq) or bits (bsq)
    paper_params: float
    paper_params_count: Literal["var", "blocks"]  # see above


GENERATOR_ROWS: dict[str, GeneratorRow] = {
    "var-d16-msbr10p2-16384": GeneratorRow(16, "MSBR10P2-16384/best_ckpt.pt", "xqgan-sc-msbr10p2-16384",
                                           vocab_size=16384, input_channels=2 * 14, paper_params=310e6,
                                           paper_params_count="var"),  # row 7, gFID 2.96
    "var-d17-msvr10p2-4096": GeneratorRow(17, "MSVR10P2-4096/best_ckpt.pt", "xqgan-sc-msvr10p2-4096",
                                          vocab_size=4096, input_channels=2 * 32, paper_params=362e6,
                                          paper_params_count="blocks"),  # row 1, gFID 2.60
}
GENERATOR_PRESETS = [ROOT / "configs" / f"{stem}.toml" for stem in sorted(GENERATOR_ROWS)]
#: VAR's models counted with VAR's own code (FoundationVision/VAR@78b95394, models/build_vae_var: V = 4096, Cvae = 32,
#: patch_nums 1,2,3,4,5,6,8,10,13,16 = 680 tokens, 1000 classes), for the depths of the rows
VAR_PARAMS = {16: 310_283_520, 17: 371_191_905}
VAR_TOKENIZER = {"use": "msrq", "scales": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
                 "code": {"use": "vq", "codebook_size": 4096, "dim": 32}}
XQGAN_SCALES = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)  # the 10 scales of the SC tokenizers: 286 steps per branch
IMAGENET_CLASSES = 1000
IMAGENET_TRAIN_IMAGES = 1_281_167
#: the reference's VAR recipe (README "training cmd for reproducibility" on VAR's train.py and its arg defaults)
VAR_GLOBAL_BATCH, VAR_EPOCHS, VAR_BASE_LR = 768, 350, 8e-5


def test_every_generator_preset_has_a_paper_row() -> None:
    """A GPU generator preset must be a Table 3 row (CPU ones are listed in CPU_PRESETS with their own test)."""
    generator_runs = {p.stem for p in (ROOT / "configs").glob("*.toml") if _is_generator_run(p)}
    assert generator_runs - set(CPU_PRESETS) == set(GENERATOR_ROWS)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bound_on_meta(generator: ComponentSpec, quantizer: Any, grid: int) -> Any:
    """The generator built on the meta device (shapes, no memory) and bound to ``quantizer``'s layout at ``grid``,
    for the 1000 ImageNet classes."""
    with torch.device("meta"):
        model = generator.build()
    model.bind(quantizer.token_layout(grid, grid), quantizer, IMAGENET_CLASSES)
    return model


@pytest.mark.parametrize("path", GENERATOR_PRESETS, ids=lambda p: p.stem)
def test_generator_preset_is_the_paper_row_it_names(path: Path) -> None:
    """VAR-d on the released tokenizer, its own token folder, and the reference's sampling settings."""
    row = GENERATOR_ROWS[path.stem]
    cfg = Registry.from_toml(path).config
    assert cfg.kind == "generator" and cfg.device is not None and cfg.device.use == "cuda"
    tok = cfg.tokenizer
    assert (tok.run, tok.filename, tok.use_ema) == ("qiuk6/XQ-GAN", row.tokenizer_file, True)
    g = cfg.generator.config
    assert cfg.generator.use == "var"
    assert (g.depth, g.width, g.heads, g.mlp_ratio) == (row.depth, 64 * row.depth, row.depth, 4.0)  # VAR's rule
    assert g.attn_l2_norm and g.class_dropout == pytest.approx(0.1) and g.init_std == 0.0
    assert (g.adaln_gate_init, g.adaln_init) == (pytest.approx(1e-4), 0.5)  # the reference's --alng, VAR's --aln
    assert g.drop_path == pytest.approx(0.1 * row.depth / 24, abs=1e-6)  # VAR's build_vae_var
    data = cfg.data
    assert data.use == "tokens" and data.config.flip
    assert path.stem.split("-", 2)[2] in data.config.path  # the token folder of this tokenizer (e.g. msvr10p2-4096)
    # the reference's --cfg 3.25: VAR mixes (1 + t) cond - t uncond, ours uncond + s (cond - uncond), so s = 1 + t
    s = cfg.sample
    assert (s.cfg_scale, s.top_k, s.top_p, s.temperature) == (pytest.approx(1 + 3.25), 750, pytest.approx(0.95), 1.0)


@pytest.mark.parametrize("path", GENERATOR_PRESETS, ids=lambda p: p.stem)
def test_generator_preset_trains_as_the_reference(path: Path) -> None:
    """Global batch 768, lr = 8e-5 x batch / 256, 350 epochs with a warm-up of ep / 50, linear decay to 1 %, AdamW
    (0.9, 0.95) with weight decay 0.05, clipping at 2, no EMA, evaluation every 10 epochs (header of the preset)."""
    t = Registry.from_toml(path).config.train
    global_batch = 8 * t.batch_size * t.grad_accum  # the 8-GPU node the presets are written for
    epoch = math.ceil(IMAGENET_TRAIN_IMAGES / global_batch)  # VAR's sampler fills the last batch of an epoch
    assert global_batch == VAR_GLOBAL_BATCH
    assert t.lr == pytest.approx(VAR_BASE_LR * global_batch / 256)
    assert (t.steps, t.warmup_steps, t.eval_every) == (VAR_EPOCHS * epoch, VAR_EPOCHS * epoch // 50, 10 * epoch)
    assert (t.lr_schedule, t.lr_hold, t.min_lr_ratio) == ("linear", 0.05, pytest.approx(0.01))  # VAR's lin0
    assert (t.betas, t.weight_decay, t.grad_clip) == ((0.9, 0.95), pytest.approx(0.05), pytest.approx(2.0))
    assert t.ema_decay == 0.0 and t.precision == "bf16"  # VAR keeps no EMA; its fp16 + loss scaler -> bf16


@pytest.mark.parametrize("path", GENERATOR_PRESETS, ids=lambda p: p.stem)
def test_generator_preset_binds_to_its_tokenizer_and_has_the_paper_size(path: Path) -> None:
    """Bound to the layout of its tokenizer preset's quantizer (meta device): 286 steps of 2 tokens, one head per
    branch over its vocabulary, 1000 classes + the null class. The size: at VAR's own layout the model is VAR's
    (up to the key bias VAR leaves out), and the preset's layout changes exactly the layout-sized parts."""
    row = GENERATOR_ROWS[path.stem]
    spec = Registry.from_toml(path).config.generator
    tokenizer = Registry.from_toml(ROOT / "configs" / f"{row.tokenizer_preset}.toml").config
    with torch.device("meta"):
        quantizer = tokenizer.quantizer.build()
    model = _bound_on_meta(spec, quantizer, tokenizer.encoder.config.latent_size)  # 11 x 11 latent queries
    layout, width = model.layout, 64 * row.depth
    assert (layout.length, layout.tokens_per_step, layout.vocab_sizes) == (286, 2, (row.vocab_size,) * 2)
    assert tuple(layout.scales) == XQGAN_SCALES
    assert model.head.out_features == 2 * row.vocab_size and model.head.in_features == width
    assert model.word_embed.in_features == row.input_channels
    assert model.class_embedding.num_embeddings == IMAGENET_CLASSES + 1  # + the null class
    assert tuple(model.pos_embed.shape) == (1, 286, width)

    with torch.device("meta"):
        var_quantizer = validate_component("quantizer", VAR_TOKENIZER).build()
    at_var_layout = _params(_bound_on_meta(spec, var_quantizer, 16))
    key_bias = row.depth * width  # our attention has a key bias too; VAR's has query and value biases only
    assert at_var_layout - key_bias == VAR_PARAMS[row.depth]
    var_vocab, var_steps, var_channels = 4096, 680, 32
    layout_sized = ((2 * row.vocab_size - var_vocab) * (width + 1)  # the heads (weights + biases)
                    + (286 - var_steps) * width  # the position embeddings
                    + (row.input_channels - var_channels) * width)  # the next-scale input embedding
    assert _params(model) == at_var_layout + layout_sized
    paper_basis = VAR_PARAMS[row.depth] if row.paper_params_count == "var" else _params(model.blocks)
    assert paper_basis == pytest.approx(row.paper_params, rel=2e-3)


@pytest.mark.parametrize("path", GENERATOR_PRESETS, ids=lambda p: p.stem)
def test_generator_preset_without_cached_tokenizer_fails_fast_naming_the_cache(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline with an empty Hugging Face cache: validation passes (the repo id is resolved when the run starts),
    loading the frozen tokenizer stops with an error naming tokenizer.run, the file and the cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = Registry.from_toml(path).config
    with pytest.raises(CheckpointError) as info:
        load_frozen_tokenizer(cfg.tokenizer, "cpu")
    message = str(info.value)
    assert "tokenizer.run" in message and GENERATOR_ROWS[path.stem].tokenizer_file in message
    assert str(tmp_path) in message and "HF_HUB_OFFLINE" in message

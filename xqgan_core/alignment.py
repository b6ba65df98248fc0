"""Semantic alignment: frozen teachers, what an aligner's head is handed, and the shared alignment losses.

* ``Teacher``: a frozen vision network (DINOv2, CLIP, SAM, ...) whose ``Preprocessing`` (mean / std, input size,
  patch size) travels with it. ``Teacher.features(images in [-1, 1])`` runs it once per batch under no_grad (bf16
  autocast where the device has it) and returns ``TeacherFeatures``: a global feature (CLS) and a patch grid.
* ``AlignmentInputs``: what the engine hands every aligner each step: the images, the encoder output before
  quantization, the ``QuantOut``, the views of the codes per branch / scale (asked from the quantizer through
  ``Quantizer.code_view``) and ``kept``, the samples quantizer dropout did NOT truncate (only those contribute).
* ``TeacherAligner``: the shared head of the teacher plugins. ``mode = "global"`` (the reference's alignment): the
  teacher's global feature, projected by a trainable linear map to the code dimension, against the spatial mean of
  the chosen branch's codes, symmetric InfoNCE over the global batch (gathered across ranks with gradient).
  ``mode = "patch"``: the teacher's patch grid, resampled to the token grid of the chosen branch and scale and
  projected per token, against those codes, per-token cosine or per-image InfoNCE over token positions.
* The maths (``info_nce``, ``gather_with_grad``, ``patch_cosine``, ``patch_info_nce``, ``annealed_scale``) are plain
  functions so third-party aligners reuse them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import attrs

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .config import at_least, config, option, positive
from .distributed import world_size
from .interfaces import Aligner, QuantOut, Quantizer

__all__ = [
    "AlignmentInputs",
    "Preprocessing",
    "Teacher",
    "TeacherAligner",
    "TeacherFeatures",
    "annealed_scale",
    "gather_with_grad",
    "info_nce",
    "patch_cosine",
    "patch_info_nce",
    "resample_grid",
    "shared_teachers",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# teachers


@dataclass(frozen=True)
class Preprocessing:
    """How images in [-1, 1] become a teacher's input: to [0, 1], resized (bicubic, antialiased) to
    ``input_size`` when they differ, normalised with ``mean`` / ``std``. ``patch_size``: pixels per patch, so the
    patch grid is ``input_size / patch_size`` on a side."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    patch_size: int = 16

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    def __call__(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", antialias=True,
                              align_corners=False)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass
class TeacherFeatures:
    """A teacher's output for a batch, fp32, without gradient: ``cls`` (B, D) global feature, ``patches``
    (B, D, g, g) patch grid."""

    cls: Tensor
    patches: Tensor


class Teacher(nn.Module):
    """A frozen network and its preprocessing. Subclasses set ``preprocessing``, ``cls_dim`` and ``patch_dim`` (the
    widths of the global and patch features) and implement ``extract(pixels)`` on preprocessed pixels;
    ``features(images)`` is what aligners call."""

    preprocessing: Preprocessing
    cls_dim: int
    patch_dim: int
    #: "auto": bf16 autocast on a device with bf16 support (CUDA compute capability >= 8, HPU), else fp32
    precision: str = "auto"
    #: (dtype, device) -> the weights in that dtype, made by ``_weights_in``
    _low_precision: tuple[tuple[torch.dtype, torch.device], dict[str, Tensor]] | None = None

    def extract(self, pixels: Tensor) -> TeacherFeatures:
        raise NotImplementedError

    def forward(self, pixels: Tensor) -> TeacherFeatures:
        return self.extract(pixels)

    def features(self, images: Tensor) -> TeacherFeatures:
        """The teacher's features of ``images`` in [-1, 1], without gradient. Under bf16 it runs on a bf16 copy of
        its weights made once: autocast does not cache the casts of weights that need no gradient (a frozen
        teacher's), so it would re-cast every weight at every call, and on CPU torch then takes a path ~10x slower
        than bf16 weights (open_clip ViT-B/16: 6.7 s against 0.63 s per batch of 4)."""
        with torch.no_grad(), teacher_autocast(images.device, self.precision):
            pixels = self.preprocessing(images)
            if teacher_in_bf16(images.device, self.precision):
                out = functional_call(self, self._weights_in(torch.bfloat16), (pixels.to(torch.bfloat16),))
            else:
                out = self.extract(pixels)
        return TeacherFeatures(cls=out.cls.float(), patches=out.patches.float())

    def _weights_in(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The floating-point parameters and buffers in ``dtype``, made once per device (the teacher is frozen: its
        weights never change after loading)."""
        key = (dtype, next(self.parameters()).device)
        if self._low_precision is None or self._low_precision[0] != key:
            named = {**dict(self.named_parameters()), **dict(self.named_buffers())}
            weights = {n: t.detach().to(dtype) if t.is_floating_point() else t for n, t in named.items()}
            self._low_precision = (key, weights)  # a plain attribute: not state, not moved by .to()
        return self._low_precision[1]


def teacher_in_bf16(device: torch.device, precision: str) -> bool:
    """Whether a teacher runs in bf16: where the device computes bf16 natively ("auto"), always ("bf16") or never
    ("fp32"). CPUs run fp32 under "auto": most lack native bf16 and would be slower, not faster."""
    return precision == "bf16" or (precision == "auto" and _native_bf16(device))


def teacher_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast around a teacher's forward when ``teacher_in_bf16``, else nothing."""
    if not teacher_in_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "hpu"


# ----------------------------------------------------------------------------------------------------------------
# what the head is handed


@dataclass
class AlignmentInputs:
    """One micro-batch as aligners see it. ``images`` (B, 3, H, W) in [-1, 1]; ``latents`` the encoder output the
    quantizer was given; ``quant`` its ``QuantOut``; ``step`` the optimizer step (for annealed logit scales)."""

    images: Tensor
    latents: Tensor
    quant: QuantOut
    quantizer: Quantizer
    step: int = 0
    _features: dict[int, TeacherFeatures] = field(default_factory=dict, repr=False)

    def teacher_features(self, teacher: Teacher) -> TeacherFeatures:
        """``teacher.features(images)``, computed once per batch however many aligners share the teacher."""
        if id(teacher) not in self._features:
            self._features[id(teacher)] = teacher.features(self.images)
        return self._features[id(teacher)]

    def codes(self, branch: int = 0, scale: int | None = None) -> Tensor:
        """(B, C, h, w) codes of ``branch`` up to ``scale`` with the straight-through gradient to the encoder
        (``Quantizer.code_view``)."""
        return self.quantizer.code_view(self.quant, self.latents, branch, scale)

    @property
    def kept(self) -> Tensor:
        """(B,) bool: True for the samples that kept every level (quantizer dropout did not truncate them)."""
        keep = self.quant.keep
        if keep is None:
            return torch.ones(self.images.shape[0], dtype=torch.bool, device=self.images.device)
        return keep >= int(getattr(self.quantizer, "num_levels", 1))


# ----------------------------------------------------------------------------------------------------------------
# the maths


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 (rank order), differentiable: the backward pass returns to each
    rank the gradient of its own rows, summed over ranks. ``x`` itself in a single process. Every rank must pass
    the same shape (the engine's micro-batches are equal on every rank)."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # autograd-aware collective

    return torch.cat(all_gather(x.contiguous()), dim=0)


def info_nce(a: Tensor, b: Tensor, scale: float | Tensor, valid: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP's loss) between rows of ``a`` and ``b`` (N, D): row i of one matches row i of the
    other, every other row is a negative. ``valid`` (N,) bool leaves rows out as anchors AND as negatives (samples
    quantizer dropout truncated); without a valid row the loss is 0. Computed in fp32; no host sync."""
    a, b = a.float(), b.float()
    logits = scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    if valid is None:
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    valid = valid.to(device=a.device, dtype=torch.bool)
    pair = valid[:, None] & valid[None, :]
    # left-out rows keep finite (zero) logits so their ignored cross entropies stay finite
    masked = torch.where(pair, logits, torch.where(valid[:, None] | valid[None, :], float("-inf"), 0.0))
    ce = F.cross_entropy(masked, labels, reduction="none") + F.cross_entropy(masked.t(), labels, reduction="none")
    ce = torch.where(valid, ce, 0.0)
    return ce.sum() / (2 * valid.sum().clamp(min=1))


def patch_cosine(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over tokens and valid samples of ``1 - cos(a, b)`` per token; ``a``, ``b`` (B, C, h, w)."""
    per_sample = (1 - F.cosine_similarity(a.float(), b.float(), dim=1)).flatten(1).mean(1)
    return _masked_mean(per_sample, valid)


def patch_info_nce(a: Tensor, b: Tensor, scale: float | Tensor, valid: Tensor | None = None) -> Tensor:
    """Per image, symmetric InfoNCE between the token positions of ``a`` and ``b`` (B, C, h, w), l2-normalised
    (position i of one matches position i of the other); mean over valid samples."""
    a = F.normalize(a.float().flatten(2), dim=1)  # (B, C, L)
    b = F.normalize(b.float().flatten(2), dim=1)
    logits = scale * a.transpose(1, 2) @ b  # (B, L, L)
    labels = torch.arange(logits.shape[1], device=a.device).expand(logits.shape[0], -1)
    per_sample = (F.cross_entropy(logits, labels, reduction="none").mean(1)
                  + F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)) / 2
    return _masked_mean(per_sample, valid)


def _masked_mean(per_sample: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return per_sample.mean()
    valid = valid.to(per_sample.device)
    return torch.where(valid, per_sample, 0.0).sum() / valid.sum().clamp(min=1)


def annealed_scale(step: int, steps: int, start: float, end: float) -> float:
    """``start`` at step 0 rising linearly to ``end`` at ``steps`` (then held): the reference's 1 -> 100 ramp for
    l2-normalised features (there over 200 epochs)."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * step / steps


def resample_grid(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A (B, D, g, g) feature grid at ``size``: area averaging when shrinking, bilinear when growing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# the shared head of teacher plugins


class TeacherAligner(Aligner):
    """Teacher + trainable head (a projection from the teacher's width to the code dimension). Subclasses extend
    ``Config`` with their model options and implement ``build_teacher(config) -> Teacher`` (weights loaded there:
    a missing file or an offline hub cache fails before training)."""

    @config
    class Config:
        branch: int = option(-1, help="product branch whose codes are aligned (negative: from the end; paper: "
                                      "DINOv2 on the last, semantic branch, CLIP on branch 0)")
        scale: int = option(-1, help="multi-scale quantizers: scale whose accumulated codes are aligned (patch mode; "
                                     "-1 = all scales, the full-resolution codes)")
        mode: Literal["global", "patch"] = option(
            "global", help="'global': teacher CLS vs spatial mean of the codes, InfoNCE over the global batch; "
            "'patch': teacher patch features resampled to the token grid vs the codes, per token")
        loss: Literal["infonce", "cosine"] = option(
            "infonce", help="'infonce' (global: over the batch; patch: over token positions per image) or 'cosine' "
            "(patch mode only: 1 - cosine per token)")
        weight: float = option(0.1, help="this aligner's weight (paper: 0.1); the engine also multiplies by "
                                         "loss.alignment", validator=at_least(0.0))
        logit_scale: float = option(1.0, help="InfoNCE logit scale (reference: 1, unnormalised features); with "
                                              "normalize, the start of the ramp", validator=positive())
        normalize: bool = option(False, help="l2-normalise both features and anneal the logit scale from "
                                             "logit_scale to max_logit_scale over anneal_steps (reference: clip_norm)")
        max_logit_scale: float = option(100.0, help="end of the annealed logit scale (normalize)", validator=positive())
        anneal_steps: int = option(10000, help="steps of the logit-scale ramp (normalize)", validator=at_least(0))
        learn_logit_scale: bool = option(
            False, help="a trainable logit scale (CLIP's: exp of a learned log-scale starting at logit_scale, capped at "
            "max_logit_scale), part of the head; replaces the fixed / annealed one")
        gather: bool = option(True, help="global mode: InfoNCE over the batch of all ranks (gathered with gradient); "
                                         "false: each rank's own batch")
        teacher_precision: Literal["auto", "bf16", "fp32"] = option(
            "auto", help="the teacher's forward: 'auto' = bf16 autocast on devices with native bf16 (CUDA sm80+, "
            "HPU), fp32 elsewhere")

        def check(self) -> list[str]:
            grid = getattr(self, "image_size", None), getattr(self, "patch_size", None)
            if all(isinstance(v, int) and v > 0 for v in grid) and grid[0] % grid[1]:
                # teachers that cut their input into patches (options image_size / patch_size) need a whole grid
                return [f"image_size: {grid[0]} is not a multiple of patch_size {grid[1]}"]
            if self.mode == "global" and self.loss != "infonce":
                return [f"loss: global mode aligns over the batch with 'infonce', got {self.loss!r} "
                        "(use mode = 'patch' for a per-token cosine)"]
            if self.mode == "global" and self.scale != -1:
                return ["scale: global mode uses the full codes (-1); per-scale views are for mode = 'patch'"]
            if self.learn_logit_scale and self.loss == "cosine":
                return ["learn_logit_scale: the cosine loss has no logit scale (use loss = 'infonce')"]
            return []

    @classmethod
    def build_teacher(cls, config: Any) -> Teacher:
        """The teacher with its weights (a ConfigError naming the option when they cannot be found)."""
        raise NotImplementedError

    @classmethod
    def save_tiny_teacher(cls, folder: Path) -> dict[str, Any] | None:
        """Write a tiny random-weight teacher of this plugin's real architecture into ``folder`` and return the
        aligner options that read it (``xqgan-run make-tiny-teachers``: tests and tiny CPU runs, never real
        training); None when the plugin offers none."""
        return None

    @classmethod
    def config_view(cls, config: Any) -> tuple[int, int | None] | None:
        return config.branch, (None if config.scale == -1 else config.scale)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # inside shared_teachers() (the engine builds a run's aligners there), aligners with the same teacher
        # options share one frozen teacher: loaded once, held once, run once per batch (AlignmentInputs)
        shared = _SHARED.get()
        key = (type(self), _teacher_options(config))
        teacher = shared.get(key) if shared is not None else None
        if teacher is None:
            teacher = self.build_teacher(config)
            teacher.precision = config.teacher_precision
            if shared is not None:
                shared[key] = teacher
        self.hold_frozen("teacher", teacher)
        self.proj: nn.Linear | None = None  # made by attach(), once the code dimension is known

    def attach(self, quantizer: Quantizer) -> None:
        views = quantizer.code_views()
        views.branch_index(self.config.branch)
        if self.config.scale != -1:
            views.scale_index(self.config.scale)
        if views.dim is None:
            raise ValueError(f"{type(quantizer).__name__} does not say its code dimension (CodeViews.dim)")
        teacher: Teacher = self.teacher  # type: ignore[assignment]
        width = teacher.cls_dim if self.config.mode == "global" else teacher.patch_dim
        self.proj = nn.Linear(width, views.dim)
        if self.config.learn_logit_scale:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(self.config.logit_scale)))

    def logit_scale(self, step: int) -> float | Tensor:
        """The learned scale (capped at ``max_logit_scale``), else ``logit_scale_at(step)``."""
        if self.config.learn_logit_scale:
            return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)
        return self.logit_scale_at(step)

    def logit_scale_at(self, step: int) -> float:
        c = self.config
        return annealed_scale(step, c.anneal_steps, c.logit_scale, c.max_logit_scale) if c.normalize else c.logit_scale

    def forward(self, inputs: AlignmentInputs) -> dict[str, Tensor]:
        if self.proj is None:
            raise RuntimeError(f"{type(self).__name__}: call attach(quantizer) before the first forward")
        c = self.config
        teacher: Teacher = self.teacher  # type: ignore[assignment]
        feats = inputs.teacher_features(teacher)
        codes = inputs.codes(c.branch, None if c.scale == -1 else c.scale).float()
        valid = inputs.kept
        scale = self.logit_scale(inputs.step)
        if c.mode == "global":
            t, s = self.proj(feats.cls), codes.mean(dim=(2, 3))
            if c.normalize:
                t, s = F.normalize(t, dim=1), F.normalize(s, dim=1)
            if c.gather:
                t, s = gather_with_grad(t), gather_with_grad(s)
                valid = gather_with_grad(valid.to(torch.uint8)).bool()
            loss = info_nce(t, s, scale, valid)
        else:
            grid = resample_grid(feats.patches, (codes.shape[-2], codes.shape[-1]))
            t = self.proj(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            loss = patch_cosine(t, codes, valid) if c.loss == "cosine" else patch_info_nce(t, codes, scale, valid)
        return {c.mode: c.weight * loss}


#: inside ``shared_teachers()``: the teachers built so far by (aligner class, teacher options)
_SHARED: contextvars.ContextVar[dict[tuple[Any, ...], Teacher] | None] = contextvars.ContextVar(
    "xqgan_shared_teachers", default=None)


@contextlib.contextmanager
def shared_teachers() -> Iterator[None]:
    """Aligners built inside share a teacher when their teacher options are equal (one run's aligners); outside,
    every aligner builds its own (moving one to another device or dtype never affects another)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)
_HEAD_OPTIONS = frozenset(f.name for f in attrs.fields(TeacherAligner.Config)) - {"teacher_precision"}


def _teacher_options(config: Any) -> tuple[tuple[str, Any], ...]:
    """The options that decide what the teacher is (a subclass's model options and ``teacher_precision``)."""
    return tuple((f.name, getattr(config, f.name)) for f in attrs.fields(type(config)) if f.name not in _HEAD_OPTIONS)

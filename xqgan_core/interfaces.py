"""The component interfaces a plugin implements. Importing this module imports torch.

Every component class:

* subclasses one interface below,
* declares ``plugin_api = 1`` (the version of this interface it was written against; checked at load time),
* declares a ``Config`` (``@xqgan_core.config`` attrs class whose fields use ``option(..., help=...)``),
* is constructed as ``Cls(config)``.

Return values are typed (``QuantOut``), never positional tuples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .catalog import KINDS
from .frozen import FrozenParts
from .token_layout import TokenLayout

if TYPE_CHECKING:
    from .alignment import AlignmentInputs

Indices = Tensor | list[Tensor]


class Component:
    """Mixin shared by every component: holds the validated Config."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    plugin_api: ClassVar[int]
    #: state_dict keys (relative to this module) that checkpoints written by older versions may lack, e.g. a
    #: statistics buffer added later. Loading such a checkpoint keeps their freshly initialised values instead of
    #: failing. Never list state whose absence would change the model (weights, "initialised" flags).
    optional_state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


class Encoder(Component, nn.Module):
    """``forward(images (B,3,H,W) in [-1,1]) -> latents (B, out_dim, h, w)`` with ``(h, w) = latent_grid(H, W)``:
    ``(H/downsample, W/downsample)`` for a convolutional encoder, a fixed grid for one with latent queries."""

    kind = "encoder"
    out_dim: int
    downsample: int

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) latent grid of an image of ``height x width`` pixels; ValueError (saying which sizes work) for
        a size this encoder does not accept. Default: ``downsample`` pixels per token side."""
        return downsampled_grid(int(self.downsample), height, width)

    @classmethod
    def config_downsample(cls, config: Any) -> int | None:
        """The ``downsample`` factor an encoder built from ``config`` will have, without building it (checked against
        ``data.resolution`` when a run file is validated); None when it cannot be told from the config."""
        return None


def downsampled_grid(factor: int, height: int, width: int) -> tuple[int, int]:
    """``(height / factor, width / factor)``; ValueError naming the factor when either side is not a multiple."""
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the downsampling factor {factor}: crop or resize to "
            f"multiples of {factor} (e.g. {max(height // factor, 1) * factor}x{max(width // factor, 1) * factor})"
        )
    return height // factor, width // factor


class Decoder(Component, nn.Module):
    """``forward(latents (B, in_dim, h, w)) -> images (B,3,h*upsample,w*upsample)``."""

    kind = "decoder"
    in_dim: int

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final layer; the adaptive GAN weight compares gradient norms here."""
        raise NotImplementedError(f"{type(self).__name__} does not expose last_layer (needed for adaptive_weight)")


@dataclass
class QuantOut:
    """What a quantizer returns.

    z_q: quantized latents, same shape as the input, carrying a straight-through gradient to the input.
    indices: (B, h, w) long for a single-level quantizer; (B, levels, h, w) for residual ones; a list of
        (B, s, s) per scale for multi-scale ones; product quantizers stack branches as the first index dim.
    losses: named scalar losses (already weighted by the quantizer's own coefficients), summed by the engine.
    stats: named diagnostics (perplexity, utilization, ...) as detached 0-d tensors on the latent's device, never
        Python floats: making a float waits for the device, and the trainer reads every stat in the step's one
        host sync.
    keep: (B,) int64 levels each sample kept (multi-level quantizers, set by ``MultiLevelQuantizer.forward``);
        None when every sample kept everything. Aligners leave out samples quantizer dropout truncated.
    Code outside the quantizer reads ``indices`` through ``Quantizer.token_layout`` (``to_sequence``).
    """

    z_q: Tensor
    indices: Indices
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    keep: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """Sum of ``losses`` (zero when there are none)."""
        if not self.losses:
            return self.z_q.new_zeros(())
        return torch.stack([v.float() for v in self.losses.values()]).sum()


class Quantizer(Component, nn.Module):
    """``forward(z (B, dim, h, w)) -> QuantOut``, the two directions between codes and indices, and the token layout.

    Quantizers with ``num_levels > 1`` subclass ``xqgan_core.multilevel.MultiLevelQuantizer``: ``forward(z, keep=None)``
    with ``keep`` an int or a (B,) tensor of levels each sample keeps (quantizer dropout).
    """

    kind = "quantizer"
    dim: int
    codebook_size: int
    #: levels (residual depth or number of scales); see ``MultiLevelQuantizer`` for ``forward(z, keep=...)``
    num_levels: int = 1

    @classmethod
    def config_dim(cls, config: Any) -> int | None:
        """The channels of the latent a quantizer built from ``config`` expects (its ``dim``), without building it;
        None when the config does not say. Wrappers derive it from their nested quantizers (validate-time checks)."""
        dim = getattr(config, "dim", None)
        return dim if isinstance(dim, int) and not isinstance(dim, bool) else None

    def token_layout(self, h: int, w: int) -> TokenLayout:
        """How ``forward(z).indices`` for an ``(h, w)`` latent become a ``(B, L, K)`` token sequence and back.

        Default: one index per position of one codebook (``L = h * w``, ``K = 1``); quantizers with several levels,
        branches or scales override it."""
        if self.num_levels != 1:
            raise NotImplementedError(f"{type(self).__name__} has {self.num_levels} levels: it must define token_layout")
        return TokenLayout.single((h, w), int(self.codebook_size))

    def indices_to_codes(self, indices: Indices) -> Tensor:
        """Indices as returned in ``QuantOut.indices`` -> quantized latents (B, dim, h, w)."""
        raise NotImplementedError

    def codebook_rows(self) -> Tensor | None:
        """The learned codebook as a ``(codebook_size, dim)`` tensor (with its gradient), or None when the codes are
        fixed (lfq, bsq) or not stored as one table. Wrappers use it to add stored rows directly (VAR's raw
        accumulation in msrq) and tools to inspect the codebook; row ``i`` is the code of index ``i`` before any
        normalisation the forward pass applies."""
        return None

    def codes_to_indices(self, z: Tensor) -> Indices:
        """Latents -> indices, without losses or statistics (inference path)."""
        with torch.no_grad():
            return self.forward(z).indices

    # -- views of the codes for aligners (see xqgan_core/alignment.py) ---------------------------------------------
    @classmethod
    def config_code_views(cls, config: Any) -> CodeViews | None:
        """The views ``code_view`` offers for a quantizer built from ``config`` (validate-time checks of
        ``[[aligners]]``); None when it cannot be told. Default: one branch, no per-scale views."""
        return CodeViews(branches=1, scales=(), dim=cls.config_dim(config))

    def code_views(self) -> CodeViews:
        """The views this quantizer offers aligners: branches, per-scale grids, channels per branch."""
        return CodeViews(branches=1, scales=(), dim=int(self.dim))

    def code_view(self, quant: QuantOut, latents: Tensor, branch: int = 0, scale: int | None = None) -> Tensor:
        """The ``(B, dim, h, w)`` codes of ``branch`` (negative: from the end) up to ``scale`` (None: all scales),
        with the straight-through gradient to ``latents`` (the encoder output ``quant`` was computed from).
        Default: the whole ``quant.z_q``; quantizers with branches or scales override it."""
        views = self.code_views()
        views.branch_index(branch)
        if scale is not None:
            views.scale_index(scale)
        return quant.z_q


@dataclass(frozen=True)
class CodeViews:
    """What ``Quantizer.code_view`` offers: ``branches`` product branches (channel groups of ``dim`` channels each,
    None when unknown) and ``scales``, the side of each scale's token grid (empty: only the full-resolution view)."""

    branches: int = 1
    scales: tuple[int, ...] = ()
    dim: int | None = None

    def branch_index(self, branch: int) -> int:
        """``branch`` as an index in ``range(branches)`` (negative counts from the end); ValueError if absent."""
        if not -self.branches <= branch < self.branches:
            raise ValueError(f"branch {branch} does not exist: the quantizer has {self.branches} branch(es) "
                             f"(0..{self.branches - 1}, or -1 for the last)")
        return branch % self.branches

    def scale_index(self, scale: int) -> int:
        """``scale`` as an index in ``range(len(scales))`` (negative counts from the end); ValueError if absent."""
        if not self.scales:
            raise ValueError("the quantizer has no scales: use the full-resolution codes (no `scale`)")
        if not -len(self.scales) <= scale < len(self.scales):
            raise ValueError(f"scale {scale} does not exist: the quantizer has {len(self.scales)} scales "
                             f"{list(self.scales)} (0..{len(self.scales) - 1}, or -1 for the last)")
        return scale % len(self.scales)


@runtime_checkable
class NextScaleInputs(Protocol):
    """What a multi-scale quantizer offers a next-scale (VAR) generator: the input of each scale, built from indices.

    A next-scale model predicts scale ``k``'s tokens from the codes of scales ``< k``, accumulated at full size
    (``f_hat``, the quantizer's own reconstruction path: code lookup, upsampling, refinement) and area-resampled to
    scale ``k``'s ``s_k x s_k`` grid. The quantizer builds both from native indices, so the generator never reaches
    into its codebook or refinement convs. Implemented by ``msrq`` and by ``pq`` over ``msrq`` branches (branches
    concatenated along the channels, so the P codes of a position are embedded together).

    Shapes: ``C = next_scale_dim()``, ``H`` = the last scale. Results are fp32 and follow the indices' device; call
    under ``torch.no_grad()`` (the quantizer is frozen).
    """

    def next_scale_dim(self) -> int:
        """``C``: channels of the inputs and of ``f_hat`` (``pq``: the sum over branches). ValueError when the
        quantizer cannot provide next-scale inputs (e.g. ``pq`` over single-scale branches)."""
        ...

    def next_scale_inputs(self, indices: Indices) -> list[Tensor]:
        """Teacher forcing: native indices of every scale (as ``QuantOut.indices``) -> one ``(B, C, s_k, s_k)``
        input per scale after the first (``k = 1..K-1``): the codes of scales ``< k`` accumulated, area-resampled
        to ``s_k``. Equal to running ``accumulate_scale`` over the scales."""
        ...

    def accumulate_scale(self, f_hat: Tensor | None, k: int, indices_k: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sampling: add scale ``k``'s codes to ``f_hat`` (``(B, C, H, H)``; None before scale 0) from that scale's
        native index map (``(B, s_k, s_k)``; ``pq``: ``(B, P, s_k, s_k)``). Returns the new ``f_hat`` and scale
        ``k + 1``'s input ``(B, C, s_{k+1}, s_{k+1})`` (None after the last scale). After the last scale ``f_hat``
        equals ``indices_to_codes`` of the same indices (the ``z_q`` an eval-mode forward returns)."""
        ...


class Discriminator(Component, FrozenParts):
    """``forward(images (B,3,H,W) in [-1,1]) -> logits`` (any shape; the engine averages).

    Only what is registered (parameters, buffers, submodules) trains and is saved in the run's
    ``discriminators.safetensors``. A pretrained network the discriminator uses but must not train or save (the
    frozen DINO trunk of ``dino``) is held with ``self.hold_frozen("trunk", module)`` (``xqgan_core.frozen``): it
    stays out of the optimizer, the checkpoint and gradient averaging, follows ``.to(...)``, and is rebuilt from the
    plugin's options (a weights file or hub name) whenever the discriminator is built.
    """

    kind = "discriminator"


class Aligner(Component, FrozenParts):
    """A frozen teacher (held with ``self.hold_frozen("teacher", module)``: not in the optimizer, the checkpoint or
    DDP) + a trainable head (the aligner's registered parameters: they join the tokenizer's optimizer and are saved
    as the run's ``aligner_heads``).

    ``attach(quantizer)`` is called once, after building and before the optimizer exists: the head is sized from
    the quantizer's ``code_views()`` there. ``forward(inputs: AlignmentInputs) -> {name: loss}`` returns named
    scalar losses, already multiplied by the aligner's own weight (the engine adds ``loss.alignment`` times their
    sum). ``xqgan_core.alignment.TeacherAligner`` implements the shared global / patch heads; docs/alignment.md.
    """

    kind = "aligner"

    @classmethod
    def config_view(cls, config: Any) -> tuple[int, int | None] | None:
        """The (branch, scale) of the codes an aligner built from ``config`` reads (checked against the quantizer
        when a run file is validated); None when it does not say."""
        return None

    def attach(self, quantizer: Quantizer) -> None:
        """Size the head for ``quantizer``'s codes; ValueError when it lacks the branch or scale asked for."""

    def forward(self, inputs: AlignmentInputs) -> dict[str, Tensor]:
        raise NotImplementedError


@dataclass
class GeneratorOut:
    """What ``Generator.forward`` returns (teacher forcing).

    logits: K tensors, one per column of the token layout: ``logits[k]`` is ``(B, L, V_k)`` with
        ``V_k = layout.vocab_sizes[k]``; step ``t`` predicts ``tokens[:, t, k]`` (so the model must only see the
        condition and steps ``< t``, plus the columns ``< k`` of step ``t`` where it predicts columns in order).
    losses: extra named scalar losses, already weighted by the generator's own coefficients (usually empty); the
        task adds their sum to ``sampling.token_cross_entropy(logits, tokens)``.
    """

    logits: list[Tensor]
    losses: dict[str, Tensor] = field(default_factory=dict)


class Generator(Component, FrozenParts):
    """An autoregressive model over a frozen tokenizer's token sequences (``(B, L, K)`` int64, see ``TokenLayout``).

    Lifecycle: ``Cls(config)`` builds nothing sized by the tokens; ``bind(layout, quantizer, num_classes)`` is
    called exactly once before the optimizer exists (by ``GeneratorTask`` when training, by
    ``xqgan_core.generator_run.load_generator`` when sampling) and builds the embeddings and heads. Only registered
    parameters and buffers train and are saved (the run's ``generator.safetensors`` / ``generator_ema.safetensors``);
    a tokenizer part the generator keeps (VAR keeps the quantizer for next-scale inputs) is held with
    ``self.hold_frozen("quantizer", quantizer)`` so it is neither trained nor saved.

    Conditioning: ``condition`` is ``(B,)`` int64 class ids in ``[0, num_classes)``; id ``num_classes`` is the
    "null" class (label dropout during training, the unconditional branch of classifier-free guidance).
    ``num_classes = 0`` means unconditional: ``condition`` is None (or all null).
    """

    kind = "generator"

    def bind(self, layout: TokenLayout, quantizer: Quantizer | None, num_classes: int) -> None:
        """Size the model for ``layout`` (the tokenizer's ``Quantizer.token_layout`` at its latent grid) and
        ``num_classes`` classes (+1 null class). ``quantizer`` is the frozen tokenizer's quantizer (None when the
        tokens come without one, e.g. a test); keep it only with ``hold_frozen``. ValueError (naming the option)
        for a layout the generator cannot model."""
        raise NotImplementedError

    def forward(self, tokens: Tensor, condition: Tensor | None) -> GeneratorOut:
        """Teacher forcing: ``tokens`` ``(B, L, K)`` int64 in layout order, ``condition`` ``(B,)`` int64 or None.
        Returns logits for EVERY step and column. When ``self.training``, class labels are replaced by the null
        class with probability ``config.class_dropout`` (default 0.1); never in eval mode."""
        raise NotImplementedError

    def sample(
        self, n: int, condition: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` token sequences ``(n, L, K)`` int64 in layout order, decoded step by step with a key-value cache
        (``xqgan_core.sampling.KVCache``), tokens drawn with ``sampling.sample_logits``.

        condition: ``(n,)`` int64 class ids (None: the null class). cfg_scale: classifier-free guidance
        (``sampling.cfg_mix`` of the conditional and null-class logits; a generator may ramp it, e.g.
        ``sampling.cfg_ramp``); ``cfg_scale == 1`` runs no unconditional pass and equals the conditional model.
        ``top_k == 1`` is greedy and deterministic; the cached logits equal those of ``forward`` on the same tokens.
        Call under ``torch.no_grad()`` in eval mode (callers do)."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of matrices and tables that AdamW must not decay, beyond the biases
        and norm gains it never decays: position and level embeddings, learned attention scales (VAR's list).
        Default: none."""
        return set()


class Adapter(Component):
    """Full / frozen / LoRA fine-tuning: ``apply(module)`` changes what is trainable and returns the module."""

    kind = "adapter"

    def apply(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def merge(self, module: nn.Module) -> nn.Module:
        """Fold what ``apply`` added back into plain weights for inference (e.g. LoRA's low-rank updates), after
        the trained weights were loaded; returns the module. Default: unchanged."""
        return module


class Device(Component):
    """Where tensors live and how a step runs there: cpu / cuda / hpu."""

    kind = "device"
    name: ClassVar[str]

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    @property
    def torch_device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dist_backend(self) -> str:
        """torch.distributed backend for DDP on this device."""
        return "gloo"

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        """dtype for autocast given the run's ``train.precision`` (None = plain fp32)."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=dtype)

    def init_distributed(self) -> None:
        """Prepare the backend before ``torch.distributed.init_process_group`` (e.g. HPU imports hccl)."""

    def wrap_for_eval(self, module: nn.Module) -> nn.Module:
        """Optionally wrap a module used only for inference (e.g. HPU graphs); default: unchanged."""
        return module

    def step_end(self) -> None:
        """Called after each optimizer step (HPU lazy mode needs ``mark_step`` here)."""

    def synchronize(self) -> None:
        """Wait for queued work (for honest timings)."""

    def peak_memory_bytes(self) -> int | None:
        """Peak memory allocated since the last reset, or None if the backend cannot tell."""
        return None

    def reset_peak_memory(self) -> None:
        pass


class DataSource(Component):
    """Provides the training and held-out datasets: items ``{"image": (3,H,W) in [-1,1], "label": int, ...}``, or
    ``{"tokens": (L, K) int64, "label": int, ...}`` for token sources (``tokens``)."""

    kind = "data"

    def train_set(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def eval_set(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def problems(self) -> Sequence[str]:
        """Files found unreadable so far (path: reason), reported by the engine."""
        return ()

    def class_names(self) -> Sequence[str]:
        """The class of each label id (items' ``"label"`` indexes this), for class-conditional generators; empty
        when the items are unlabelled (a generator trained on them is unconditional)."""
        return ()


#: kind -> interface class; the catalog checks that a loaded class implements its kind's interface.
INTERFACES: dict[str, type] = {
    "encoder": Encoder,
    "decoder": Decoder,
    "quantizer": Quantizer,
    "discriminator": Discriminator,
    "aligner": Aligner,
    "generator": Generator,
    "adapter": Adapter,
    "device": Device,
    "data": DataSource,
}
assert set(INTERFACES) <= set(KINDS)


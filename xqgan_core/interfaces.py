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
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .catalog import KINDS
from .token_layout import TokenLayout

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
    Code outside the quantizer reads ``indices`` through ``Quantizer.token_layout`` (``to_sequence``).
    """

    z_q: Tensor
    indices: Indices
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

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


class Discriminator(Component, nn.Module):
    """``forward(images (B,3,H,W) in [-1,1]) -> logits`` (any shape; the engine averages)."""

    kind = "discriminator"


class Aligner(Component, nn.Module):
    """``forward(images, quant: QuantOut) -> scalar loss`` between frozen teacher features and quantized tokens."""

    kind = "aligner"


class Generator(Component, nn.Module):
    """An autoregressive model over token sequences."""

    kind = "generator"

    def sample(self, batch_size: int, condition: Tensor | None = None, **kwargs: Any) -> Indices:
        raise NotImplementedError


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
    """Provides the training and held-out image datasets (tensors (3,H,W) in [-1,1])."""

    kind = "data"

    def train_set(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def eval_set(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def problems(self) -> Sequence[str]:
        """Files found unreadable so far (path: reason), reported by the engine."""
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


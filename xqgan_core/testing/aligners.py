"""The aligner contract and a tiny random teacher for writing aligners without downloading a foundation model.

In a plugin's ``tests/test_contract.py``::

    from xqgan_core.testing import AlignerContract, TinyTeacher

    class TestMyAligner(AlignerContract):
        name = "myteacher"                       # the entry-point name
        options = {"mode": "global"}
        teacher = TinyTeacher                    # optional: replaces build_teacher (TeacherAligner subclasses)

Every ``test_*`` method then checks what the engine relies on: named finite scalar losses, a gradient reaching
the encoder's latents and the head, a teacher that is frozen (not a parameter, not in ``state_dict``, bit-identical
after an optimizer step) and moves with ``.to()``, a state_dict round trip, and samples truncated by quantizer
dropout having no influence on the loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from ..alignment import AlignmentInputs, Preprocessing, Teacher, TeacherAligner, TeacherFeatures
from ..config import ComponentSpec, validate_component
from ..frozen import all_frozen_parts, seeded
from .contracts import TINY_VQ, ComponentContract

__all__ = ["AlignerContract", "TinyTeacher"]


class TinyTeacher(Teacher):
    """A random (seeded: the same weights in every build) patch-embedding + MLP "foundation model": ``width``-dim
    features on a ``input_size / patch_size`` grid, CLS = mean-pooled features through a linear map."""

    def __init__(self, width: int = 12, input_size: int = 16, patch_size: int = 4) -> None:
        super().__init__()
        self.preprocessing = Preprocessing(input_size=input_size, patch_size=patch_size)
        self.cls_dim = self.patch_dim = width

        def build() -> None:
            self.embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
            self.mlp = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 1))
            self.pool = nn.Linear(width, width)

        seeded(build)

    def extract(self, pixels: Tensor) -> TeacherFeatures:
        patches = self.mlp(self.embed(pixels))
        return TeacherFeatures(cls=self.pool(patches.mean(dim=(2, 3))), patches=patches)


class AlignerContract(ComponentContract):
    """Contract for aligners; see the module doc."""

    kind = "aligner"
    batch_size: ClassVar[int] = 4
    image_size: ClassVar[int] = 16
    #: the quantizer the aligner is attached to (its branch / scale options must exist there)
    quantizer: ClassVar[dict[str, Any]] = {
        "use": "pq", "branches": 2,
        "branch": {"use": "msrq", "scales": [1, 2, 4], "phi_count": 0, "code": TINY_VQ},
    }
    #: a teacher factory replacing ``build_teacher`` of a ``TeacherAligner`` (e.g. ``TinyTeacher``); None: the real one
    teacher: ClassVar[Callable[[], Teacher] | None] = None

    # -- helpers --------------------------------------------------------------------------------------------
    def make(self) -> Any:
        spec = self.spec()
        cls = spec.cls
        factory = type(self).teacher
        if factory is not None:
            if not issubclass(cls, TeacherAligner):
                raise TypeError("AlignerContract.teacher replaces build_teacher: only for TeacherAligner subclasses")
            cls = type(cls.__name__, (cls,), {"build_teacher": classmethod(lambda c, config: factory())})
        torch.manual_seed(0)
        aligner = cls(spec.config)
        aligner.attach(self.make_quantizer())
        return aligner

    def make_quantizer(self) -> Any:
        torch.manual_seed(0)
        spec: ComponentSpec = validate_component("quantizer", copy.deepcopy(self.quantizer))
        return spec.build()

    def inputs(self, keep: Tensor | int | None = None, seed: int = 0) -> AlignmentInputs:
        """A batch of random images and random latents quantized by ``make_quantizer()`` (with ``keep``)."""
        quantizer = self.make_quantizer().eval()  # no data-dependent init or restarts: codes depend on latents only
        g = torch.Generator().manual_seed(seed)
        b, s = self.batch_size, self.image_size
        images = torch.rand(b, 3, s, s, generator=g) * 2 - 1
        side = max(quantizer.code_views().scales or (4,))
        latents = torch.randn(b, quantizer.dim, side, side, generator=g).requires_grad_(True)
        extra = {} if keep is None else {"keep": keep}
        quant = quantizer(latents, **extra)
        return AlignmentInputs(images, latents, quant, quantizer, step=0)

    @staticmethod
    def total(losses: dict[str, Tensor]) -> Tensor:
        return sum(losses.values(), torch.zeros(()))

    # -- tests ----------------------------------------------------------------------------------------------
    def test_returns_named_finite_scalar_losses(self) -> None:
        losses = self.make()(self.inputs())
        assert isinstance(losses, dict) and losses, "forward must return a non-empty {name: loss} dict"
        for name, value in losses.items():
            assert isinstance(name, str) and isinstance(value, Tensor), name
            assert value.shape == () and torch.isfinite(value), f"{name}: {value}"

    def test_gradient_reaches_latents_and_head(self) -> None:
        aligner = self.make()
        inputs = self.inputs()
        self.total(aligner(inputs)).backward()
        grad = inputs.latents.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        head = [p for p in aligner.parameters() if p.requires_grad]
        assert head, "an aligner needs a trainable head (its registered parameters)"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head)

    def test_teacher_is_frozen_and_outside_the_state(self) -> None:
        aligner = self.make()
        parts = all_frozen_parts(aligner)
        assert parts, "hold the teacher with self.hold_frozen(...) (xqgan_core.frozen)"
        # storage pointers: the aligner's parameters and state_dict must share no memory with a frozen part
        own = {p.data_ptr() for p in aligner.parameters()} | {t.data_ptr() for t in aligner.state_dict().values()}
        before = {}
        for name, part in parts.items():
            for key, t in part.state_dict().items():
                assert t.data_ptr() not in own, f"{name}.{key} is part of the aligner's parameters or state_dict"
                before[f"{name}.{key}"] = t.detach().clone()
            assert not part.training and not any(p.requires_grad for p in part.parameters())
        head_before = {k: v.detach().clone() for k, v in aligner.state_dict().items()}
        opt = torch.optim.SGD(aligner.parameters(), lr=1.0)
        aligner.train()
        self.total(aligner(self.inputs())).backward()
        opt.step()
        after = {f"{n}.{k}": t for n, part in parts.items() for k, t in part.state_dict().items()}
        for key, t in before.items():
            assert torch.equal(t, after[key]), f"teacher tensor {key} changed"
        assert any(not torch.equal(v, aligner.state_dict()[k]) for k, v in head_before.items()), "head did not move"

    def test_teacher_moves_with_the_aligner(self) -> None:
        aligner = self.make().to(torch.float64)
        for name, part in all_frozen_parts(aligner).items():
            assert all(p.dtype == torch.float64 for p in part.parameters()), name

    def test_state_dict_round_trip(self) -> None:
        a = self.make().eval()
        b = self.make().eval()
        with torch.no_grad():
            for p in b.parameters():
                p.add_(1.0)
        b.load_state_dict(a.state_dict())
        inputs = self.inputs()
        with torch.no_grad():
            torch.testing.assert_close(self.total(a(inputs)), self.total(b(inputs)))

    def test_truncated_samples_do_not_contribute(self) -> None:
        quantizer = self.make_quantizer()
        levels = int(getattr(quantizer, "num_levels", 1))
        if levels < 2:
            pytest.skip("the contract's quantizer has one level: no quantizer dropout")
        keep = torch.full((self.batch_size,), levels, dtype=torch.long)
        keep[0] = 1  # sample 0 is truncated to its first level
        aligner = self.make().eval()
        inputs = self.inputs(keep=keep)
        assert not bool(inputs.kept[0]) and bool(inputs.kept[1:].all())
        base = self.total(aligner(inputs))
        changed = self.inputs(keep=keep)
        changed.images[0] = -changed.images[0]  # another image and other codes for the truncated sample only
        with torch.no_grad():
            changed.latents[0].mul_(-1.5)
        changed.quant = changed.quantizer(changed.latents, keep=keep)
        torch.testing.assert_close(self.total(aligner(changed)), base)
        self.total(aligner(changed)).backward()
        assert changed.latents.grad is not None and changed.latents.grad[0].abs().sum() == 0

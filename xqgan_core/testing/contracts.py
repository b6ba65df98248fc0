"""Contract test classes. Subclass one per component, set ``name`` and ``options``; pytest does the rest."""

from __future__ import annotations

import contextlib
import copy
import io
import typing
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any, ClassVar, Literal

import attrs
import pytest
import torch

from ..catalog import catalog
from ..config import KIND, ComponentSpec, missing_help, validate_component
from ..errors import ConfigError
from ..interfaces import INTERFACES, QuantOut


#: a small vq table for nesting in tests
TINY_VQ: dict[str, Any] = {"use": "vq", "codebook_size": 16, "dim": 4}
# small settings for any installed quantizer, applied only where its Config has the option
_TINY_OPTIONS: dict[str, Any] = {"codebook_size": 16, "dim": 4, "bits": 4, "levels": 2, "branches": 2,
                                 "scales": [1, 2, 4], "phi_count": 0, "code": TINY_VQ, "branch": TINY_VQ}


def tiny_quantizer(name: str) -> dict[str, Any]:
    """A small, valid table for the installed quantizer ``name`` (for tests that sweep the catalog)."""
    fields = attrs.fields_dict(catalog().resolve("quantizer", name).load().Config)
    return {"use": name, **{k: copy.deepcopy(v) for k, v in _TINY_OPTIONS.items() if k in fields}}


def _wrong_values(tp: Any, is_component: bool) -> list[Any]:
    """Values of the wrong type for an option of type ``tp`` (the strictness the kit demands)."""
    if is_component:
        return [16]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ["__not_a_choice__"]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _wrong_values(args[0], False) if len(args) == 1 else []
    if tp is bool:
        return ["no", 1]
    if tp is int:
        return ["16", 3.7, True]
    if tp is float:
        return ["1e-4", True]
    if tp is str:
        return [16]
    if origin in (tuple, list):
        return ["not-an-array"]
    if attrs.has(tp):
        return [16]
    return []


class ComponentContract:
    """Discovery and configuration contract, shared by every kind."""

    kind: ClassVar[str]
    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    package: ClassVar[str | None] = None  # pin the distribution if the name is offered by several

    # -- helpers --------------------------------------------------------------------------------------------
    def table(self, **extra: Any) -> dict[str, Any]:
        t: dict[str, Any] = {"use": self.name, **copy.deepcopy(self.options), **extra}
        if self.package:
            t["package"] = self.package
        return t

    def spec(self) -> ComponentSpec:
        return validate_component(self.kind, self.table())

    def make(self) -> Any:
        torch.manual_seed(0)
        return self.spec().build()

    # -- tests ----------------------------------------------------------------------------------------------
    def test_entry_point_resolves_uniquely_and_imports(self) -> None:
        entry = catalog(refresh=True).resolve(self.kind, self.name, self.package)
        cls = entry.load()
        if self.kind in INTERFACES:  # hooks have no interface class
            assert issubclass(cls, INTERFACES[self.kind]), f"{cls} does not subclass {INTERFACES[self.kind].__name__}"
        assert isinstance(cls.plugin_api, int)

    def test_every_option_has_help(self) -> None:
        cls = self.spec().cls
        assert missing_help(cls.Config) == [], "options without help text"

    def test_documented_options_validate(self) -> None:
        spec = self.spec()
        assert spec.use == self.name
        # the resolved options must validate again unchanged (what checkpoints store is re-loadable)
        again = validate_component(self.kind, spec.to_dict())
        assert again.config == spec.config

    def test_unknown_option_is_rejected(self) -> None:
        with pytest.raises(ConfigError) as err:
            validate_component(self.kind, self.table(definitely_not_an_option=1))
        assert "definitely_not_an_option" in str(err.value)

    def test_wrong_types_are_rejected(self) -> None:
        cls = self.spec().cls
        if not attrs.fields(cls.Config):
            pytest.skip(f"{self.kind} '{self.name}' has no options")
        hints = typing.get_type_hints(cls.Config)
        checked = 0
        for f in attrs.fields(cls.Config):
            for bad in _wrong_values(hints[f.name], bool(f.metadata.get(KIND))):
                with pytest.raises(ConfigError) as err:
                    validate_component(self.kind, self.table(**{f.name: bad}))
                assert f"{self.kind}.{f.name}" in str(err.value), f"error for {f.name}={bad!r} does not name the key"
                checked += 1
        assert checked, "no option has a type the kit can probe with wrong values"

    def test_describe_lists_every_option(self) -> None:
        from ..cli import main

        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["describe", self.kind, self.name] + (["--package", self.package] if self.package else [])) == 0
        for f in attrs.fields(self.spec().cls.Config):
            assert f.name in out.getvalue()


class ModuleContract(ComponentContract):
    """Contract for nn.Module components: state_dict round trip and determinism in eval mode."""

    batch_size: ClassVar[int] = 2

    def example_input(self, module: Any) -> torch.Tensor:
        raise NotImplementedError

    def output_of(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """The tensor compared by the round-trip and determinism tests."""
        return module(x)

    def test_state_dict_round_trip(self) -> None:
        a = self.make().eval()
        torch.manual_seed(1234)
        b = self.spec().build().eval()
        b.load_state_dict(a.state_dict())
        x = self.example_input(a)
        with torch.no_grad():
            torch.testing.assert_close(self.output_of(a, x), self.output_of(b, x))

    def test_deterministic_in_eval_mode(self) -> None:
        m = self.make().eval()
        x = self.example_input(m)
        with torch.no_grad():
            first = self.output_of(m, x)
            torch.manual_seed(99)  # eval must not depend on the RNG
            second = self.output_of(m, x)
        torch.testing.assert_close(first, second)

    def test_gradient_reaches_input(self) -> None:
        m = self.make().train()
        x = self.example_input(m).clone().requires_grad_(True)
        out = self.output_of(m, x)
        (out.float() * torch.randn_like(out.float())).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


class QuantizerContract(ModuleContract):
    """Shapes, index range, finite losses, straight-through gradient, both directions between codes and indices."""

    kind = "quantizer"
    spatial: ClassVar[tuple[int, int]] = (4, 4)
    #: False for quantizers that normalise their input (the gradient then passes through the normalisation)
    straight_through_is_identity: ClassVar[bool] = True
    #: False for residual / multi-scale quantizers, whose z_q is a sum of codes rather than one code
    idempotent: ClassVar[bool] = True
    #: why a training forward of these options reads values back to the host (e.g. dead-code restarts need the
    #: count of dead codes); empty: it must not (the forward-reads-nothing-back check)
    host_reads_in_forward: ClassVar[str] = ""

    def example_input(self, module: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch_size, module.dim, *self.spatial, generator=g)

    def output_of(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return module(x).z_q

    def _flat_indices(self, indices: Any) -> torch.Tensor:
        if isinstance(indices, (list, tuple)):
            return torch.cat([i.flatten() for i in indices])
        return indices.flatten()

    def test_returns_quant_out_with_input_shape(self) -> None:
        m = self.make()
        x = self.example_input(m)
        out = m(x)
        assert isinstance(out, QuantOut)
        assert out.z_q.shape == x.shape
        assert out.z_q.dtype == x.dtype

    def test_indices_in_range(self) -> None:
        m = self.make()
        idx = self._flat_indices(m(self.example_input(m)).indices)
        assert idx.dtype in (torch.int64, torch.int32)
        assert idx.min() >= 0 and idx.max() < m.codebook_size

    def test_codebook_rows_match_the_codebook(self) -> None:
        m = self.make()
        rows = m.codebook_rows()
        if rows is None:  # fixed codes (lfq, bsq) or several tables (rq, pq): nothing stored as one table
            pytest.skip(f"{self.name}: codebook_rows() is None (fixed codes or several tables), nothing to compare")
        assert isinstance(rows, torch.Tensor) and tuple(rows.shape) == (m.codebook_size, m.dim)
        # the live table, not a copy: wrappers that add rows directly must train it
        assert any(rows is p or rows.data_ptr() == p.data_ptr() for p in m.parameters())

    def test_losses_are_finite_scalars(self) -> None:
        m = self.make().train()
        out = m(self.example_input(m).requires_grad_(True))  # as an encoder's output would
        for name, value in out.losses.items():
            assert value.ndim == 0, f"loss {name} is not a scalar"
            assert torch.isfinite(value), f"loss {name} is not finite"
            assert value.requires_grad, f"loss {name} carries no gradient"

    def test_straight_through_gradient_is_identity_on_z_q(self) -> None:
        # d(sum(z_q * w))/dz == w: the reconstruction gradient passes through the quantizer unchanged
        m = self.make().train()
        x = self.example_input(m).clone().requires_grad_(True)
        w = torch.randn_like(x)
        (m(x).z_q * w).sum().backward()
        assert x.grad is not None
        if self.straight_through_is_identity:
            torch.testing.assert_close(x.grad, w)
        else:
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    def test_indices_to_codes_reproduces_z_q(self) -> None:
        m = self.make().eval()
        with torch.no_grad():
            out = m(self.example_input(m))
            torch.testing.assert_close(m.indices_to_codes(out.indices), out.z_q, atol=1e-5, rtol=1e-4)

    def test_codes_to_indices_matches_forward(self) -> None:
        # the inference path picks exactly the training path's indices, and they decode to the same z_q
        m = self.make().eval()
        x = self.example_input(m)
        with torch.no_grad():
            out = m(x)
            again = m.codes_to_indices(x)
            assert torch.equal(self._flat_indices(again), self._flat_indices(out.indices))
            torch.testing.assert_close(m.indices_to_codes(again), out.z_q, atol=1e-5, rtol=1e-4)

    def test_requantizing_codes_is_idempotent(self) -> None:
        # quantize(z_q) == indices holds for single-level quantizers; residual and multi-scale ones set
        # idempotent = False (re-encoding a sum of codes may legitimately choose other indices)
        if not self.idempotent:
            pytest.skip(f"{self.name} declares idempotent = False (its z_q is a sum of codes)")
        m = self.make().eval()
        with torch.no_grad():
            out = m(self.example_input(m))
            again = m.codes_to_indices(out.z_q)
        assert torch.equal(self._flat_indices(again), self._flat_indices(out.indices))

    # -- token layout, statistics, kept levels ------------------------------------------------------------------
    def test_token_layout_round_trip(self) -> None:
        # to_sequence then from_sequence gives the indices back; every column's values fit its vocabulary; L and K
        # are what the layout says
        m = self.make().train()  # training indices too: dropped levels still fit the layout
        x = self.example_input(m)
        for mode in ("train", "eval"):
            m.train(mode == "train")
            with torch.no_grad():
                indices = m(x).indices
            layout = m.token_layout(*self.spatial)
            seq = layout.to_sequence(indices)
            assert seq.dtype == torch.int64
            assert tuple(seq.shape) == (self.batch_size, layout.length, layout.tokens_per_step)
            assert seq.shape[1] * seq.shape[2] == self._flat_indices(indices).numel() // self.batch_size
            assert len(layout.vocab_sizes) == len(layout.codebooks) == layout.tokens_per_step
            vocab = torch.tensor(layout.vocab_sizes)
            assert bool((seq >= 0).all()) and bool((seq < vocab).all()), f"{mode}: a token exceeds its vocabulary"
            back = layout.from_sequence(seq)
            assert torch.equal(self._flat_indices(back), self._flat_indices(indices))
            if isinstance(indices, torch.Tensor):
                assert back.shape == indices.shape
            else:
                assert [tuple(b.shape) for b in back] == [tuple(i.shape) for i in indices]
        with torch.no_grad():  # decoding from the sequence is decoding the indices
            out = m.eval()(x)
            layout = m.token_layout(*self.spatial)
            again = m.indices_to_codes(layout.from_sequence(layout.to_sequence(out.indices)))
        torch.testing.assert_close(again, out.z_q, atol=1e-5, rtol=1e-4)

    def test_stats_are_detached_scalar_tensors(self) -> None:
        # the trainer reads every stat in the step's one host sync: a Python float would have synced already
        m = self.make().train()
        out = m(self.example_input(m).requires_grad_(True))
        if not out.stats:
            pytest.skip(f"{self.name} reports no stats")
        for name, value in out.stats.items():
            assert isinstance(value, torch.Tensor), f"stat {name} is a {type(value).__name__}, not a tensor"
            assert value.ndim == 0 and not value.requires_grad, f"stat {name} is not a detached 0-d tensor"
            assert torch.isfinite(value), f"stat {name} is not finite"

    def test_training_forward_reads_nothing_back_from_the_device(self) -> None:
        # Tensor.item() / float() / int() / bool() in a forward wait for the device (a host sync per call)
        if self.host_reads_in_forward:
            pytest.skip(f"{self.name} reads values back by design here: {self.host_reads_in_forward}")
        m = self.make().train()
        x = self.example_input(m).requires_grad_(True)
        for _ in range(2):  # the first forward may set things up
            with _refusing_host_reads():
                out = m(x)
            out.loss.backward()

    def test_keep_every_level_equals_the_default_in_eval(self) -> None:
        m = self.make().eval()
        if m.num_levels == 1:
            pytest.skip(f"{self.name} has one level: there is no keep argument")
        x = self.example_input(m)
        with torch.no_grad():
            full = m(x)
            every = m(x, keep=m.num_levels)
            per_sample = m(x, keep=torch.full((self.batch_size,), m.num_levels))
            first = m(x, keep=1)
        torch.testing.assert_close(every.z_q, full.z_q)
        torch.testing.assert_close(per_sample.z_q, full.z_q)
        assert torch.equal(self._flat_indices(every.indices), self._flat_indices(full.indices))
        # keeping one level keeps its indices and reports 0 for the others
        layout = m.token_layout(*self.spatial)
        first_seq, full_seq = layout.to_sequence(first.indices), layout.to_sequence(full.indices)
        assert bool(((first_seq == full_seq) | (first_seq == 0)).all())
        with pytest.raises(ValueError, match="keep"):
            m(x, keep=torch.ones(self.batch_size + 1, dtype=torch.long))


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _refusing_host_reads() -> Iterator[None]:
    """Make every Tensor method that copies a value to Python raise, for the duration of the block."""
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def refuse(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"Tensor.{name}() in a quantizer forward: a host sync on accelerators")

        return read

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


class EncoderContract(ModuleContract):
    kind = "encoder"
    image_size: ClassVar[int] = 32

    def example_input(self, module: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand(self.batch_size, 3, self.image_size, self.image_size, generator=g) * 2 - 1

    def test_output_shape(self) -> None:
        m = self.make()
        z = m(self.example_input(m))
        h, w = m.latent_grid(self.image_size, self.image_size)
        assert z.shape == (self.batch_size, m.out_dim, h, w)


class DecoderContract(ModuleContract):
    kind = "decoder"
    latent_size: ClassVar[int] = 4

    def example_input(self, module: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch_size, module.in_dim, self.latent_size, self.latent_size, generator=g)

    def test_output_is_an_image(self) -> None:
        m = self.make()
        y = m(self.example_input(m))
        assert y.ndim == 4 and y.shape[:2] == (self.batch_size, 3)
        assert y.shape[2] == y.shape[3] and y.shape[2] > self.latent_size

    def test_last_layer_is_a_trained_parameter(self) -> None:
        m = self.make()
        assert any(p is m.last_layer for p in m.parameters())


class FrozenPartsContract:
    """Mixed into the contracts of kinds that may hold frozen networks (``xqgan_core.frozen``): every frozen part
    stays out of ``parameters()`` and ``state_dict()``, stays in eval mode and never receives a gradient, while
    gradients still reach the input through it. Skipped, with the reason, for a component without frozen parts."""

    def test_frozen_parts_are_not_trained_or_saved(self) -> None:
        from ..frozen import all_frozen_parts

        m = self.make().train()  # type: ignore[attr-defined]
        parts = all_frozen_parts(m)
        if not parts:
            pytest.skip("no frozen parts (nothing held with hold_frozen)")
        own = {id(p) for p in m.parameters()}
        saved = {t.data_ptr() for t in m.state_dict().values()}
        for name, part in parts.items():
            params = list(part.parameters())
            assert not any(id(p) in own for p in params), f"frozen part {name} is in parameters() (an optimizer's)"
            assert not any(p.data_ptr() in saved for p in params), f"frozen part {name} is in state_dict()"
            assert not part.training, f"frozen part {name} left eval mode"
        x = self.example_input(m).clone().requires_grad_(True)  # type: ignore[attr-defined]
        out = self.output_of(m, x)  # type: ignore[attr-defined]
        (out.float() * torch.randn_like(out.float())).sum().backward()
        for name, part in parts.items():
            assert all(p.grad is None for p in part.parameters()), f"frozen part {name} received a gradient"


class DiscriminatorContract(FrozenPartsContract, ModuleContract):
    kind = "discriminator"
    image_size: ClassVar[int] = 32

    def example_input(self, module: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand(self.batch_size, 3, self.image_size, self.image_size, generator=g) * 2 - 1

    def test_logits_are_finite_per_sample(self) -> None:
        m = self.make()
        logits = m(self.example_input(m))
        assert logits.shape[0] == self.batch_size and torch.isfinite(logits).all()

"""Nested component fields hold validated specs even when a Config is made in Python, and quantizers report the
latent dim a config expects (``Quantizer.config_dim``) without being built."""

from __future__ import annotations

import attrs
import pytest
import torch

from xqgan_core import ComponentSpec, ConfigError, build, catalog, component, config
from xqgan_core.config import validate_component

WRAPPERS = {"rq": "code", "msrq": "code", "pq": "branch"}


def _cls(name: str) -> type:
    return catalog().resolve("quantizer", name).load()


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_a_wrapper_builds_from_its_python_default_config(name: str) -> None:
    # before: AttributeError: 'dict' object has no attribute 'build' (msrq); rq and pq each worked around it
    cls = _cls(name)
    cfg = cls.Config()
    nested = getattr(cfg, WRAPPERS[name])
    assert isinstance(nested, ComponentSpec) and nested.use == "vq"
    assert cfg == validate_component("quantizer", {"use": name}).config  # the same as a run file's default
    q = cls(cfg).eval()
    side = q.scales[-1] if name == "msrq" else 4
    out = q(torch.randn(1, q.dim, side, side))
    assert out.z_q.shape == (1, q.dim, side, side)


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_a_nested_table_given_in_python_is_validated(name: str) -> None:
    cls = _cls(name)
    field = WRAPPERS[name]
    cfg = cls.Config(**{field: {"use": "vq", "dim": 6, "codebook_size": 32}})
    assert getattr(cfg, field).config.dim == 6
    with pytest.raises(ConfigError, match="codebook_size"):
        cls.Config(**{field: {"use": "vq", "codebook_size": -1}})
    with pytest.raises(ConfigError, match="no quantizer named"):
        cls.Config(**{field: "definitely-not-installed"})


def test_component_fields_convert_tables_and_arrays() -> None:
    @config
    class Holder:
        one: ComponentSpec | None = component("quantizer", default=None, help="a quantizer")
        many: tuple[ComponentSpec, ...] = component("quantizer", many=True, help="quantizers")

    assert Holder().one is None and Holder().many == ()
    held = Holder(one="vq", many=[{"use": "vq", "dim": 3}])
    assert held.one.use == "vq" and held.many[0].config.dim == 3
    spec = validate_component("quantizer", {"use": "vq"})
    assert Holder(one=spec).one is spec  # validated specs are passed through
    with pytest.raises(ConfigError, match="array"):
        Holder(many={"use": "vq"})
    assert attrs.fields(Holder).one.default is None


@pytest.mark.parametrize(
    ("table", "dim"),
    [
        ({"use": "vq", "dim": 12}, 12),
        ({"use": "lfq", "bits": 10}, 10),
        ({"use": "bsq", "bits": 9}, 9),
        ({"use": "rq", "code": {"use": "vq", "dim": 5}}, 5),
        ({"use": "msrq", "code": {"use": "lfq", "bits": 7}}, 7),
        ({"use": "pq", "branches": 3, "branch": {"use": "vq", "dim": 4}}, 12),
        ({"use": "pq", "branches": 2, "branch": {"use": "rq", "code": {"use": "bsq", "bits": 6}}}, 12),
    ],
)
def test_config_dim_is_the_built_quantizers_dim(table: dict, dim: int) -> None:
    spec = validate_component("quantizer", table)
    assert spec.cls.config_dim(spec.config) == dim
    scales = {"scales": [1, 2], "phi_count": 0} if table["use"] == "msrq" else {}
    assert build("quantizer", {**table, **scales}).dim == dim

"""HPU device on a machine without Gaudi software: real absence, and a fake ``habana_frameworks`` package."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import xqgan_plugin_hpu.device as device_module
from xqgan_core import ConfigError, build
from xqgan_core.devices import auto_device
from xqgan_core.testing import ComponentContract
from xqgan_plugin_hpu.device import HPUDevice

HCCL = "habana_frameworks.torch.distributed.hccl"


class TestHPUContract(ComponentContract):
    kind = "device"
    name = "hpu"


class FakeHabana:
    """Counts what the device asked of the (fake) Gaudi software."""

    def __init__(self) -> None:
        self.mark_steps = 0
        self.wrapped: list[nn.Module] = []
        self.hccl_imports = 0


@pytest.fixture
def fake_habana(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHabana]:
    """A stand-in for the Gaudi software: the modules the device imports, and a ``torch.hpu`` namespace."""
    fake = FakeHabana()
    root = types.ModuleType("habana_frameworks")
    ht = types.ModuleType("habana_frameworks.torch")
    core = types.ModuleType("habana_frameworks.torch.core")
    hpu = types.ModuleType("habana_frameworks.torch.hpu")
    dist = types.ModuleType("habana_frameworks.torch.distributed")

    def mark_step() -> None:
        fake.mark_steps += 1

    def wrap_in_hpu_graph(module: nn.Module) -> nn.Module:
        fake.wrapped.append(module)
        return module

    core.mark_step = mark_step  # type: ignore[attr-defined]
    hpu.wrap_in_hpu_graph = wrap_in_hpu_graph  # type: ignore[attr-defined]
    # hccl is a real submodule on disk, so that the test sees whether (and when) it is imported
    dist.__path__ = [str(tmp_path)]  # type: ignore[attr-defined]
    (tmp_path / "hccl.py").write_text("import sys\nsys.modules['habana_frameworks']._fake.hccl_imports += 1\n")
    root._fake = fake  # type: ignore[attr-defined]
    root.torch = ht  # type: ignore[attr-defined]
    ht.core, ht.hpu, ht.distributed = core, hpu, dist  # type: ignore[attr-defined]
    for mod in (root, ht, core, hpu, dist):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(
        torch,
        "hpu",
        types.SimpleNamespace(is_available=lambda: True, max_memory_allocated=lambda: 123_456_789),
        raising=False,
    )
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    try:
        yield fake
    finally:
        sys.modules.pop(HCCL, None)


def _device(**options: Any) -> HPUDevice:
    d = build("device", {"use": "hpu", **options})
    assert isinstance(d, HPUDevice)
    return d


# -- without Gaudi software ------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("habana_frameworks") is not None, reason="Gaudi software is installed")
def test_not_available_on_this_machine() -> None:
    assert HPUDevice.is_available() is False
    assert auto_device().name != "hpu"


def test_not_available_when_gaudi_software_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)  # makes `import habana_frameworks` fail
    assert HPUDevice.is_available() is False


def test_module_imports_without_gaudi_software(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
    spec = importlib.util.spec_from_file_location("fresh_hpu_device", device_module.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.HPUDevice.name == "hpu"


def test_broken_install_or_missing_torch_hpu_is_not_available(
    fake_habana: FakeHabana, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "hpu", types.SimpleNamespace(is_available=lambda: False))
    assert HPUDevice.is_available() is False
    monkeypatch.delattr(torch, "hpu")
    assert HPUDevice.is_available() is False

    def broken() -> bool:
        raise RuntimeError("driver not loaded")

    monkeypatch.setattr(torch, "hpu", types.SimpleNamespace(is_available=broken), raising=False)
    assert HPUDevice.is_available() is False


def test_memory_queries_without_torch_hpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "hpu", raising=False)
    d = _device()
    assert d.peak_memory_bytes() is None
    d.reset_peak_memory()  # no-op, must not raise
    d.synchronize()


# -- with a fake Gaudi software stack ----------------------------------------------------------------------------


def test_available_with_gaudi_software(fake_habana: FakeHabana) -> None:
    assert HPUDevice.is_available() is True
    # automatic selection prefers hpu over cuda and cpu
    assert isinstance(auto_device(), HPUDevice)


@pytest.mark.parametrize(("lazy_mode", "per_call"), [(True, 1), (False, 0)])
def test_step_end_marks_a_step_only_in_lazy_mode(fake_habana: FakeHabana, lazy_mode: bool, per_call: int) -> None:
    d = _device(lazy_mode=lazy_mode)
    for n in range(1, 4):
        d.step_end()
        assert fake_habana.mark_steps == n * per_call


def test_hccl_backend_registered_on_first_use(fake_habana: FakeHabana) -> None:
    d = _device()
    assert fake_habana.hccl_imports == 0  # building the device imports nothing distributed
    assert d.dist_backend == "hccl"
    assert fake_habana.hccl_imports == 1
    d.init_distributed()
    assert fake_habana.hccl_imports == 1  # a regular import: once per process


def test_peak_memory_from_torch_hpu(fake_habana: FakeHabana) -> None:
    assert _device().peak_memory_bytes() == 123_456_789


def test_graphs_wrap_eval_modules_only_when_enabled(fake_habana: FakeHabana) -> None:
    m = nn.Linear(2, 2)
    assert _device().wrap_for_eval(m) is m and fake_habana.wrapped == []
    assert _device(graphs=True).wrap_for_eval(m) is m and fake_habana.wrapped == [m]


# -- configuration and precision --------------------------------------------------------------------------------


def test_graphs_need_lazy_mode() -> None:
    with pytest.raises(ConfigError) as err:
        build("device", {"use": "hpu", "lazy_mode": False, "graphs": True})
    assert "graphs" in str(err.value) and "lazy" in str(err.value)


def test_autocast_dtypes() -> None:
    d = _device()
    assert d.autocast_dtype("auto") is torch.bfloat16
    assert d.autocast_dtype("bf16") is torch.bfloat16
    assert d.autocast_dtype("fp32") is None
    assert d.torch_device == torch.device("hpu")


def test_autocast_context_targets_hpu_in_bf16() -> None:
    d = _device()
    ctx = d.autocast(d.autocast_dtype("auto"))
    assert isinstance(ctx, torch.autocast)
    assert ctx.device == "hpu" and ctx.fast_dtype is torch.bfloat16
    assert not isinstance(d.autocast(None), torch.autocast)


@pytest.mark.parametrize(("env", "lazy_mode", "warns"), [("0", True, True), ("1", False, True), ("1", True, False),
                                                        (None, False, False)])
def test_warns_when_lazy_mode_disagrees_with_environment(
    monkeypatch: pytest.MonkeyPatch, env: str | None, lazy_mode: bool, warns: bool
) -> None:
    if env is None:
        monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    else:
        monkeypatch.setenv("PT_HPU_LAZY_MODE", env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _device(lazy_mode=lazy_mode)
    assert any("PT_HPU_LAZY_MODE" in str(w.message) for w in caught) is warns

"""LPIPS loading from local files only: configured file, torch hub cache, or off with one warning."""

from __future__ import annotations

import builtins
import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from xqgan_core import perceptual
from xqgan_core.errors import CheckpointError
from xqgan_core.perceptual import VGG16_FILE, Perceptual, hub_cache_path, load_lpips


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Any connection attempt fails the test; TORCH_HOME is an empty folder per test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(perceptual, "_missing_warned", False)
    return home


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised torchvision vgg16, whole-model state dict, saved like torchvision's file."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("vgg") / "random_vgg16.pth"
    torch.save(state, path)
    return path, {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


def _assert_trunk_equals(module: torch.nn.Module, features: dict[str, torch.Tensor]) -> None:
    trunk = module.net.state_dict()
    assert len(trunk) == 26  # 13 conv layers, weight + bias
    for key, value in trunk.items():
        torch.testing.assert_close(value, features[key.split(".", 1)[1]], rtol=0, atol=0)


def _assert_frozen(module: torch.nn.Module) -> None:
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())


def test_loads_configured_whole_model_file(vgg_file: tuple[Path, dict[str, torch.Tensor]], no_network: Path) -> None:
    path, features = vgg_file
    module = load_lpips(str(path), "cpu")
    assert module is not None
    _assert_trunk_equals(module, features)
    _assert_frozen(module)
    assert list(no_network.iterdir()) == []  # nothing was downloaded into the (empty) torch cache


@pytest.mark.parametrize("fmt", ["safetensors", "legacy_pth"])
def test_loads_features_only_file(fmt: str, vgg_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    _, features = vgg_file
    if fmt == "safetensors":
        path = tmp_path / "vgg_features.safetensors"
        save_file({k: v.contiguous() for k, v in features.items()}, str(path))
    else:  # torch's pre-1.6 serialization (not a zip file, so it cannot be memory-mapped)
        path = tmp_path / "vgg_features.pth"
        torch.save(features, path, _use_new_zipfile_serialization=False)
    module = load_lpips(path, torch.device("cpu"))
    assert module is not None
    _assert_trunk_equals(module, features)


def test_loads_from_torch_hub_cache(vgg_file: tuple[Path, dict[str, torch.Tensor]], no_network: Path) -> None:
    path, features = vgg_file
    cached = no_network / "hub" / "checkpoints" / VGG16_FILE
    assert hub_cache_path() == cached
    cached.parent.mkdir(parents=True)
    os.symlink(path, cached)  # the 500 MB file, without writing it twice
    for unset in (None, ""):  # the run file's default is an empty string
        module = load_lpips(unset, "cpu")
        assert module is not None
        _assert_trunk_equals(module, features)
        _assert_frozen(module)


def test_missing_everywhere_warns_once_and_returns_none(no_network: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips(None, "cpu") is None
        assert load_lpips("", "cpu") is None
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "lpips_weights" in message
    assert str(no_network / "hub" / "checkpoints" / VGG16_FILE) in message
    assert VGG16_FILE in message and "switched off" in message
    assert list(no_network.iterdir()) == []


def test_configured_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_lpips(tmp_path / "nope.pth", "cpu")


def test_lpips_distance(vgg_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    module = load_lpips(vgg_file[0], "cpu")
    assert module is not None
    metric = Perceptual(module)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    same = metric(x, x)
    assert same.shape == (2,)
    torch.testing.assert_close(same, torch.zeros(2), rtol=0, atol=1e-6)

    # The loss path: gradients reach the image, never the frozen network; training mode keeps LPIPS in eval.
    metric.train()
    assert not metric.lpips.training
    x_req = x.clone().requires_grad_(True)
    diff = metric(x_req, y)
    assert diff.shape == (2,) and (diff > 0).all()
    torch.testing.assert_close(metric(x_req, y), diff)  # deterministic: dropout stays off
    diff.sum().backward()
    assert x_req.grad is not None and x_req.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())


class _Payload:
    """Unpickling this creates a file: stands in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("fmt", ["raw_pickle", "torch_save"])
def test_malicious_pickle_is_refused(fmt: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        if fmt == "raw_pickle":
            pickle.dump({"features.0.weight": _Payload(marker)}, f)
        else:
            torch.save({"features.0.weight": _Payload(marker)}, f)

    # The payload is real: an unrestricted load would run it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    with pytest.raises(CheckpointError, match="evil.pth"):
        load_lpips(path, "cpu")
    assert not marker.exists()


def test_wrong_layout_names_file_and_keys(vgg_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    _, features = vgg_file
    wrong = {f"features.{k}": v for k, v in features.items() if k != "28.bias"}
    wrong["features.29.weight"] = torch.zeros(3)
    path = tmp_path / "not_vgg.pth"
    torch.save(wrong, path)
    with pytest.raises(CheckpointError, match="not_vgg.pth") as err:
        load_lpips(path, "cpu")
    assert "28.bias" in str(err.value) and "29.weight" in str(err.value)

    reshaped = dict(features)
    reshaped["0.weight"] = torch.zeros(32, 3, 3, 3)
    path = tmp_path / "narrow_vgg.pth"
    torch.save(reshaped, path)
    with pytest.raises(CheckpointError, match=r"narrow_vgg.pth.*0\.weight"):
        load_lpips(path, "cpu")


def test_import_is_cheap_and_offline(tmp_path: Path) -> None:
    home = tmp_path / "fresh_home"
    home.mkdir()
    code = (
        "import sys, xqgan_core.perceptual; "
        "assert 'lpips' not in sys.modules and 'torchvision' not in sys.modules, 'heavy import at module load'"
    )
    env = {**os.environ, "TORCH_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert list(home.iterdir()) == []


# -- missing file: download when online, one warning offline, an error when required --------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline switch set (the download path is exercised with file:// URLs, which open no socket)."""
    for name in perceptual.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _leftovers(home: Path) -> list[str]:
    folder = home / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_online_missing_file_is_downloaded_into_the_hub_cache(
    vgg_file: tuple[Path, dict[str, torch.Tensor]], no_network: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, features = vgg_file
    monkeypatch.setattr(perceptual, "VGG16_URL", path.as_uri())
    monkeypatch.setattr(perceptual, "VGG16_SHA256_PREFIX", _sha256(path)[:8])  # the random file's own hash
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a successful download is not a warning
        module = load_lpips(None, "cpu", required=True)
    assert module is not None
    _assert_trunk_equals(module, features)
    assert _leftovers(no_network) == [VGG16_FILE]  # moved into place, no partial file left
    assert hub_cache_path().read_bytes() == path.read_bytes()


def test_download_with_wrong_hash_is_refused(
    vgg_file: tuple[Path, dict[str, torch.Tensor]], no_network: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = vgg_file  # a random VGG16: its SHA-256 does not start with torchvision's 397923af
    assert not _sha256(path).startswith(perceptual.VGG16_SHA256_PREFIX)
    monkeypatch.setattr(perceptual, "VGG16_URL", path.as_uri())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips(None, "cpu") is None
    assert len(caught) == 1 and "invalid hash" in str(caught[0].message)
    assert _leftovers(no_network) == []  # neither the file nor a partial download stays
    with pytest.raises(CheckpointError, match="invalid hash"):
        load_lpips(None, "cpu", required=True)
    assert _leftovers(no_network) == []


def test_unreachable_network_warns_once_and_trains_without(no_network: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    attempts: list[Path] = []

    def unreachable(destination: Path, url: str = "", timeout_s: float = 0.0) -> None:
        attempts.append(destination)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(perceptual, "download_vgg16", unreachable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips(None, "cpu") is None
        assert load_lpips("", "cpu") is None
    assert attempts == [hub_cache_path(), hub_cache_path()]
    assert len(caught) == 1 and "Name or service not known" in str(caught[0].message)


@pytest.mark.parametrize("switch", perceptual.OFFLINE_VARIABLES)
def test_offline_switch_never_attempts_a_download(
    switch: str, no_network: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted although offline")

    monkeypatch.setattr(perceptual, "download_vgg16", forbidden)
    monkeypatch.setenv(switch, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips(None, "cpu") is None
    assert len(caught) == 1 and "offline" in str(caught[0].message)
    assert list(no_network.iterdir()) == []


def test_required_and_missing_says_where_the_file_goes(no_network: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_lpips(None, "cpu", required=True)
    message = str(err.value)
    assert "require_perceptual" in message and "lpips_weights" in message
    assert str(no_network / "hub" / "checkpoints" / VGG16_FILE) in message
    assert "offline" in message
    # a configured file that is missing stays an error whether required or not
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_lpips(no_network / "nope.pth", "cpu", required=True)


def test_require_perceptual_is_a_loss_option() -> None:
    from xqgan_core.runfile import LossSection

    assert LossSection().require_perceptual is False  # the default run keeps training without LPIPS

"""FID / IS / precision-recall through torch-fidelity with random Inception-v3 weights saved to a file and loaded
through the real loading code; rFID in tokenizer evaluation; the Inception weights' cache path and offline error.

Each Inception pass costs ~0.5 s per image on one CPU core (images are resized to 299 inside), so the folders
hold 4 images and features are computed once per module where a test does not exercise the folder pass itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch_fidelity")

from xqgan_core import Engine, Registry, build  # noqa: E402
from xqgan_core import checkpoint as ckpt  # noqa: E402
from xqgan_core import inception as inception_module  # noqa: E402
from xqgan_core.cli import main  # noqa: E402
from xqgan_core.errors import CheckpointError  # noqa: E402
from xqgan_core.evaluation import evaluate  # noqa: E402
from xqgan_core.fid import (  # noqa: E402
    FeatureSet,
    FidError,
    ReconstructionFid,
    ReferenceStats,
    folder_features,
    frechet_distance,
    generation_metrics,
    inception_score,
    load_reference,
    precision_recall,
)
from xqgan_core.inception import (  # noqa: E402
    INCEPTION_FILE,
    WEIGHTS_VARIABLE,
    Inception,
    inception_cache_path,
    load_inception,
    to_uint8,
)
from xqgan_core.model import TokenizerModel  # noqa: E402
from xqgan_core.testing.inception_weights import save_random_inception  # noqa: E402

N_IMAGES = 4  # precision/recall with k = 3 need at least 4 per side


def _smooth(rng: np.random.Generator, size: int = 32) -> Image.Image:
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def _folder(root: Path, make) -> Path:  # noqa: ANN001
    root.mkdir(parents=True)
    rng = np.random.default_rng(len(root.name))
    for i in range(N_IMAGES):
        make(rng).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_inception(tmp_path_factory.mktemp("inception") / INCEPTION_FILE, seed=0)


@pytest.fixture(scope="module")
def net(weights: Path) -> Inception:
    return load_inception(weights)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("fid") / "real", _smooth)


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    noise = lambda rng: Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")  # noqa: E731
    return _folder(tmp_path_factory.mktemp("fid") / "noise", noise)


@pytest.fixture(scope="module")
def real(real_dir: Path, net: Inception) -> FeatureSet:
    return folder_features(real_dir, net, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def noise(noise_dir: Path, net: Inception) -> FeatureSet:
    return folder_features(noise_dir, net, batch_size=N_IMAGES, progress=False)


# -- the metrics ------------------------------------------------------------------------------------------------------
def test_fid_of_a_folder_against_itself_is_zero_and_against_noise_large(real_dir: Path, net: Inception,
                                                                        real: FeatureSet, noise: FeatureSet) -> None:
    out = generation_metrics(real_dir, real_dir, inception=net, batch_size=4, isc=True, prc=True, progress=False)
    noise_fid = frechet_distance(ReferenceStats.from_features(noise, net), ReferenceStats.from_features(real, net))
    assert noise_fid > 1.0
    assert abs(out["fid"]) < 1e-6 * noise_fid
    assert out["precision"] == out["recall"] == 1.0  # every image lies in its own k-NN ball
    assert math.isfinite(out["isc_mean"]) and out["isc_mean"] >= 1.0 and math.isfinite(out["isc_std"])
    assert out["images"] == out["reference_images"] == N_IMAGES
    assert out["inception"]["official"] is False and out["inception"]["sha256"] == net.sha256


def test_precision_recall_and_inception_score_separate_noise(real: FeatureSet, noise: FeatureSet) -> None:
    far = precision_recall(noise.pool, real.pool.numpy())
    assert far["precision"] < 1.0 or far["recall"] < 1.0
    assert all(0.0 <= far[k] <= 1.0 for k in ("precision", "recall", "f_score"))
    mean, std = inception_score(noise.logits)
    assert math.isfinite(mean) and mean >= 1.0 and math.isfinite(std)
    with pytest.raises(FidError, match="more than 3 images"):
        precision_recall(noise.pool[:3], real.pool)


def test_reference_npz_round_trip(real_dir: Path, noise_dir: Path, net: Inception, real: FeatureSet,
                                  noise: FeatureSet, tmp_path: Path) -> None:
    from_folder = load_reference(real_dir, net, batch_size=N_IMAGES, progress=False)
    np.testing.assert_allclose(from_folder.pool, real.pool.numpy(), atol=1e-4)  # batching does not matter
    saved = from_folder.save(tmp_path / "ref.npz")
    with np.load(saved, allow_pickle=False) as data:
        assert {"mu", "sigma", "pool_features", "count", "inception_sha256"} == set(data.files)
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (2048, 2048)
    reloaded = load_reference(saved, net, need_features=True)
    generated = ReferenceStats.from_features(noise, net)
    assert frechet_distance(generated, reloaded) == pytest.approx(frechet_distance(generated, from_folder), rel=1e-9)
    assert precision_recall(noise.pool, reloaded.pool) == precision_recall(noise.pool, real.pool)
    # made with other weights: refused rather than compared
    np.savez(tmp_path / "other.npz", mu=reloaded.mu, sigma=reloaded.sigma, inception_sha256=np.array("0" * 64))
    with pytest.raises(FidError, match="other Inception weights"):
        load_reference(tmp_path / "other.npz", net)


def test_adm_reference_npz(real_dir: Path, net: Inception, real: FeatureSet, noise: FeatureSet, tmp_path: Path) -> None:
    """ADM's layout: mu/sigma (read), mu_s/sigma_s (ignored), arr_0 images NHWC (read only for precision/recall)."""
    stats = ReferenceStats.from_features(real, net)
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(real_dir.glob("*.png"))])
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=stats.mu, sigma=stats.sigma, mu_s=np.zeros(7),
             sigma_s=np.eye(7))
    ref = load_reference(tmp_path / "adm.npz", net, need_features=True, batch_size=4, progress=False)
    assert ref.inception_sha256 is None and ref.count == N_IMAGES
    np.testing.assert_allclose(ref.pool, real.pool.numpy(), atol=1e-4)
    generated = ReferenceStats.from_features(noise, net)
    assert frechet_distance(generated, ref) == pytest.approx(frechet_distance(generated, stats), rel=1e-9)
    np.savez(tmp_path / "stats-only.npz", mu=stats.mu, sigma=stats.sigma)
    with pytest.raises(FidError, match="precision/recall need per-image features"):
        load_reference(tmp_path / "stats-only.npz", net, need_features=True)
    np.savez(tmp_path / "wrong.npz", arr_0=images)
    with pytest.raises(FidError, match="'mu' and 'sigma'"):
        load_reference(tmp_path / "wrong.npz", net)


# -- where the weights come from --------------------------------------------------------------------------------------
def test_cache_path_is_torch_fidelitys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert inception_module.INCEPTION_URL == URL_INCEPTION_V3
    # torch.hub.load_state_dict_from_url caches <hub dir>/checkpoints/<basename of the URL>
    assert inception_cache_path() == Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    assert inception_cache_path() == tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_FILE


def test_offline_error_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(WEIGHTS_VARIABLE, raising=False)
    monkeypatch.setattr(inception_module, "download_checked", lambda *a, **k: pytest.fail("must not download"))
    expected = str(tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_FILE)
    with pytest.raises(CheckpointError, match="offline") as info:
        load_inception()
    assert expected in str(info.value) and WEIGHTS_VARIABLE in str(info.value)
    # the CLI says the same, with the runtime-failure exit code
    assert main(["fid", str(tmp_path), "--ref", str(tmp_path)]) == 1


def test_weights_from_env_download_and_refusals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weights: Path,
                                                net: Inception) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv(WEIGHTS_VARIABLE, str(weights))
    assert inception_module.resolve_inception_weights() == weights
    monkeypatch.setenv(WEIGHTS_VARIABLE, str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match=f"missing.pth: Inception weights file \\(from {WEIGHTS_VARIABLE}\\)"):
        inception_module.resolve_inception_weights()
    # online without a cached file: downloaded (hash-checked by download_checked) into the cache, then used
    monkeypatch.delenv(WEIGHTS_VARIABLE)
    for name in ("HF_HUB_OFFLINE", "XQGAN_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    fetched = []

    def fake_download(url: str, destination: Path, sha256_prefix: str, *a: object) -> None:
        fetched.append((url, sha256_prefix))
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(weights.read_bytes())

    monkeypatch.setattr(inception_module, "download_checked", fake_download)
    assert inception_module.resolve_inception_weights() == inception_cache_path()
    assert fetched == [(inception_module.INCEPTION_URL, "6726825d")]
    assert inception_module.resolve_inception_weights() == inception_cache_path() and len(fetched) == 1
    # pickled objects are refused, not executed; a state dict of another network is named as such
    torch.save({"conv.weight": torch.zeros(1), "extra": _NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_inception(tmp_path / "pickled.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not torch-fidelity's Inception-v3 layout"):
        load_inception(tmp_path / "other.pth")


class _NotATensor:
    pass


# -- rFID in tokenizer evaluation -------------------------------------------------------------------------------------
CNN = {"use": "cnn", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8,
       "level_attention": False, "mid_attention": False}  # fmt: skip


def test_rfid_in_evaluate(net: Inception) -> None:
    torch.manual_seed(0)
    quantizer = build("quantizer", {"use": "vq", "codebook_size": 16, "dim": 4})
    model = TokenizerModel(build("encoder", {**CNN, "out_dim": 4}), quantizer, build("decoder", {**CNN, "in_dim": 4}))
    images = [{"image": torch.rand(3, 16, 16) * 2 - 1} for _ in range(3)]
    metrics, _ = evaluate(model, images, build("device", "cpu"), batch_size=2, progress=False,
                          rfid=ReconstructionFid(net))
    x = torch.stack([i["image"] for i in images])
    with torch.no_grad():
        recon = model.eval()(x)[0].clamp(-1, 1)
    by_hand = [ReferenceStats.from_features(FeatureSet(*net.features(to_uint8(t))), net) for t in (recon, x)]
    assert metrics["rfid"] == pytest.approx(frechet_distance(*by_hand), rel=1e-6)
    assert "var_usage" in metrics and "utilization" in metrics


@pytest.mark.filterwarnings("ignore:LPIPS backbone weights not found")
def test_cli_fid_and_eval_rfid(tmp_path: Path, weights: Path, real_dir: Path, noise_dir: Path, capsys) -> None:  # noqa: ANN001
    ref = tmp_path / "ref.npz"
    assert main(["fid", "--ref", str(real_dir), "--save-ref", str(ref), "--inception-weights", str(weights),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    assert ref.is_file()
    out = tmp_path / "result.json"
    assert main(["fid", str(noise_dir), "--ref", str(ref), "--inception-weights", str(weights), "--isc", "--prc",
                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {"fid", "isc_mean", "isc_std", "precision", "recall", "f_score", "images"} <= set(result)
    assert result["fid"] > 1.0 and f"{result['fid']:.4f}" in printed and "not comparable" in printed
    # usage errors: exit 2, nothing computed
    for args in ([str(noise_dir), "--ref", str(tmp_path / "nowhere.npz")], ["--ref", str(ref)],
                 ["--ref", str(ref), "--save-ref", str(tmp_path / "again.npz")]):
        with pytest.raises(SystemExit) as exited:
            main(["fid", *args])
        assert exited.value.code == 2

    # rFID of a tokenizer run on a folder (in process)
    registry = Registry.from_dict({
        "run": {"name": "rfid", "out_dir": str(tmp_path / "run"), "seed": 0}, "device": "cpu",
        "data": {"use": "folder", "root": str(real_dir), "resolution": 16},
        "encoder": {**CNN, "out_dim": 4}, "quantizer": {"use": "vq", "codebook_size": 16, "dim": 4},
        "decoder": {**CNN, "in_dim": 4},
        "train": {"steps": 1, "batch_size": 2, "checkpoint_every": 1, "eval_every": 1, "warmup_steps": 0},
        "loss": {"perceptual": 0.0}, "eval": {"lpips": False},
    })  # fmt: skip
    Engine(registry).fit()
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--data", str(real_dir), "--max-images", "3", "--rfid", "--json",
                 "--inception-weights", str(weights)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 3.0 and math.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0
    assert 0 <= metrics["var_usage"] <= metrics["utilization"] <= 100


def test_the_sample_grid_is_not_a_sample(tmp_path: Path) -> None:
    from xqgan_core import fid

    sample_images = pytest.importorskip("xqgan_core.sample_images")
    assert sample_images.GRID in fid.SKIPPED_NAMES
    rng = np.random.default_rng(0)
    for name in ("class0000_000.png", "class0000_001.png", sample_images.GRID, ".hidden.png"):
        _smooth(rng).save(tmp_path / name)
    (tmp_path / "fid.json").write_text("{}")
    assert [p.name for p in fid.image_files(tmp_path)] == ["class0000_000.png", "class0000_001.png"]

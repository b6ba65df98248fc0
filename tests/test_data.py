"""Built-in data sources: folder scanning, broken-file handling, splits, colour modes, and the scikit-image samples."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xqgan_core.config import validate
from xqgan_core.errors import ConfigError, ImageReadError, NoReadableImageError
from xqgan_core.fallback_dataset import BadImageWarning, coin, random_position
from xqgan_core.images import array_to_rgb, as_rgb, load_rgb, render, square_box, to_tensor
from xqgan_core.sources.folder import FolderData
from xqgan_core.sources.sample import SampleData

RNG = np.random.default_rng(0)


def _photo(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray | None = None, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo() if arr is None else arr).save(path, **kw)
    return path


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _folder(cfg_root: Path, **options: object) -> FolderData:
    return FolderData(FolderData.Config(root=str(cfg_root), **options))


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Two class sub-folders (one nested deeper), five good images and three broken ones."""
    root = tmp_path / "imgs"
    _save(root / "cats" / "a.jpg")
    _save(root / "cats" / "b.PNG")
    _save(root / "cats" / "deep" / "c.png")
    _save(root / "dogs" / "d.jpeg")
    _save(root / "dogs" / "e.bmp")
    bad = {
        "truncated": root / "dogs" / "truncated.jpg",
        "empty": root / "cats" / "empty.png",
        "text": root / "dogs" / "notes.jpg",
    }
    data = _jpeg_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 2])  # valid JPEG header, body cut off
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    (root / "dogs" / "readme.txt").write_text("ignored: not an image extension")
    (root / "cats" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: skipped silently
    return root, bad


def test_construction_reports_each_broken_file_with_path_and_reason(messy: tuple[Path, dict[str, Path]]) -> None:
    root, bad = messy
    with pytest.warns(BadImageWarning) as caught:
        data = _folder(root, resolution=16, holdout=0.2)
    problems = data.problems()
    assert len(problems) == 3
    for path in bad.values():
        [line] = [p for p in problems if p.startswith(f"{path}: ")]
        assert len(line) > len(f"{path}: ")  # a reason follows the path
    by_path = {p.split(": ", 1)[0]: p.split(": ", 1)[1] for p in problems}
    assert "truncated" in by_path[str(bad["truncated"])]
    assert "empty" in by_path[str(bad["empty"])]
    assert "not a recognised image" in by_path[str(bad["text"])]
    assert {str(w.message).split(": ")[0] for w in caught} == {f"skipping {p}" for p in bad.values()}
    # Only the good images remain, and the two class folders are the labels.
    kept = {Path(p).name for p, _ in data.train_files + data.eval_files}
    assert kept == {"a.jpg", "b.PNG", "c.png", "d.jpeg", "e.bmp"}
    assert data.classes == ["cats", "dogs"]
    labels = dict((Path(p).name, y) for p, y in data.train_files + data.eval_files)
    assert labels == {"a.jpg": 0, "b.PNG": 0, "c.png": 0, "d.jpeg": 1, "e.bmp": 1}


def test_items_have_the_right_shape_range_and_label(messy: tuple[Path, dict[str, Path]]) -> None:
    root, _ = messy
    with pytest.warns(BadImageWarning):
        data = _folder(root, resolution=16, holdout=0.2)
    for ds in (data.train_set(), data.eval_set()):
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
            assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
            assert item["index"] == i and item["label"] in (0, 1)


def test_without_verify_broken_files_are_skipped_while_loading(messy: tuple[Path, dict[str, Path]]) -> None:
    root, bad = messy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is opened up front
        data = _folder(root, resolution=16, holdout=0.0, verify=False)
    assert data.problems() == []
    ds = data.train_set()
    assert len(ds) == 8
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    with pytest.warns(BadImageWarning):
        batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 8
    served = {Path(data.train_files[i][0]).name for b in batches for i in b["index"].tolist()}
    assert served == {"a.jpg", "b.PNG", "c.png", "d.jpeg", "e.bmp"}
    assert all(b["image"].shape[1:] == (3, 16, 16) for b in batches)
    assert sorted(p.split(": ")[0] for p in data.problems()) == sorted(str(p) for p in bad.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: a second epoch stays quiet
        list(loader)
    assert len(data.problems()) == 3


def test_problems_found_in_worker_processes_reach_the_main_process(messy: tuple[Path, dict[str, Path]]) -> None:
    root, bad = messy
    data = _folder(root, resolution=8, holdout=0.0, verify=False)
    loader = torch.utils.data.DataLoader(data.train_set(), batch_size=4, num_workers=1)
    assert sum(len(b["index"]) for b in loader) == 8
    assert sorted(p.split(": ")[0] for p in data.problems()) == sorted(str(p) for p in bad.values())


def test_nothing_readable_raises_instead_of_looping(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_text("nope")
    with pytest.warns(BadImageWarning), pytest.raises(ConfigError, match=r"data\.root: none of the 3 image files"):
        _folder(tmp_path)
    data = _folder(tmp_path, verify=False, holdout=0.0)
    with pytest.warns(BadImageWarning), pytest.raises(NoReadableImageError, match="none of the 3 images"):
        data.train_set()[1]


def test_empty_and_missing_roots_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError) as exc:
        _folder(tmp_path / "empty")
    assert "data.root" in str(exc.value) and str(tmp_path / "empty") in str(exc.value)
    assert "1 other file(s) ignored" in str(exc.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as exc:
        _folder(missing)
    assert "data.root" in str(exc.value) and str(missing) in str(exc.value) and "does not exist" in str(exc.value)


def test_holdout_split_is_disjoint_deterministic_and_seeded(tmp_path: Path) -> None:
    for i in range(40):
        _save(tmp_path / f"{i:02d}.png", _photo(8, 8))
    a, b = _folder(tmp_path, holdout=0.1), _folder(tmp_path, holdout=0.1)
    assert a.eval_files == b.eval_files and a.train_files == b.train_files
    assert len(a.eval_files) == 4 and len(a.train_files) == 36
    assert not {p for p, _ in a.eval_files} & {p for p, _ in a.train_files}
    other = _folder(tmp_path, holdout=0.1, split_seed=1)
    assert other.eval_files != a.eval_files
    tiny = _folder(tmp_path, holdout=0.001, max_images=2)  # rounding to 0 still holds one out
    assert len(tiny.eval_files) == 1 and len(tiny.train_files) == 1
    assert {p for p, _ in tiny.eval_files} <= {p for p, _ in a.train_files + a.eval_files}


def test_crop_and_flip_follow_the_options(tmp_path: Path) -> None:
    # Left half black, right half white, 16 x 32: a centre crop keeps both halves, flipping mirrors them.
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, 16:] = 255
    _save(tmp_path / "x.png", arr)
    _save(tmp_path / "y.png", arr)
    data = _folder(tmp_path, resolution=16, crop="center", flip=False, holdout=0.5)
    img = data.eval_set()[0]["image"]
    assert float(img[:, :, :6].max()) == -1.0 and float(img[:, :, 10:].min()) == 1.0
    torch.manual_seed(0)
    flips = _folder(tmp_path, resolution=16, crop="center", flip=True, holdout=0.5).train_set()
    lefts = {float(flips[0]["image"][0, 0, 0]) for _ in range(20)}
    assert lefts == {-1.0, 1.0}  # both orientations occur
    torch.manual_seed(0)
    crops = _folder(tmp_path, resolution=16, crop="random", flip=False, holdout=0.5).train_set()
    means = {round(float(crops[0]["image"].mean()), 3) for _ in range(10)}
    assert len(means) > 1  # the crop window moves across the edge


def test_grayscale_rgba_palette_cmyk_and_16bit_become_rgb(tmp_path: Path) -> None:
    gray = np.full((10, 12), 200, np.uint8)
    _save(tmp_path / "gray.png", gray)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :6, 3] = 255  # left: opaque red; right: fully transparent (composited on white)
    _save(tmp_path / "rgba.png", rgba)
    Image.fromarray(_photo(10, 12)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(_photo(10, 12)).convert("P").save(tmp_path / "palette.bmp")
    Image.fromarray(np.full((10, 12), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(gray).save(tmp_path / "gray.tif")

    for name in ("gray.png", "rgba.png", "cmyk.jpg", "palette.bmp", "deep.png", "gray.tif"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (12, 10), name
    assert np.asarray(load_rgb(tmp_path / "gray.png"))[0, 0].tolist() == [200, 200, 200]
    px = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert px[0, 0].tolist() == [255, 0, 0] and px[0, 11].tolist() == [255, 255, 255]
    assert np.asarray(load_rgb(tmp_path / "deep.png"))[0, 0].tolist() == [127, 127, 127]  # rescaled, not clipped
    t = to_tensor(load_rgb(tmp_path / "gray.png"))
    assert t.shape == (3, 10, 12) and torch.allclose(t, torch.full_like(t, 200 / 127.5 - 1))

    data = _folder(tmp_path, resolution=8, holdout=0.0)
    assert data.problems() == []
    assert all(data.train_set()[i]["image"].shape == (3, 8, 8) for i in range(6))


def test_load_rgb_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nope\.png: file not found"):
        load_rgb(tmp_path / "nope.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageReadError) as exc:
        load_rgb(tmp_path / "zero.png")
    assert exc.value.path == str(tmp_path / "zero.png") and "empty" in exc.value.reason


def test_extensions_and_max_images(tmp_path: Path) -> None:
    for i in range(6):
        _save(tmp_path / f"{i}.png", _photo(8, 8))
    _save(tmp_path / "skip.JPG")
    data = _folder(tmp_path, extensions=("png",), max_images=4, holdout=0.25)
    files = [p for p, _ in data.train_files + data.eval_files]
    assert len(files) == 4 and all(p.endswith(".png") for p in files)
    assert len(_folder(tmp_path, extensions=(".JPG",)).train_files) == 1


def test_folder_config_validates_through_the_catalog() -> None:
    cfg, problems = validate(FolderData.Config, {"root": "/x", "crop": "middle", "holdout": 2.0}, "data")
    assert cfg is None
    assert any(p.startswith("data.crop:") for p in problems) and any(p.startswith("data.holdout:") for p in problems)
    _, problems = validate(FolderData.Config, {}, "data")
    assert problems and problems[0].startswith("data.root: required option is missing")


def _render_reference(path: Path, resolution: int, size: int | None, seed: int, flip: bool) -> torch.Tensor:
    """The documented augmentation, drawn by hand from the key's generator: size (when on), position, flip."""
    rng = torch.Generator().manual_seed(seed)
    img = load_rgb(path)
    scale = 1.0 if size is None else resolution / int(torch.randint(size, size + 1, (), generator=rng))
    box = square_box(img.width, img.height, scale, random_position(rng))
    return render(img, box, resolution, flip=flip and coin(rng))


def test_resize_range_crops_a_random_scale_deterministically_per_key(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _photo(40, 64))
    _save(tmp_path / "b.png", _photo(40, 64))
    ds = _folder(tmp_path, resolution=16, resize_range=[20, 40], holdout=0.5).train_set()
    items = [ds[(0, seed)]["image"] for seed in range(12)]
    assert all(tuple(x.shape) == (3, 16, 16) for x in items)
    assert torch.equal(ds[(0, 3)]["image"], items[3])  # the key alone decides the item
    assert len({tuple(x.flatten()[:64].tolist()) for x in items}) > 6  # and different seeds give different views

    # a fixed size: shorter side 40 -> 32, then a 16-px crop = a box of half the shorter side of the source
    fixed = _folder(tmp_path, resolution=16, resize_range=[32, 32], holdout=0.5).train_set()
    path = Path(fixed.files[0][0])
    for seed in range(3):
        assert torch.equal(fixed[(0, seed)]["image"], _render_reference(path, 16, 32, seed, flip=True))


def test_resize_range_off_is_the_old_crop_and_evaluation_stays_a_centre_crop(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _photo(40, 64))
    _save(tmp_path / "b.png", _photo(40, 64))
    plain = _folder(tmp_path, resolution=16, holdout=0.5)
    assert plain.config.resize_range == ()
    path = Path(plain.train_files[0][0])
    for seed in range(3):  # same draws as before the option existed: position, then flip
        assert torch.equal(plain.train_set()[(0, seed)]["image"], _render_reference(path, 16, None, seed, flip=True))
    scaled = _folder(tmp_path, resolution=16, resize_range=[24, 48], holdout=0.5)
    assert torch.equal(scaled.eval_set()[(0, 5)]["image"], plain.eval_set()[(0, 5)]["image"])
    img = load_rgb(scaled.eval_files[0][0])
    assert torch.equal(scaled.eval_set()[0]["image"], render(img, square_box(img.width, img.height), 16))


def test_resize_range_is_checked() -> None:
    for bad in ([320], [320, 256], [0, 10], [256, 320, 384]):
        _, problems = validate(FolderData.Config, {"root": "/x", "resize_range": bad}, "data")
        assert problems and problems[0].startswith("data.resize_range: must be [] or [lo, hi]"), problems
    _, problems = validate(FolderData.Config, {"root": "/x", "resolution": 256, "resize_range": [128, 320]}, "data")
    assert problems == ["data: resize_range: the smallest size (128) must be >= resolution (256)"]
    cfg, problems = validate(FolderData.Config, {"root": "/x", "resize_range": [256, 320]}, "data")
    assert not problems and cfg.resize_range == (256, 320)
    with pytest.raises(ConfigError, match=r"data\.resize_range: the smallest size \(8\)"):
        FolderData(FolderData.Config(root="/x", resolution=16, resize_range=(8, 32)))


# ------------------------------------------------------------------------------------------------------------------
# sample


@pytest.fixture(scope="module")
def sample() -> SampleData:
    return SampleData(SampleData.Config(resolution=32, crops_per_image=4))


def test_sample_loads_offline_and_splits_by_source_image(sample: SampleData) -> None:
    assert sample.problems() == []
    assert set(sample.eval_names) == {"chelsea", "text", "retina"}
    assert len(sample.train_names) >= 10 and not set(sample.train_names) & set(sample.eval_names)
    train, ev = sample.train_set(), sample.eval_set()
    assert len(train) == 4 * len(sample.train_names) and len(ev) == 6 * 3
    held_labels = {sample.config.images.index(n) for n in sample.eval_names}
    assert {train[i]["label"] for i in range(len(train))}.isdisjoint(held_labels)
    assert {ev[i]["label"] for i in range(len(ev))} == held_labels
    for ds in (train, ev):
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
        assert batch["image"].shape == (len(ds), 3, 32, 32)
        assert float(batch["image"].min()) >= -1.0 and float(batch["image"].max()) <= 1.0
        assert float(batch["image"].std()) > 0.1  # real content, not a constant


def test_sample_is_deterministic_given_the_seed(sample: SampleData) -> None:
    ev = sample.eval_set()
    torch.manual_seed(0)
    view = ev[5]["image"]
    torch.manual_seed(1)  # evaluation views are fixed: the global RNG does not move them
    assert torch.equal(ev[5]["image"], view) and not torch.equal(ev[4]["image"], view)
    train = sample.train_set()
    torch.manual_seed(3)
    first = torch.stack([train[i]["image"] for i in range(8)])
    torch.manual_seed(3)
    again = torch.stack([train[i]["image"] for i in range(8)])
    torch.manual_seed(4)
    other = torch.stack([train[i]["image"] for i in range(8)])
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sample_grayscale_sources_become_three_channels(sample: SampleData) -> None:
    train = sample.train_set()
    i = sample.train_names.index("camera") * 4  # a grayscale photograph
    img = train[i]["image"]
    assert img.shape == (3, 32, 32) and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_sample_config_problems() -> None:
    cfg, problems = validate(SampleData.Config, {"images": ["astronaut", "nope"], "holdout_images": ["camera"]}, "data")
    assert cfg is None
    assert any("unknown image 'nope'" in p for p in problems)
    assert any("'camera' is not listed in images" in p for p in problems)
    _, problems = validate(SampleData.Config, {"images": ["astronaut"], "holdout_images": ["astronaut"]}, "data")
    assert any("none is left for training" in p for p in problems)


# ------------------------------------------------------------------------------------------------------------------
# item keys: (index, seed) makes an item depend on the key only


class _Keys(torch.utils.data.Sampler):
    """Yields fixed dataset keys, as the trainer's resumable sampler does."""

    def __init__(self, keys: list[tuple[int, int]]) -> None:
        self.keys = keys

    def __iter__(self):  # noqa: ANN204
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _random_views(ds: torch.utils.data.Dataset, keys: list[tuple[int, int]], workers: int = 0) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=_Keys(keys), num_workers=workers)
    return torch.cat([b["image"] for b in loader])


def test_seeded_keys_give_the_same_item_whatever_the_global_rng_and_in_workers(
    tmp_path: Path, sample: SampleData
) -> None:
    for i in range(3):
        _save(tmp_path / f"{i}.png", _photo(24, 48))
    folder = _folder(tmp_path, resolution=16, crop="random", flip=True, holdout=0.0).train_set()
    for ds in (folder, sample.train_set()):
        keys = [(i % len(ds), 1000 + i) for i in range(6)]
        torch.manual_seed(0)
        first = torch.stack([ds[k]["image"] for k in keys])
        torch.manual_seed(123)
        torch.rand(7)  # a different global RNG state
        assert torch.equal(torch.stack([ds[k]["image"] for k in keys]), first)
        assert torch.equal(_random_views(ds, keys, workers=1), first)  # a worker process with its own RNG
        assert ds[(keys[0][0], 7)]["index"] == keys[0][0]
        # the seed does choose the crop: one index under many seeds gives several different views
        views = {tuple(ds[(0, seed)]["image"].flatten()[:64].tolist()) for seed in range(8)}
        assert len(views) > 1


def test_plain_int_keys_still_draw_from_the_global_rng(sample: SampleData) -> None:
    ds = sample.train_set()
    torch.manual_seed(5)
    a = ds[3]["image"]
    torch.manual_seed(5)
    assert torch.equal(ds[3]["image"], a)
    with pytest.raises(TypeError, match=r"index or \(index, seed\)"):
        ds[(1, 2, 3)]


# ------------------------------------------------------------------------------------------------------------------
# image safety: pixel cap, 16-bit without float64 copies, NaN


def test_images_above_the_pixel_cap_are_reported_with_file_size_and_option(tmp_path: Path) -> None:
    _save(tmp_path / "small.png", _photo(10, 10))
    big = _save(tmp_path / "big.png", _photo(40, 50))
    with pytest.raises(ImageReadError) as exc:
        load_rgb(big, max_pixels=1000)
    assert str(exc.value).startswith(f"{big}: image too large: 50 x 40 = 2,000 pixels")
    assert "data.max_pixels = 1,000" in str(exc.value)
    with pytest.warns(BadImageWarning, match=r"big\.png: image too large: 50 x 40"):
        data = _folder(tmp_path, resolution=8, holdout=0.0, max_pixels=1000)
    assert [Path(p).name for p, _ in data.train_files] == ["small.png"]
    [problem] = data.problems()
    assert problem.startswith(f"{big}: ") and "data.max_pixels" in problem
    # without the up-front check the cap still applies when items load: reported and skipped
    unverified = _folder(tmp_path, resolution=8, holdout=0.0, max_pixels=1000, verify=False)
    with pytest.warns(BadImageWarning, match="image too large"):
        items = [unverified.train_set()[i]["index"] for i in range(2)]
    assert {Path(unverified.train_files[i][0]).name for i in items} == {"small.png"}
    assert load_rgb(big).size == (50, 40)  # the default cap is far above this


def _peak_bytes(fn) -> int:  # noqa: ANN001
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_16_bit_and_float_images_convert_without_float64_copies(tmp_path: Path) -> None:
    deep = np.random.default_rng(0).integers(0, 65536, (500, 400)).astype(np.uint16)
    deep[0, :3] = [0, 32767, 65535]
    Image.fromarray(deep).save(tmp_path / "deep.png")
    im = Image.open(tmp_path / "deep.png")
    im.load()
    assert im.mode.startswith("I;16")
    pixels = deep.size
    # a single float64 copy of the image is 8 bytes per pixel; the old conversion made several
    assert _peak_bytes(lambda: as_rgb(im)) < 8 * pixels
    assert np.asarray(as_rgb(im))[0, :3, 0].tolist() == [0, 127, 255]  # rescaled by 255/65535, rounded
    assert np.array_equal(np.asarray(as_rgb(im))[..., 0], np.rint(deep / 257.0).astype(np.uint8))
    assert _peak_bytes(lambda: array_to_rgb(deep)) < 8 * pixels
    flt = np.random.default_rng(1).random((500, 400)).astype(np.float32)
    f_im = Image.fromarray(flt, "F")
    assert _peak_bytes(lambda: as_rgb(f_im)) < 12 * pixels  # raw float32 data (4) + a float64 copy (8)
    exact = np.rint(flt.astype(np.float64) * 255)
    assert np.abs(np.asarray(as_rgb(f_im))[..., 0] - exact).max() <= 1  # float32 rounding may differ at .5


def test_float_images_with_nan_are_rejected_naming_the_path(tmp_path: Path) -> None:
    bad = np.full((12, 12), 0.5, np.float32)
    bad[3, 4] = np.nan
    Image.fromarray(bad, "F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full((12, 12), 0.5, np.float32), "F").save(tmp_path / "fine.tif")
    with pytest.raises(ImageReadError, match=r"nan\.tif: float image contains NaN"):
        load_rgb(tmp_path / "nan.tif")
    assert np.asarray(load_rgb(tmp_path / "fine.tif"))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="NaN"):
        array_to_rgb(bad)
    data = _folder(tmp_path, resolution=8, holdout=0.0)  # passes the cheap check, fails when decoded
    ds = data.train_set()
    with pytest.warns(BadImageWarning, match=r"nan\.tif: float image contains NaN"):
        served = {Path(data.train_files[ds[i]["index"]][0]).name for i in range(len(ds))}
    assert served == {"fine.tif"}

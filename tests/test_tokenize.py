"""Dataset tokenization (token shards, the `tokens` data source, `xqgan-run tokenize`) and `xqgan-run sample`."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import make_images
from PIL import Image
from safetensors import safe_open
from token_fixtures import write_tiny_tokenizer

from xqgan_core import checkpoint as ckpt
from xqgan_core.cli import main
from xqgan_core.generator_run import generator_meta, tokenizer_identity
from xqgan_core.registry import build
from xqgan_core.runfile import TokenizerRef
from xqgan_core.sample_images import GRID, parse_classes
from xqgan_core.testing.tiny_generator import TinyARGenerator
from xqgan_core.token_shards import TokenFolderError, TokenFolderMismatch, TokenShards, read_index
from xqgan_core.tokenize_dataset import (
    TokenizeError, finish_index, folder_units, sample_units, tokenize_units, webdataset_units,
)  # fmt: skip
from xqgan_core.tokenizer import Tokenizer
from xqgan_core.tomlwrite import dumps as toml_dumps


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_images(root, n=7, size=24)  # classes "a" (odd i) and "b" (even i), 24 px: centre-cropped and resized to 16
    return root


def _tokenize_folder(tok: Tokenizer, images: Path, out: Path, **kw) -> list[int]:
    inputs = folder_units(images, 16, kw.pop("shard_size", 3))
    report = tokenize_units(tok, inputs, out, progress=False, report=lambda _: None, **kw)
    finish_index(tok, inputs, out, flip=kw.get("flip", False), tokenizer_run="tiny")
    return report.written


def _all_tokens(folder: Path, name: str = "tokens") -> torch.Tensor:
    index = read_index(folder)
    parts = []
    for file, _ in index.shards:
        with safe_open(str(folder / file), framework="pt") as f:
            parts.append(f.get_tensor(name))
    return torch.cat(parts)


MULTI_SCALE = {"use": "msrq", "scales": [1, 2, 4, 8], "phi_count": 0,
               "code": {"use": "vq", "codebook_size": 16, "dim": 4}}  # fmt: skip
LARGE_VOCAB = {"use": "vq", "codebook_size": 40000, "dim": 4}  # more codes than int16 holds


@pytest.mark.parametrize(("quantizer", "length", "dtype"), [(None, 64, torch.int16), (MULTI_SCALE, 85, torch.int16),
                                                            (LARGE_VOCAB, 64, torch.int32)])  # fmt: skip
def test_tokenize_then_decode_reproduces_reconstruct(
    quantizer: dict | None, length: int, dtype: torch.dtype, tok: Tokenizer, images: Path, tmp_path: Path
) -> None:
    if quantizer is not None:
        tok = Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok", quantizer=quantizer), device="cpu")
    _tokenize_folder(tok, images, tmp_path / "tokens", flip=True, batch_size=16)
    tmp_path = tmp_path / "tokens"
    index = read_index(tmp_path)
    files = sorted(images.rglob("*.png"), key=lambda p: p.relative_to(images).as_posix())
    assert index.classes == ("a", "b") and index.count == 7 and [n for _, n in index.shards] == [3, 3, 1]
    assert index.flip and index.layout == tok.token_layout

    items = TokenShards(index, flip=False)
    tokens = torch.stack([items[i]["tokens"] for i in range(len(items))])
    labels = [items[i]["label"] for i in range(len(items))]
    assert tokens.dtype == torch.int64 and tokens.shape == (7, length, 1)
    assert labels == [("a", "b").index(p.parent.name) for p in files]

    originals = torch.stack([tok.preprocess(p) for p in files])
    torch.testing.assert_close(tok.decode(tokens, layout=index.layout), tok.reconstruct(originals), rtol=0, atol=1e-6)
    flipped = _all_tokens(tmp_path, "tokens_flipped").long()
    assert torch.equal(flipped, tok.encode(originals.flip(-1), as_sequence=True))
    assert not torch.equal(flipped, tokens)  # the mirrored images really were encoded on their own
    assert _all_tokens(tmp_path).dtype == dtype


def test_unreadable_images_are_reported_and_skipped(tok: Tokenizer, images: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "a" / "broken.png").write_bytes(b"not a png")
    seen: list[str] = []
    inputs = folder_units(data, 16, 4)
    tokenize_units(tok, inputs, tmp_path / "out", progress=False, report=seen.append)
    finish_index(tok, inputs, tmp_path / "out", flip=False, tokenizer_run="tiny")
    index = read_index(tmp_path / "out")
    assert index.count == 7 and len(seen) == 1 and "broken.png" in seen[0]
    assert len(index.record["skipped"]) == 1 and "broken.png" in index.record["skipped"][0]


def test_restart_skips_finished_shards_and_refuses_another_job(tok: Tokenizer, images: Path, tmp_path: Path) -> None:
    assert _tokenize_folder(tok, images, tmp_path) == [0, 1, 2]
    before = _all_tokens(tmp_path)
    (tmp_path / "index.json").unlink()  # an interrupted job: shard 1 never written, no index yet
    (tmp_path / "shard-00001.safetensors").unlink()
    inputs = folder_units(images, 16, 3)
    report = tokenize_units(tok, inputs, tmp_path, progress=False)
    assert report.written == [1] and report.reused == [0, 2]
    finish_index(tok, inputs, tmp_path, flip=False, tokenizer_run="tiny")
    assert torch.equal(_all_tokens(tmp_path), before)
    assert tokenize_units(tok, inputs, tmp_path, progress=False).written == []  # complete: nothing to do

    with pytest.raises(TokenizeError, match="another job"):  # same folder, other options
        tokenize_units(tok, inputs, tmp_path, flip=True, progress=False)


def test_ranks_write_their_own_shards_and_rank0_the_index(tok: Tokenizer, images: Path, tmp_path: Path) -> None:
    _tokenize_folder(tok, images, tmp_path / "single")
    inputs = folder_units(images, 16, 3)
    out = tmp_path / "split"
    assert tokenize_units(tok, inputs, out, rank=1, world=2, progress=False).written == [1]
    with pytest.raises(TokenFolderError, match="shard-00000"):  # rank 0 not done yet
        finish_index(tok, inputs, out, flip=False, tokenizer_run="tiny")
    assert tokenize_units(tok, inputs, out, rank=0, world=2, progress=False).written == [0, 2]
    finish_index(tok, inputs, out, flip=False, tokenizer_run="tiny")
    assert torch.equal(_all_tokens(out), _all_tokens(tmp_path / "single"))


def _tar(path: Path, samples: list[tuple[str, bytes | None, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, cls in samples:
            for ext, payload in (("png", image), ("cls", cls)):
                if payload is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards(tok: Tokenizer, images: Path, tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    pngs = [p.read_bytes() for p in sorted(images.rglob("*.png"))]
    _tar(tmp_path / "part-000.tar", [("s0", pngs[0], b"2"), ("s1", pngs[1], b"0"), ("nolabel", pngs[2], None)])
    _tar(tmp_path / "part-001.tar", [("s2", b"garbage", b"1"), ("s3", pngs[3], b"1")])
    inputs = webdataset_units(str(tmp_path / "part-{000..001}.tar"), 16)
    out = tmp_path / "tokens"
    tokenize_units(tok, inputs, out, progress=False, report=lambda _: None)
    finish_index(tok, inputs, out, flip=False, tokenizer_run="tiny")
    index = read_index(out)
    assert [n for _, n in index.shards] == [2, 1] and index.classes == ("0", "1", "2")
    assert [TokenShards(index)[i]["label"] for i in range(3)] == [2, 0, 1]
    assert sorted(s.split(": ")[0].rsplit(":", 1)[1] for s in index.record["skipped"]) == ["nolabel", "s2"]
    expected = tok.encode(torch.stack([tok.preprocess(Image.open(io.BytesIO(pngs[0])))]), as_sequence=True)
    assert torch.equal(TokenShards(index)[0]["tokens"], expected[0])
    with pytest.raises(TokenizeError, match="do not exist"):
        webdataset_units(str(tmp_path / "part-{000..002}.tar"), 16)


def test_built_in_samples_are_labelled_by_photograph(tok: Tokenizer, tmp_path: Path) -> None:
    inputs = sample_units(16, crops_per_image=2, seed=3, shard_size=10)
    again = sample_units(16, crops_per_image=2, seed=3, shard_size=10)
    assert inputs.classes and "astronaut" in inputs.classes and "chelsea" not in inputs.classes  # held out
    for out, source in ((tmp_path / "a", inputs), (tmp_path / "b", again)):
        tokenize_units(tok, source, out, progress=False)
        finish_index(tok, source, out, flip=False, tokenizer_run="tiny")
    index = read_index(tmp_path / "a")
    assert index.classes == tuple(inputs.classes) and index.count == 2 * len(inputs.classes)
    labels = [TokenShards(index)[i]["label"] for i in range(index.count)]
    assert labels == [i // 2 for i in range(index.count)]
    assert torch.equal(_all_tokens(tmp_path / "a"), _all_tokens(tmp_path / "b"))  # seeded crops


def test_tokens_source_splits_flips_and_checks_the_tokenizer(tok: Tokenizer, images: Path, tmp_path: Path) -> None:
    _tokenize_folder(tok, images, tmp_path / "tokens", flip=True)
    source = build("data", {"use": "tokens", "path": str(tmp_path / "tokens"), "holdout": 0.3})
    train, held = source.train_set(), source.eval_set()
    assert len(train) + len(held) == 7 and len(held) == 2
    assert not {train[i]["index"] for i in range(len(train))} & {held[i]["index"] for i in range(len(held))}
    assert source.class_names() == ("a", "b") and source.num_classes == 2 and source.layout == tok.token_layout

    plain = torch.stack([t["tokens"] for t in (TokenShards(source.index, flip=False)[i] for i in range(7))])
    flipped = _all_tokens(tmp_path / "tokens", "tokens_flipped").long()
    picks = [train[(0, seed)] for seed in range(16)]
    row = picks[0]["index"]
    assert all(torch.equal(p["tokens"], plain[row]) or torch.equal(p["tokens"], flipped[row]) for p in picks)
    assert {torch.equal(p["tokens"], flipped[row]) for p in picks} == {True, False}  # the seed's coin picks
    assert all(torch.equal(train[(0, s)]["tokens"], p["tokens"]) for s, p in enumerate(picks))  # deterministic
    assert all(torch.equal(held[i]["tokens"], plain[held[i]["index"]]) for i in range(len(held)))  # never flipped

    source.check_tokenizer(tok)
    other = Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "other", seed=1), device="cpu")
    with pytest.raises(TokenFolderMismatch, match="another tokenizer"):
        source.check_tokenizer(other)
    with pytest.raises(Exception, match="index.json is missing"):
        build("data", {"use": "tokens", "path": str(tmp_path)})


def _generator_run(tok: Tokenizer, tok_dir: Path, out: Path, classes: list[str]) -> Path:
    """A generator run folder of the contract's tiny generator (random weights), written as training writes it."""
    torch.manual_seed(0)
    spec = {"use": "kit-tiny-ar", "width": 16, "depth": 1, "heads": 2}
    gen = build("generator", spec)
    gen.bind(tok.token_layout, tok.model.quantizer, len(classes))
    ref = TokenizerRef(run=str(tok_dir))
    run_toml = toml_dumps({"run": {"name": "gen", "out_dir": str(out)}, "tokenizer": {"run": str(tok_dir)},
                           "generator": spec, "sample": {"top_k": 1}})  # fmt: skip
    meta = generator_meta(tok.token_layout, classes, tokenizer_identity(ref, tok))
    return ckpt.save_checkpoint(out, 1, {"generator": gen.state_dict()}, state={}, run_toml=run_toml, meta=meta)


def test_cli_tokenize_and_sample(tok: Tokenizer, tok_dir: Path, images: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "tokens"
    args = ["tokenize", str(tok_dir), "--data", str(images), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(args) == 0 and "7 token sequences, 2 classes" in capsys.readouterr().out
    assert main(args) == 0  # already complete
    with pytest.raises(SystemExit, match="2"):  # neither --data nor --built-in-samples: a usage error
        main(["tokenize", str(tok_dir), "--out", str(out)])
    assert main([*args[:3], str(tmp_path / "nothing"), *args[4:]]) == 2

    run = _generator_run(tok, tok_dir, tmp_path / "gen", list(read_index(out).classes))
    samples = tmp_path / "samples"
    cmd = ["sample", str(run), "--classes", "1,0", "--n", "3", "--out", str(samples), "--cfg", "2.0"]
    assert main(cmd) == 0
    names = sorted(p.name for p in samples.iterdir())
    assert names == sorted([GRID] + [f"class{c:04d}_{i:03d}.png" for c in (0, 1) for i in range(3)])
    grid = Image.open(samples / GRID)
    assert grid.height >= 2 * 16 and grid.width > 3 * 16  # 2 labelled rows of 3 samples
    first = [np.asarray(Image.open(samples / n)) for n in names]
    assert first[0].shape == (16, 16, 3)

    stamp = (samples / names[0]).stat().st_mtime_ns
    assert main(cmd) == 2 and "--force" in capsys.readouterr().err  # refuses to overwrite, writes nothing
    assert (samples / names[0]).stat().st_mtime_ns == stamp
    assert main([*cmd, "--force"]) == 0  # top_k = 1 from the run's [sample]: greedy, the same images again
    assert all(np.array_equal(a, np.asarray(Image.open(samples / n))) for a, n in zip(first, names))
    assert main(["sample", str(run), "--classes", "5", "--out", str(tmp_path / "x")]) == 2  # no class 5

    unconditional = _generator_run(tok, tok_dir, tmp_path / "gen-uncond", [])
    assert main(["sample", str(unconditional), "--n", "2", "--out", str(tmp_path / "u")]) == 0
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == [GRID, "unconditional_000.png", "unconditional_001.png"]
    assert main(["sample", str(unconditional), "--classes", "0", "--out", str(tmp_path / "u2")]) == 2
    assert json.loads((out / "index.json").read_text())["count"] == 7


def test_torchrun_ranks_split_the_shards(tok: Tokenizer, tok_dir: Path, images: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo): each writes its own shards, rank 0 the index after the barrier; the tokens equal a
    single process's."""
    _tokenize_folder(tok, images, tmp_path / "single")
    out = tmp_path / "ranks"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(Path(sys.executable).with_name("xqgan-run")),
           "tokenize", str(tok_dir), "--data", str(images), "--out", str(out), "--shard-size", "3", "--workers", "0",
           "--device", "cpu", "--no-progress"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("7 token sequences") == 1  # printed by rank 0 only
    assert torch.equal(_all_tokens(out), _all_tokens(tmp_path / "single"))


# -- sampling at scale (gFID: 50 per class) ----------------------------------------------------------------------
def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("class*.png"))}


def test_parse_classes_reads_lists_ranges_and_all() -> None:
    assert parse_classes("0,3,7") == [0, 3, 7] and parse_classes("0-3, 9") == [0, 1, 2, 3, 9]
    assert parse_classes("all", 4) == [0, 1, 2, 3]
    for bad in ("a", "3-1", "0-x"):
        with pytest.raises(ValueError, match="--classes"):
            parse_classes(bad)


def test_sample_streams_batches_resumes_and_splits_across_ranks(tok: Tokenizer, tok_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded per batch: resuming an interrupted job redraws exactly the missing batch, and two torchrun ranks
    write the same files as one process."""
    run = _generator_run(tok, tok_dir, tmp_path / "gen", ["a", "b", "c"])
    one = tmp_path / "one"
    base = ["sample", str(run), "--classes", "0-2", "--per-class", "3", "--batch-size", "2", "--cfg", "1.5", "--top-k", "0",
            "--no-progress"]  # fmt: skip
    assert main([*base, "--out", str(one), "--no-grid"]) == 0
    first = _pngs(one)
    assert len(first) == 9 and not (one / GRID).exists()
    assert len({a.tobytes() for a in first.values()}) > 1  # sampled, not greedy: the batches differ

    # an interrupted job: batch 1 (class0000_002, class0001_000) is missing
    for name in ("class0000_002.png", "class0001_000.png"):
        (one / name).unlink()
    untouched = (one / "class0002_002.png").stat().st_mtime_ns
    assert main([*base, "--out", str(one), "--no-grid"]) == 2 and "--resume" in capsys.readouterr().err
    assert main([*base, "--out", str(one), "--resume"]) == 0
    assert (one / "class0002_002.png").stat().st_mtime_ns == untouched  # complete batches are kept
    again = _pngs(one)
    assert all(np.array_equal(first[k], again[k]) for k in first)  # the redrawn batch is the same
    grid = Image.open(one / GRID)
    assert grid.height >= 3 * 16 and grid.width > 3 * 16

    ranks = tmp_path / "ranks"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(Path(sys.executable).with_name("xqgan-run")),
           *base, "--out", str(ranks), "--device", "cpu"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    split = _pngs(ranks)
    assert split.keys() == first.keys() and all(np.array_equal(first[k], split[k]) for k in first)
    assert (ranks / GRID).is_file()

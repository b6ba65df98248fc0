"""Tokenizer.from_pretrained with a Hugging Face repo id that holds an xqgan run folder (no ``filename``).

The hub cache is laid out as huggingface_hub writes it (blobs, snapshots/<commit>/ links, refs/main), holding the
files of the published run folder that ``snapshot_download`` selects with our allow patterns -- chosen here with
the library's own filter -- and the real ``snapshot_download`` resolves it offline.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from test_convert import _model, _preset

from xqgan_core import checkpoint as ckpt
from xqgan_core.errors import CheckpointError
from xqgan_core.pretrained import RUN_FOLDER_PATTERNS
from xqgan_core.registry import Registry
from xqgan_core.tokenizer import Tokenizer

REPO = "someone/tiny-run"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our cache and the hub's in tmp_path, the hub offline: no test writes to ~/.cache or touches the network."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("XQGAN_CACHE", str(tmp_path / "xqgan-cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _published_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run's out_dir as the engine leaves it: two checkpoints (tokenizer, EMA and discriminator weights), the run
    file, logs and grids. Returns it and the model of its newest checkpoint."""
    preset = _preset(tmp_path)
    model = _model(preset)
    out = tmp_path / "run"
    run_toml = Registry.from_toml(preset).to_toml()
    disc = {"discriminators": {"0.weight": torch.ones(3)}}
    older = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt.save_checkpoint(out, 2, {"model": older, "ema": older, **disc}, state={}, run_toml=run_toml, meta={})
    ckpt.save_checkpoint(out, 4, {"model": model.state_dict(), "ema": model.state_dict(), **disc}, state={},
                         run_toml=run_toml, meta={})
    (out / "run.toml").write_text(run_toml)
    for extra in ("metrics.jsonl", "summary.json", "grids/step-00000004.png", "tensorboard/events.out.tfevents.1"):
        (out / extra).parent.mkdir(parents=True, exist_ok=True)
        (out / extra).write_bytes(b"not needed to load the tokenizer")
    return out, model


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _place_in_hub_cache(cache: Path, repo: str, source: Path, files: list[str], commit: str = COMMIT) -> Path:
    """huggingface_hub's cache after downloading ``files`` of ``source`` at ``commit``: each file's content in
    blobs/<sha256>, linked from snapshots/<commit>/<path>, and refs/main naming the commit."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    for name in files:
        content = (source / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(a.encode(x), b.encode(x))
    torch.testing.assert_close(a.reconstruct(x), b.reconstruct(x), rtol=0, atol=0)


def test_the_patterns_fetch_the_checkpoints_and_run_file_but_no_logs(tmp_path: Path) -> None:
    out, _ = _published_run(tmp_path)
    fetched = list(filter_repo_objects(_files(out), allow_patterns=RUN_FOLDER_PATTERNS))
    steps = [f"checkpoints/step-0000000{s}/{f}" for s in (2, 4) for f in (
        "discriminators.safetensors", "ema.safetensors", "meta.json", "model.safetensors", "run.toml", "state.pt")]
    assert sorted(fetched) == sorted(["run.toml", *steps])


def test_a_repo_id_holding_a_run_folder_loads_offline_from_the_hub_cache(tmp_path: Path) -> None:
    out, model = _published_run(tmp_path)
    fetched = list(filter_repo_objects(_files(out), allow_patterns=RUN_FOLDER_PATTERNS))
    snapshot = _place_in_hub_cache(tmp_path / "hub", REPO, out, fetched)

    tok = Tokenizer.from_pretrained(REPO, device="cpu")
    assert tok.checkpoint == snapshot / "checkpoints" / "step-00000004"  # the newest checkpoint, its EMA weights
    assert tok.weights is not None and tok.weights.name == "ema.safetensors"
    _same_tokenizer(tok, Tokenizer.from_checkpoint(out, device="cpu"))
    with torch.no_grad():
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert torch.equal(tok.encode(x), model.encode(x))
    # the same through a commit hash and through an explicit cache folder
    assert Tokenizer.from_pretrained(REPO, revision=COMMIT, device="cpu").checkpoint == tok.checkpoint
    other = _place_in_hub_cache(tmp_path / "other-hub", REPO, out, fetched)
    assert Tokenizer.from_pretrained(REPO, hf_cache_dir=tmp_path / "other-hub", device="cpu").checkpoint == (
        other / "checkpoints" / "step-00000004")


def test_a_repo_holding_one_checkpoint_folder_at_its_root_loads(tmp_path: Path) -> None:
    out, _ = _published_run(tmp_path)
    published = tmp_path / "published"  # what one would upload: the content of one checkpoint folder
    shutil.copytree(ckpt.latest_checkpoint(out), published)
    _place_in_hub_cache(tmp_path / "hub", REPO, published, _files(published))
    tok = Tokenizer.from_pretrained(REPO, device="cpu", use_ema=False)
    assert tok.weights is not None and tok.weights.name == "model.safetensors"
    _same_tokenizer(tok, Tokenizer.from_checkpoint(out, device="cpu", use_ema=False))


def test_a_repo_id_not_in_the_cache_offline_names_the_repo_and_the_cache(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pretrained(REPO, device="cpu")
    message = str(err.value)
    assert f"run folder of the Hugging Face repo {REPO}" in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "hub" / "models--someone--tiny-run") in message and "filename=" in message
    with pytest.raises(CheckpointError, match=f"{REPO}@v2: it is not in the cache"):
        Tokenizer.from_pretrained(REPO, revision="v2", device="cpu")


def test_a_cached_repo_without_a_run_folder_says_so(tmp_path: Path) -> None:
    source = tmp_path / "weights-only"
    source.mkdir()
    (source / "vq_ds16_c2i.pt").write_bytes(b"a foreign checkpoint, fetched only with filename=")
    (source / "run.toml").write_text("[run]\n")  # a run file alone is no checkpoint
    _place_in_hub_cache(tmp_path / "hub", REPO, source, ["run.toml"])
    with pytest.raises(CheckpointError, match=f"repo {REPO} .*holds no xqgan run folder.*pass filename="):
        Tokenizer.from_pretrained(REPO, device="cpu")

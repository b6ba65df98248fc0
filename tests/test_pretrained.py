"""Tokenizer.from_pretrained: run folders, foreign checkpoint files converted into the xqgan cache, hub repo ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_convert import _llamagen_file, _model, _preset

from xqgan_core import checkpoint as ckpt
from xqgan_core.errors import CheckpointError
from xqgan_core.model import TokenizerModel
from xqgan_core.pretrained import cache_root
from xqgan_core.registry import Registry
from xqgan_core.tokenizer import Tokenizer

REPO = "someone/tiny-vq"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our cache and the hub's in tmp_path, the hub offline: no test writes to ~/.cache or touches the network."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("XQGAN_CACHE", str(tmp_path / "xqgan-cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 16, 16) * 2 - 1


def _assert_same_tokenizer(tok: Tokenizer, model: TokenizerModel) -> None:
    x = _images()
    with torch.no_grad():
        assert torch.equal(tok.encode(x), model.encode(x))
        assert torch.allclose(tok.reconstruct(x), model.decode(model.encode(x)).clamp(-1, 1), atol=1e-5)


def test_a_run_folder_loads_as_with_from_checkpoint(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    model = _model(preset)
    out = tmp_path / "run"
    folder = ckpt.save_checkpoint(out, 3, {"model": model.state_dict()}, state={},
                                  run_toml=Registry.from_toml(preset).to_toml(), meta={})
    for name in (out, str(out), folder, folder / "model.safetensors"):
        tok = Tokenizer.from_pretrained(name, device="cpu")
        assert tok.checkpoint == folder and tok.resolution == 16
        _assert_same_tokenizer(tok, model)
    assert not cache_root().exists()  # nothing converted


def test_a_llamagen_file_is_converted_once_into_the_cache_keyed_by_its_content(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    model = _model(preset)
    source = _llamagen_file(tmp_path, model)
    tok = Tokenizer.from_pretrained(source, preset=preset, device="cpu")
    _assert_same_tokenizer(tok, model)
    assert tok.checkpoint is not None and cache_root() in tok.checkpoint.parents
    converted = sorted((cache_root() / "converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("llamagen-")  # no temporary folder left behind

    marker = converted[0] / "kept"
    marker.touch()  # the second call reuses that folder instead of converting again
    assert Tokenizer.from_pretrained(str(source), preset=preset, device="cpu").checkpoint == tok.checkpoint
    assert marker.exists()

    other = _model(preset)  # different weights in a file of the same name: a new conversion, not the stale one
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)
    source.unlink()
    _llamagen_file(tmp_path, other)
    tok2 = Tokenizer.from_pretrained(source, preset=preset, device="cpu")
    assert tok2.checkpoint != tok.checkpoint
    _assert_same_tokenizer(tok2, other)


def test_a_foreign_file_that_does_not_convert_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    bad = tmp_path / "not-llamagen.pt"
    torch.save({"model": {"some.other.key": torch.zeros(2)}}, bad)
    with pytest.raises(CheckpointError, match="some.other.key"):
        Tokenizer.from_pretrained(bad, preset=_preset(tmp_path), device="cpu")
    assert not any((cache_root() / "converted").iterdir())
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'nope'.*llamagen"):
        Tokenizer.from_pretrained(bad, format="nope", device="cpu")


def test_a_repo_id_offline_and_not_cached_names_the_repo_file_and_cache(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pretrained(REPO, filename="vq_tiny.pt", device="cpu")
    message = str(err.value)
    assert REPO in message and "vq_tiny.pt" in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "hub" / "models--someone--tiny-vq") in message
    with pytest.raises(CheckpointError, match=f"cannot get the run folder of the Hugging Face repo {REPO}: .*"
                       "HF_HUB_OFFLINE"):  # without filename: a repo holding a run folder (test_pretrained_hub.py)
        Tokenizer.from_pretrained(REPO, device="cpu")
    with pytest.raises(CheckpointError, match="no such file or folder, and not a Hugging Face repo id"):
        Tokenizer.from_pretrained(str(tmp_path / "missing" / "run"), device="cpu")


def _place_in_hub_cache(cache: Path, repo: str, filename: str, content: bytes) -> None:
    """Lay out huggingface_hub's cache as a download would: refs/main -> a commit, snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    target = repo_dir / "snapshots" / commit / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(content)


def test_a_repo_id_whose_file_is_in_the_hub_cache_loads_offline(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    model = _model(preset)
    source = _llamagen_file(tmp_path, model)
    _place_in_hub_cache(tmp_path / "hub", REPO, "vq_tiny.pt", source.read_bytes())
    tok = Tokenizer.from_pretrained(REPO, filename="vq_tiny.pt", preset=preset, device="cpu")
    _assert_same_tokenizer(tok, model)
    # an explicit hub cache folder works the same way
    _place_in_hub_cache(tmp_path / "other-hub", REPO, "vq_tiny.pt", source.read_bytes())
    tok2 = Tokenizer.from_pretrained(REPO, filename="vq_tiny.pt", preset=preset, hf_cache_dir=tmp_path / "other-hub",
                                     device="cpu")
    assert tok2.checkpoint == tok.checkpoint  # same content, same conversion

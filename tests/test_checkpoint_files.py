"""Checkpoint files on disk: atomic rewrites, fsync, full disks, damaged files, the safe state check, pruning,
refusing to mix runs, run-name slugs and `reconstruct --out` never clobbering files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from xqgan_core import Registry
from xqgan_core import checkpoint as ckpt
from xqgan_core.errors import CheckpointError, ConfigError
from xqgan_core.model import TokenizerModel
from xqgan_core.tokenizer import OutputExistsError, Tokenizer, reconstruct_files


def save(out: Path, step: int, value: float = 0.0, *, keep: int = 5, run_id: str | None = "run-a",
         state: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """A small checkpoint whose weights hold ``value`` (to tell versions apart)."""
    return ckpt.save_checkpoint(
        out, step, tensors={"model": {"w": torch.full((4,), value)}, "heads": {"b": torch.zeros(2)}},
        state=state if state is not None else {"step": step, "rng": torch.zeros(3, dtype=torch.uint8)},
        run_toml="[run]\n", meta={}, keep=keep, run_id=run_id,
    )  # fmt: skip


def weight(folder: Path) -> float:
    return float(ckpt.load_tensors(folder / "model.safetensors")["w"][0])


def step_of(folder: Path | None) -> int | None:
    return None if folder is None else json.loads((folder / ckpt.META).read_text())["step"]


def names(out: Path) -> set[str]:
    return {p.name for p in ckpt.checkpoint_root(out).iterdir()}


# ----------------------------------------------------------------------------------------------------------------
# writing


def test_meta_lists_the_files_and_the_run(tmp_path: Path) -> None:
    folder = save(tmp_path, 3)
    meta = json.loads((folder / ckpt.META).read_text())
    assert meta["files"] == ["model", "heads"] and meta["run_id"] == "run-a" and meta["step"] == 3
    assert (folder / "heads.safetensors").is_file()
    (folder / "heads.safetensors").unlink()  # a listed file missing: not a complete checkpoint
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_rewriting_a_step_keeps_it_findable_at_every_instant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, 100, value=1.0)
    seen: list[tuple[str, int | None]] = []

    def watched(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            seen.append((f"{name} {Path(args[0]).name}", step_of(ckpt.latest_checkpoint(tmp_path))))
            return result

        return run

    for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, watched(name, getattr(module, name)))
    save(tmp_path, 100, value=2.0)
    monkeypatch.undo()
    assert any(op.startswith("rename") for op, _ in seen)
    assert all(found == 100 for _, found in seen), seen  # old or new step 100, never nothing
    assert weight(ckpt.latest_checkpoint(tmp_path)) == 2.0
    assert names(tmp_path) == {"latest", "step-00000100"}  # the old copy and the temporary folder are gone


def test_a_leftover_aside_copy_is_still_a_checkpoint(tmp_path: Path) -> None:
    """A crash between moving the old folder aside and moving the new one in leaves only the aside copy."""
    old = save(tmp_path, 7, value=1.0)
    old.rename(old.with_name(old.name + ckpt.ASIDE))
    assert weight(ckpt.latest_checkpoint(tmp_path)) == 1.0
    save(tmp_path, 7, value=2.0)
    assert weight(ckpt.latest_checkpoint(tmp_path)) == 2.0 and names(tmp_path) == {"latest", "step-00000007"}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps file descriptors to paths through /proc")
def test_files_and_folders_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, 1)
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_rename(src, dst, *args, **kwargs)
        events.append(f"rename {Path(src).name} {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    save(tmp_path, 1, value=2.0)  # rewrite: two renames
    root = str(ckpt.checkpoint_root(tmp_path).resolve())
    tmp_folder = next(e.split()[1] for e in events if e.startswith("rename .tmp-step-00000001"))
    synced = [e.removeprefix("fsync ") for e in events if e.startswith("fsync ")]
    assert f"{root}/{tmp_folder}" in synced  # the folder's own entries
    written = ("model.safetensors", "state.pt", "meta.json", "run.toml")
    assert {f"{root}/{tmp_folder}/{n}" for n in written} <= set(synced)
    renames = [i for i, e in enumerate(events) if e.startswith("rename")]
    assert len(renames) == 2
    for i in renames:  # each rename is made durable before the next step
        assert f"fsync {root}" in events[i + 1 :]
        assert events[i + 1] == f"fsync {root}"


def test_newest_complete_checkpoint_wins_over_a_stale_latest_pointer(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    (ckpt.checkpoint_root(tmp_path) / "latest").write_text("step-00000001\n")  # e.g. a crash before it was updated
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000002"


def _partial_save_file(tensors: dict, filename: str, metadata: Any = None) -> None:
    Path(filename).write_bytes(b"\0" * 16)  # a few bytes got out before the disk filled up
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "torch.save", "fsync"])
@pytest.mark.parametrize("step", [1, 2], ids=["rewrite", "new-step"])
def test_full_disk_is_a_clear_error_and_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, step: int
) -> None:
    save(tmp_path, 1, value=1.0)
    patch = {"safetensors": (ckpt, "save_file", _partial_save_file), "torch.save": (torch, "save", _no_space),
             "fsync": (os, "fsync", _no_space)}[where]  # fmt: skip
    monkeypatch.setattr(*patch)
    with pytest.raises(CheckpointError, match=r"disk is full \(ENOSPC") as exc:
        save(tmp_path, step, value=2.0)
    monkeypatch.undo()
    assert f"step-{step:08d}" in str(exc.value)
    assert names(tmp_path) == {"latest", "step-00000001"}  # no temporary folder left
    assert weight(ckpt.latest_checkpoint(tmp_path)) == 1.0 and ckpt.load_state(ckpt.latest_checkpoint(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# the state dict must be readable by the safe loader


@pytest.mark.parametrize(
    ("bad", "where", "kind"),
    [
        ({"hooks": {"counter": {"n": np.float32(1.5)}}}, r"state\['hooks'\]\['counter'\]\['n'\]", "numpy.float32"),
        ({"hooks": {"h": [1, np.arange(3)]}}, r"state\['hooks'\]\['h'\]\[1\]", "numpy.ndarray"),
        ({"rng": {"f": lambda: 0}}, r"state\['rng'\]\['f'\]", "function"),
    ],
)
def test_state_the_safe_loader_refuses_is_an_error_before_writing(tmp_path: Path, bad: dict, where: str,
                                                                   kind: str) -> None:  # fmt: skip
    save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=where) as exc:
        save(tmp_path, 2, state={"step": 2, **bad})
    assert kind in str(exc.value) and "weights_only=True" in str(exc.value)
    assert names(tmp_path) == {"latest", "step-00000001"}


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.mkdir, ("/tmp/xqgan-h2-pwned-marker",))


def test_load_state_refuses_pickled_code(tmp_path: Path) -> None:
    folder = save(tmp_path, 1)
    torch.save({"step": 1, "x": _Exploit()}, folder / ckpt.STATE)
    with pytest.raises(CheckpointError, match="refusing to load .*state.pt"):
        ckpt.load_state(folder)
    assert not Path("/tmp/xqgan-h2-pwned-marker").exists()


# ----------------------------------------------------------------------------------------------------------------
# damaged newest checkpoint: fall back to the previous one


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("damaged", "load"), [("model.safetensors", lambda f: ckpt.load_tensors(f / ckpt.MODEL)),
                                               ("state.pt", ckpt.load_state)])  # fmt: skip
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path, damaged: str, load: Callable) -> None:
    save(tmp_path, 1, value=1.0)
    newest = save(tmp_path, 2, value=2.0)
    _truncate(newest / damaged)
    with pytest.warns(UserWarning, match="step-00000002"):
        folder, _ = ckpt.load_newest_readable(tmp_path, load)
    assert folder.name == "step-00000001"
    with pytest.warns(UserWarning, match="step-00000002"):
        assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000001"
    with pytest.raises(CheckpointError, match="step-00000002"):  # asked for by name: no silent substitute
        load(newest)


def test_no_loadable_checkpoint_names_every_failure(tmp_path: Path) -> None:
    assert ckpt.load_newest_readable(tmp_path, ckpt.load_state) is None
    for step in (1, 2):
        _truncate(save(tmp_path, step) / ckpt.STATE)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="(?s)step-00000002.*step-00000001"):
        ckpt.load_newest_readable(tmp_path, ckpt.load_state)


def _tokenizer_checkpoints(out: Path, steps: tuple[int, ...]) -> None:
    cnn = {"use": "cnn", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8,
           "level_attention": False, "mid_attention": False}  # fmt: skip
    registry = Registry.from_dict({
        "run": {"name": "h2", "out_dir": str(out)},
        "data": {"use": "folder", "root": str(out), "resolution": 16},
        "encoder": {**cnn, "out_dim": 4}, "quantizer": {"use": "vq", "codebook_size": 8, "dim": 4},
        "decoder": {**cnn, "in_dim": 4},
    })  # fmt: skip
    cfg = registry.config
    for step in steps:
        torch.manual_seed(step)
        model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build())
        ckpt.save_checkpoint(out, step, {"model": model.state_dict()}, {"step": step}, registry.to_toml(), {})


def test_tokenizer_from_a_run_folder_skips_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    _tokenizer_checkpoints(tmp_path, (1, 2))
    _truncate(ckpt.checkpoint_root(tmp_path) / "step-00000002" / ckpt.MODEL)
    with pytest.warns(UserWarning, match="step-00000002"):
        tok = Tokenizer.from_checkpoint(tmp_path, device="cpu")
    assert tok.checkpoint.name == "step-00000001"


# ----------------------------------------------------------------------------------------------------------------
# pruning and refusing to mix runs


def test_pruning_keeps_the_newest_of_the_current_run_only(tmp_path: Path) -> None:
    for step in (500, 600):
        save(tmp_path, step, run_id="old-run", keep=2)
    for step in (1, 2, 3):
        save(tmp_path, step, run_id="new-run", keep=2)
    assert names(tmp_path) == {"latest", "step-00000500", "step-00000600", "step-00000002", "step-00000003"}


def test_pruning_deletes_nothing_it_did_not_write(tmp_path: Path) -> None:
    root = ckpt.checkpoint_root(tmp_path)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    save(tmp_path, 1)
    shutil.copytree(root / "step-00000001", outside / "copy")
    (root / "step-00000002").symlink_to(outside / "copy", target_is_directory=True)  # looks like an old checkpoint
    for name in ("step-0000001", "step-notes", ".tmp-step-user-notes", "step-00000003.bak"):
        (root / name).mkdir()
        (root / name / "keep.txt").write_text("mine")
    (root / ".tmp-step-00000009-1").mkdir()  # left by a crashed writer (another pid)
    for step in (10, 11):
        save(tmp_path, step, keep=2)
    assert names(tmp_path) == {"latest", "step-00000010", "step-00000011", "step-0000001", "step-notes",
                               ".tmp-step-user-notes", "step-00000003.bak"}  # fmt: skip
    assert (outside / "keep.txt").read_text() == "mine" and (outside / "copy" / ckpt.MODEL).is_file()


def test_refuse_existing_run(tmp_path: Path) -> None:
    ckpt.refuse_existing_run(tmp_path)  # nothing there: fine
    ckpt.refuse_existing_run(tmp_path / "missing")
    save(tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"(?s)already holds checkpoints.*step-00000004.*run.resume = true.*"
                                              r"run.name / run.out_dir"):  # fmt: skip
        ckpt.refuse_existing_run(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# run names cannot escape run.out_dir


@pytest.mark.parametrize("name", ["../../etc", "/abs/path", "a/b", ".hidden", "..", "a..b", "", "x\ny"])
def test_run_names_are_simple_slugs(name: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.name: must be a simple name"):
        Registry.from_dict({"run": {"name": name, "out_dir": "runs/{name}"}})


def test_any_out_dir_with_a_slug_name_stays_under_it(tmp_path: Path) -> None:
    cfg = Registry.from_dict({"run": {"name": "v1.2_x-y", "out_dir": str(tmp_path / "a" / "{name}")}}).config
    resolved = Path(cfg.run.out_dir.replace("{name}", cfg.run.name)).resolve()
    assert resolved.parent == (tmp_path / "a").resolve()


# ----------------------------------------------------------------------------------------------------------------
# reconstruct --out never overwrites


@pytest.fixture
def tokenizer_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    _tokenizer_checkpoints(out, (1,))
    return out


def _image(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def test_reconstruct_refuses_to_overwrite_inputs_and_existing_files(tokenizer_run: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "cat.png")
    before = img.read_bytes()
    with pytest.raises(OutputExistsError, match="cat.png \\(an input image\\)"):
        reconstruct_files(tokenizer_run, [img], tmp_path, overwrite=True)  # --force never replaces an input
    assert img.read_bytes() == before and not (tmp_path / "cat_recon.png").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat_recon.png").write_text("keep")
    with pytest.raises(OutputExistsError, match="(?s)--force.*cat_recon.png \\(exists\\)"):
        reconstruct_files(tokenizer_run, [img], out)
    assert sorted(p.name for p in out.iterdir()) == ["cat_recon.png"]
    assert [p.name for p in reconstruct_files(tokenizer_run, [img], out, overwrite=True)] == ["cat.png",
                                                                                               "cat_recon.png"]


def test_cli_reconstruct_clash_exits_2_and_writes_nothing(tokenizer_run: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "dog.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dog.png").write_text("keep")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "th")}
    cmd = [sys.executable, "-m", "xqgan_core.cli", "reconstruct", str(tokenizer_run), str(img), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{out / 'dog.png'} (exists)" in proc.stderr and "--force" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dog.png"] and (out / "dog.png").read_text() == "keep"
    proc = subprocess.run([*cmd, "--force"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dog.png", "dog_recon.png"]


def test_run_id_of(tmp_path: Path) -> None:
    assert ckpt.run_id_of(save(tmp_path, 1, run_id="abc")) == "abc"
    assert ckpt.run_id_of(save(tmp_path, 2, run_id=None)) is None

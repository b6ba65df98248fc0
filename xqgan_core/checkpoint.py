"""Atomic, pickle-free checkpoints.

A checkpoint is a folder ``<out_dir>/checkpoints/step-00000200/`` holding

* ``<stem>.safetensors``         one file per named state dict the trainer hands over (``model.safetensors``,
                                 ``ema.safetensors``, ``discriminators.safetensors``, or any module a Task owns)
* ``state.pt``                   optimizer / scheduler / RNG / counters: tensors and plain Python values only,
                                 read back with ``torch.load(weights_only=True)`` so no pickled code ever runs
                                 (checked when saving: a value the safe loader refuses is an error before writing)
* ``run.toml``                   the resolved run file with every component's distribution and version
* ``meta.json``                  step, time, ``run_id`` (which run wrote it), ``files`` (the safetensors stems)

A checkpoint is *complete* when state.pt, run.toml, meta.json and every file named in ``meta["files"]`` exist
(checkpoints written before ``files`` existed need ``model.safetensors``).

Crash safety. Every file is written into ``.tmp-step-00000200-<pid>/`` and fsynced, then the folder itself is
fsynced and renamed into place, and the ``checkpoints/`` folder is fsynced after each rename. When a step is written
again (the final save right after a periodic one), the existing ``step-00000200`` is first renamed aside to
``step-00000200.previous`` -- a name :func:`latest_checkpoint` also recognises --, the new folder is renamed into
place, and only then is the old one deleted: at every instant a complete checkpoint of that step is findable.
Between two equally numbered folders the plain name wins. ``latest`` (a one-line text file) still names the newest
folder for people and tools, but is never trusted: the highest complete step number wins.

Pruning keeps the newest ``keep`` checkpoints *of the current run* (``meta.json`` ``run_id``) and only ever deletes
direct children of ``<out_dir>/checkpoints`` whose names this module writes (a symlink is unlinked, never followed).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import struct
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import fsync_path, write_text_atomic
from .errors import CheckpointError

MODEL, EMA, DISC, STATE, RUN, META = (
    "model.safetensors",
    "ema.safetensors",
    "discriminators.safetensors",
    "state.pt",
    "run.toml",
    "meta.json",
)
SUFFIX = ".safetensors"
ASIDE = ".previous"  # a step folder being replaced by a newer write of the same step
_STEP_DIR = re.compile(r"step-(\d{8})(?:" + re.escape(ASIDE) + ")?")
_TMP_DIR = re.compile(r"\.tmp-step-\d{8}-(\d+)")
_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

T = TypeVar("T")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _contiguous(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; detach + clone makes each tensor its own
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: dict[str, Any],
    run_toml: str,
    meta: dict[str, Any],
    keep: int = 2,
    run_id: str | None = None,
) -> Path:
    """Write a checkpoint of ``step`` atomically and return its folder.

    ``tensors`` maps a file stem to a state dict, each written as ``<stem>.safetensors`` (an empty state dict writes
    no file). ``state`` must survive ``torch.load(weights_only=True)``: a value that does not raises CheckpointError
    naming its key path before anything is written. After writing, the newest ``keep`` checkpoints whose meta
    ``run_id`` equals ``run_id`` (every checkpoint when None) are kept and older ones of that run deleted.
    A write that fails (a full disk, ...) raises CheckpointError and leaves no temporary folder behind; the
    previous checkpoints are untouched.
    """
    root = checkpoint_root(out_dir)
    final = root / _step_name(step)
    stems = [stem for stem, sd in tensors.items() if len(sd)]
    for stem in stems:
        if not _STEM.fullmatch(stem):
            raise CheckpointError(f"cannot save {final}: '{stem}' is not a usable file stem (letters, digits, _ . -)")
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        _check_safe_state(state, final)
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for stem in stems:
            save_file(_contiguous(tensors[stem]), str(tmp / f"{stem}{SUFFIX}"))
        torch.save(state, tmp / STATE)
        (tmp / RUN).write_text(run_toml, encoding="utf-8")
        record = {"step": step, "time": time.time(), **meta, "files": stems}
        if run_id is not None:
            record["run_id"] = run_id
        (tmp / META).write_text(json.dumps(record, indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        _move_into_place(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(final, exc)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name + "\n")
    prune(out_dir, keep, run_id)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted last."""
    root = final.parent
    aside = final.with_name(final.name + ASIDE)
    if final.is_dir() and _complete(final):
        _remove(aside)  # a leftover of an earlier crash, superseded by ``final``
        os.rename(final, aside)  # still a complete checkpoint of this step, under a name latest_checkpoint knows
        fsync_path(root)
    elif final.exists() or final.is_symlink():
        _remove(final)  # incomplete: nothing worth keeping
    os.rename(tmp, final)
    fsync_path(root)
    _remove(aside)
    fsync_path(root)


def _write_failure(final: Path, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    why = f"the disk is full ({code}: {exc.strerror or exc})" if full else f"{code}: {exc.strerror or exc}"
    fix = " Free some space (or lower train.keep_checkpoints), then resume." if full else ""
    return (
        f"cannot write checkpoint {final}: {why}. The unfinished copy was removed; the previous checkpoints in "
        f"{final.parent} are intact.{fix}"
    )


def _check_safe_state(state: dict[str, Any], final: Path) -> None:
    """CheckpointError unless the safe loader reads ``state`` back. Plain tensors are always readable, so the
    round trip uses empty stand-ins for them: it costs a few kilobytes, not a copy of the optimizer state."""
    skeleton = _without_tensor_data(state)
    if not _round_trips(skeleton):
        path, value = _refused_part(skeleton, "state")
        raise CheckpointError(
            f"cannot save {final}: {path} (a {type(value).__module__}.{type(value).__name__}) cannot be read back by "
            "torch.load(weights_only=True), so this checkpoint could never be resumed; store tensors or plain "
            "int/float/str/bool/None/list/dict values (numpy scalars: .item(), numpy arrays: torch.from_numpy)"
        )


def _without_tensor_data(value: Any) -> Any:
    """``value`` with every plain tensor replaced by an empty one of its dtype (containers rebuilt, rest as is)."""
    if type(value) is torch.Tensor:
        return torch.empty(0, dtype=value.dtype)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _without_tensor_data(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_without_tensor_data(v) for v in value)
    return value


def _round_trips(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - pickling / unpickling refusals of any kind
        return False
    return True


def _refused_part(value: Any, path: str) -> tuple[str, Any]:
    """The key path and value of the innermost part of ``value`` that the safe loader refuses."""
    if isinstance(value, Mapping):
        children: Any = value.items()
    else:
        children = enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, child in children:
        if not _round_trips(child):
            return _refused_part(child, f"{path}[{key!r}]")
    return path, value


def _remove(path: Path) -> None:
    """Delete a checkpoint folder; a symlink is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Finding, pruning, refusing


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """Direct children named by this module (``step-NNNNNNNN`` or its ``.previous``), highest step first; for equal
    steps the plain name first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p.name.endswith(ASIDE), p))
    return [(step, p) for step, _, p in sorted(found, key=lambda t: (-t[0], t[1]))]


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of ``out_dir``, newest (highest step) first, one per step."""
    seen: set[int] = set()
    out = []
    for step, p in _step_folders(checkpoint_root(out_dir)):
        if step not in seen and _complete(p):
            seen.add(step)
            out.append(p)
    return out


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``out_dir`` (by step number, not by the ``latest`` file), or None."""
    found = complete_checkpoints(out_dir)
    return found[0] if found else None


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def run_id_of(folder: Path) -> str | None:
    """The ``run_id`` recorded in a checkpoint's meta.json (None for checkpoints written without one)."""
    run_id = (_read_meta(folder) or {}).get("run_id")
    return run_id if isinstance(run_id, str) else None


def _complete(folder: Path) -> bool:
    if not all((folder / f).is_file() for f in (STATE, RUN, META)):
        return False
    meta = _read_meta(folder)
    if meta is None:
        return False
    files = meta.get("files")
    needed = [f"{s}{SUFFIX}" for s in files] if isinstance(files, list) else [MODEL]
    return all(isinstance(f, str) and (folder / f).is_file() for f in needed)


def prune(out_dir: str | Path, keep: int, run_id: str | None = None) -> None:
    """Keep the newest ``keep`` checkpoints whose meta ``run_id`` is ``run_id`` (all when None), delete that run's
    older ones, superseded ``.previous`` folders and temporary folders left by crashed writers."""
    root = checkpoint_root(out_dir)
    kept = 0
    complete_steps: set[int] = set()
    for step, p in _step_folders(root):
        if not _complete(p):
            continue  # being written by someone else, or damaged: not ours to judge
        if step in complete_steps:  # a ``.previous`` behind a complete plain folder of the same step
            _remove(p)
            continue
        complete_steps.add(step)
        if run_id is not None and (_read_meta(p) or {}).get("run_id") != run_id:
            continue  # another run's checkpoint
        kept += 1
        if kept > keep:
            _remove(p)
    for p in root.iterdir() if root.is_dir() else ():
        m = _TMP_DIR.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid():
            _remove(p)
    if root.is_dir():
        fsync_path(root)


def refuse_existing_run(out_dir: str | Path) -> None:
    """Raise CheckpointError if ``out_dir`` already holds checkpoints (for ``run.resume = false``)."""
    found = _step_folders(checkpoint_root(out_dir))
    if found:
        raise CheckpointError(
            f"{out_dir} already holds checkpoints of an earlier run (newest: {found[0][1].name}) and run.resume = "
            "false: starting over there would mix two runs. Set run.resume = true to continue that run, or choose "
            f"another run.name / run.out_dir (or move {checkpoint_root(out_dir)} away) to start a new one."
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_newest_readable(out_dir: str | Path, load: Callable[[Path], T]) -> tuple[Path, T] | None:
    """``load`` the newest complete checkpoint of ``out_dir``; when it raises CheckpointError (a truncated or corrupt
    file), warn naming the folder and try the next older one. None when there is no complete checkpoint;
    CheckpointError listing every failure when none of them loads."""
    failures = []
    for folder in complete_checkpoints(out_dir):
        try:
            return folder, load(folder)
        except CheckpointError as exc:
            failures.append(f"{folder.name}: {exc}")
            warnings.warn(f"checkpoint {folder} cannot be loaded ({exc}); trying the previous one", stacklevel=2)
    if failures:
        raise CheckpointError(f"no checkpoint in {checkpoint_root(out_dir)} can be loaded:\n  " + "\n  ".join(failures))
    return None


def check_readable(folder: Path) -> None:
    """Cheap structural check of a checkpoint's files (sizes against the safetensors headers, state.pt's zip
    directory); CheckpointError names the first damaged file. Catches truncated writes without loading tensors."""
    meta = _read_meta(folder) or {}
    files = meta.get("files")
    for name in [f"{s}{SUFFIX}" for s in files] if isinstance(files, list) else [MODEL, EMA, DISC]:
        if (folder / name).is_file():
            _check_safetensors(folder / name)
    try:
        with zipfile.ZipFile(folder / STATE) as zf:
            zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{folder / STATE} is damaged (truncated or corrupt: {exc})") from None


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
    except (OSError, struct.error, ValueError):
        header = None
    ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__" and isinstance(v, dict)]
    if header is None or 8 + n + max(ends, default=0) != size:
        raise CheckpointError(f"{path} is damaged (truncated or corrupt safetensors file)")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a file inside it, or a run's out_dir; return the checkpoint folder.

    For an out_dir: its newest complete checkpoint whose files are intact (:func:`check_readable`); a damaged one
    is skipped with a warning."""
    return load_from(path, _intact)


def _intact(folder: Path) -> Path:
    check_readable(folder)
    return folder


def load_from(path: str | Path, load: Callable[[Path], T]) -> T:
    """``load`` a checkpoint folder (or the one holding the file ``path``) as it is, or for a run's out_dir its
    newest checkpoint that loads, falling back to older ones with a warning (:func:`load_newest_readable`)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if _complete(folder):
        return load(folder)
    found = load_newest_readable(folder, load)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {path} (expected {STATE}, {RUN}, {META} and the weights)")
    return found[1]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (tensors only: nothing in it can execute)."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_state(folder: Path) -> dict[str, Any]:
    """Read ``state.pt`` with ``weights_only=True``: a file crafted to run code when unpickled is refused."""
    path = folder / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the safe loader refused a global: never run it
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor/number state file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Only files written by xqgan can be resumed."
        ) from None
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt zip archive
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({type(exc).__name__}: {first})") from None


def load_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str, source: Path) -> None:
    """Load ``tensors`` into ``module``; a layout mismatch gets one error naming every mismatched part."""
    own = module.state_dict()
    optional = optional_state_keys(module)
    missing = sorted(set(own) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} (checkpoint {tuple(tensors[k].shape)}, run file {tuple(own[k].shape)})" for k in shapes[:8]
            ) + (f" and {len(shapes) - 8} more" if len(shapes) > 8 else ""))
        if missing:
            parts.append(f"missing in checkpoint: {_summarise(missing)}")
        if unexpected:
            parts.append(f"not in the run file's model: {_summarise(unexpected)}")
        raise CheckpointError(
            f"{source} does not match the run file's {what}: " + "; ".join(parts)
            + ". Was the run file's architecture changed since this checkpoint was written?"
        )
    # strict=False only lets declared optional keys stay at their initial values; everything else was checked above
    module.load_state_dict(tensors, strict=not (set(own) - set(tensors)))


def load_tokenizer_weights(model: nn.Module, path: str | Path, use_ema: bool = True) -> Path:
    """Load a checkpoint's tokenizer weights into ``model`` (encoder/quantizer/decoder, as laid out by the run file
    that built it); returns the weights file used. ``path``: a checkpoint folder, a file in it, or a run's out_dir
    (its latest checkpoint). ``use_ema`` prefers ``ema.safetensors`` when the run kept an EMA."""
    folder = resolve_checkpoint(path)
    weights = folder / EMA
    if not (use_ema and weights.is_file()):
        weights = folder / MODEL
    what = "tokenizer (encoder/quantizer/decoder)" + (" EMA weights" if weights.name == EMA else "")
    tensors = load_tensors(weights)
    own = model.state_dict()
    # the EMA shadow is kept in fp32; cast each entry back to the module's dtype before loading
    tensors = {k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}
    load_into(model, tensors, what, weights)
    return weights


def load_discriminator_weights(discriminators: nn.Module, path: str | Path) -> Path | None:
    """Load a checkpoint's discriminator weights into ``discriminators`` (an ``nn.ModuleList`` laid out as in the
    run that wrote it); None if that checkpoint holds none."""
    weights = resolve_checkpoint(path) / DISC
    if not weights.is_file():
        return None
    load_into(discriminators, load_tensors(weights), "discriminators", weights)
    return weights


def optional_state_keys(module: nn.Module) -> set[str]:
    """Full state_dict keys that ``module`` or any submodule declares in ``optional_state_keys``."""
    keys = set()
    for prefix, sub in module.named_modules():
        for name in getattr(sub, "optional_state_keys", ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def _summarise(keys: list[str]) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(prefixes[:8]) + (f" (+{len(prefixes) - 8} more groups)" if len(prefixes) > 8 else "")

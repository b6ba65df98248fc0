"""Atomic, pickle-free checkpoints.

A checkpoint is a folder ``<out_dir>/checkpoints/step-00000200/`` holding

* ``model.safetensors``          tokenizer weights (encoder/quantizer/decoder)
* ``ema.safetensors``            EMA weights (if EMA is on)
* ``discriminators.safetensors`` discriminator weights (if any)
* ``state.pt``                   optimizer / scheduler / RNG / counters: tensors and plain Python values only,
                                 read back with ``torch.load(weights_only=True)`` so no pickled code ever runs
* ``run.toml``                   the resolved run file with every component's distribution and version
* ``meta.json``                  step, time, provenance

It is written into a temporary sibling folder and renamed into place, then ``latest`` (a one-line text file) is
replaced atomically: a crash at any moment leaves the previous checkpoint intact and findable.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

MODEL, EMA, DISC, STATE, RUN, META = (
    "model.safetensors",
    "ema.safetensors",
    "discriminators.safetensors",
    "state.pt",
    "run.toml",
    "meta.json",
)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _contiguous(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; detach + clone makes each tensor its own
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: Mapping[str, torch.Tensor],
    state: dict[str, Any],
    run_toml: str,
    meta: dict[str, Any],
    ema: Mapping[str, torch.Tensor] | None = None,
    discriminators: Mapping[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically; keep the newest ``keep`` step checkpoints. Returns its folder."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(model), str(tmp / MODEL))
    if ema is not None:
        save_file(_contiguous(ema), str(tmp / EMA))
    if discriminators:
        save_file(_contiguous(discriminators), str(tmp / DISC))
    torch.save(state, tmp / STATE)
    (tmp / RUN).write_text(run_toml, encoding="utf-8")
    (tmp / META).write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2), encoding="utf-8")
    _fsync_dir(tmp)
    if final.exists():  # same step written again (e.g. final save right after a periodic one)
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)
    _write_atomic(root / "latest", final.name + "\n")
    _prune(root, keep)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a crash mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``out_dir``, or None."""
    root = checkpoint_root(out_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if _complete(candidate):
            return candidate
    complete = [p for p in sorted(root.glob("step-*")) if _complete(p)] if root.is_dir() else []
    return complete[-1] if complete else None


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (MODEL, STATE, RUN, META))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a file inside it, or a run's out_dir; return the checkpoint folder."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if _complete(p):
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {path} (expected {MODEL}, {STATE}, {RUN}, {META})")
    return found


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
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor/number state file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Only files written by xqgan can be resumed."
        ) from None


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

"""What a checkpoint holds and how a run comes back from it.

``RunState`` keeps a run's counters (step, skipped steps, training time, samples consumed, run id) and writes, per
checkpoint, every named module of the task as its own safetensors file (``model``, ``ema``, ``discriminators``, or
anything a future task returns from ``modules()``: no new code per module kind) plus ``state.pt`` with the
optimizers, schedulers, the precision's gradient scaler, the task's own state (LeCam anchors, ...), every rank's RNG
states, the data order, hook state, the run id and the names of the parameters each optimizer trains.

Resuming is exact: the same command after a kill ends with bitwise the same weights as an uninterrupted run
(tests/test_exact_resume.py). Under torch.distributed, rank 0 chooses the checkpoint and tells the others, so
ranks never start from different steps; each rank restores its own RNG states.
"""

from __future__ import annotations

import random
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .distributed import DistEnv, broadcast_object, gather_objects
from .errors import CheckpointError
from .task import Runtime, Task, TensorState

#: state.pt layout version (1: the single-file engine's keys gen_opt / gen_sched / disc_opt / scaler / lecam)
FORMAT = 2


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory (before anything is applied to the task)."""

    folder: Path
    state: dict[str, Any]
    tensors: dict[str, dict[str, Tensor]]


def read_checkpoint(folder: Path) -> LoadedCheckpoint:
    """Every file of a checkpoint folder; CheckpointError when one is unreadable (then an older one is tried)."""
    state = ckpt.load_state(folder)
    tensors = {p.name[: -len(ckpt.SUFFIX)]: ckpt.load_tensors(p) for p in sorted(folder.glob(f"*{ckpt.SUFFIX}"))}
    return LoadedCheckpoint(folder, state, tensors)


def find_resume_checkpoint(out_dir: Path, dist: DistEnv) -> LoadedCheckpoint | None:
    """The newest readable checkpoint of ``out_dir`` (a corrupt newest one falls back to the previous, with a
    warning), chosen by rank 0 and read by every rank. A collective under torch.distributed."""
    chosen: str | None = None
    loaded: LoadedCheckpoint | None = None
    if dist.is_main:
        found = ckpt.load_newest_readable(out_dir, read_checkpoint)
        if found is not None:
            loaded = found[1]
            chosen = str(found[0])
    chosen = broadcast_object(chosen)
    if chosen is not None and loaded is None:
        loaded = read_checkpoint(Path(chosen))
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA of ``device``, Python, NumPy) as checkpoint-safe values."""
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2])],
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(v) for v in rng["python"]), None))
    np.random.set_state(("MT19937", rng["numpy"][0].numpy().astype(np.uint32), int(rng["numpy"][1]), 0, 0.0))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """The counters of a run and its checkpoint format. ``save`` and ``restore`` are collectives under DDP."""

    task: Task
    runtime: Runtime
    step: int = 0
    bad_steps_total: int = 0
    train_seconds: float = 0.0
    samples: int = 0  # training samples consumed (all ranks): where the data order continues
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    hooks: Any = None  # a pluggy PluginManager (hook state is saved and restored through it)

    # -- saving ------------------------------------------------------------------------------------------------
    @property
    def dist(self) -> DistEnv:
        return self.runtime.dist

    @property
    def device(self) -> torch.device:
        return self.runtime.torch_device

    @property
    def seed(self) -> int:
        return self.runtime.seed

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        task = self.task
        return {
            "format": FORMAT,
            "step": self.step,
            "bad_steps_total": self.bad_steps_total,
            "train_seconds": self.train_seconds,
            "run_id": self.run_id,
            "data": {"seed": self.seed, "samples": self.samples},
            "modules": sorted(task.modules()),
            "trainable": trainable_names(task),
            "optimizers": {k: o.state_dict() for k, o in task.optimizers().items()},
            "schedulers": {k: s.state_dict() for k, s in task.schedulers().items()},
            "precision": self.runtime.precision.state_dict(),
            "task": task.state_dict(),
            "rng": rng,  # one entry per rank
            "hooks": {name: plugin.xqgan_checkpoint_state() for name, plugin in self._stateful_hooks()},
        }

    def save(self, out_dir: Path, run_toml: str, meta: dict[str, Any], keep: int) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank contributes its RNG states). Returns the
        folder on rank 0, None elsewhere."""
        rng = gather_objects(capture_rng(self.device))
        if not self.dist.is_main:
            return None
        assert rng is not None
        tensors = {name: part.state_dict() for name, part in self.task.modules().items()}
        return ckpt.save_checkpoint(out_dir, self.step, tensors, self.state_dict(rng), run_toml,
                                    {**meta, "seed": self.seed}, keep=keep, run_id=self.run_id)

    def _stateful_hooks(self) -> list[tuple[str, Any]]:
        if self.hooks is None:
            return []
        return [(n, p) for n, p in self.hooks.list_name_plugin() if hasattr(p, "xqgan_checkpoint_state")]

    # -- resuming ----------------------------------------------------------------------------------------------
    def restore(self, loaded: LoadedCheckpoint) -> None:
        """Put the task and the counters back where ``loaded`` left them. Differences between what the checkpoint
        trains and what this run file trains fail here, with the names of the parts that differ."""
        state, folder = _upgrade(loaded.state), loaded.folder
        self._check_same_parts(state, loaded.tensors, folder)
        for name, part in self.task.modules().items():
            _load_part(name, part, loaded.tensors[name], folder / f"{name}{ckpt.SUFFIX}")
        for name, opt in self.task.optimizers().items():
            try:
                opt.load_state_dict(state["optimizers"][name])
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"{folder}: the '{name}' optimizer's state does not fit this run ({exc})") from None
        for name, sched in self.task.schedulers().items():
            if name in state["schedulers"]:
                sched.load_state_dict(state["schedulers"][name])
        self.runtime.precision.load_state_dict(state["precision"])
        self.task.load_state_dict(state.get("task", {}))
        self.step = int(state["step"])
        self.bad_steps_total = int(state["bad_steps_total"])
        self.train_seconds = float(state["train_seconds"])
        self.run_id = state.get("run_id") or self.run_id
        data = state.get("data") or {}
        self.samples = int(data.get("samples", -1))
        self._restore_rng(state["rng"])
        saved = state.get("hooks", {})
        for name, plugin in self.hooks.list_name_plugin() if self.hooks is not None else ():
            if saved.get(name) is not None and hasattr(plugin, "xqgan_load_checkpoint_state"):
                plugin.xqgan_load_checkpoint_state(state=saved[name])

    def _check_same_parts(self, state: dict[str, Any], tensors: dict[str, Any], folder: Path) -> None:
        own = set(self.task.modules())
        missing = sorted(own - set(tensors))
        if missing:
            raise CheckpointError(
                f"{folder} has no weights for {', '.join(missing)} (files {', '.join(sorted(tensors)) or 'none'}): "
                "was the run file changed since this run started (e.g. a discriminator or EMA switched on)? "
                "Resume with the run file it was started with, or start a new run (another run.name)."
            )
        extra = sorted(set(state.get("modules") or tensors) - own)
        if extra:
            warnings.warn(f"{folder}: {', '.join(extra)} not used by this run file; ignored", stacklevel=3)
        saved = state.get("trainable")
        if saved is None:
            return
        now = trainable_names(self.task)
        problems = []
        for opt in sorted(set(saved) | set(now)):
            before, after = saved.get(opt, []), now.get(opt, [])
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            if opt not in saved:
                problems.append(f"optimizer '{opt}' is new")
            elif opt not in now:
                problems.append(f"optimizer '{opt}' is gone")
            elif added or removed or before != after:
                detail = [f"now trained: {_names(added)}"] if added else []
                detail += [f"no longer trained: {_names(removed)}"] if removed else []
                problems.append(f"optimizer '{opt}': " + ("; ".join(detail) or "parameter order changed"))
        if problems:
            raise CheckpointError(
                f"what trains changed since {folder} was written (adapters, frozen parts or discriminators in the run "
                "file?): " + "; ".join(problems) + ". Resume with the run file the run was started with, or start a "
                "new run (another run.name) with train.init_from pointing at this one."
            )

    def _restore_rng(self, saved: Any) -> None:
        per_rank = saved if isinstance(saved, list) else [saved]
        if len(per_rank) == self.dist.world:
            restore_rng(per_rank[self.dist.rank], self.device)
            return
        if self.dist.is_main:
            warnings.warn(
                f"the checkpoint was written by {len(per_rank)} process(es), this run has {self.dist.world}: every "
                "rank's random number generators are reseeded (the run continues, but not bit-identically)",
                stacklevel=3,
            )
        seed_everything(self.seed + 1_000_003 * self.step + self.dist.rank)


def trainable_names(task: Task) -> dict[str, list[str]]:
    """Per optimizer, the names (``<module>.<parameter>``) of the parameters it updates, in its order."""
    names: dict[int, str] = {}
    for module_name, part in task.modules().items():
        if isinstance(part, nn.Module):
            for name, p in part.named_parameters():
                names.setdefault(id(p), f"{module_name}.{name}")
    return {
        opt_name: [names.get(id(p), "<unnamed>") for group in opt.param_groups for p in group["params"]]
        for opt_name, opt in task.optimizers().items()
    }


def _load_part(name: str, part: nn.Module | TensorState, tensors: dict[str, Tensor], path: Path) -> None:
    if isinstance(part, nn.Module):
        ckpt.load_into(part, tensors, f"'{name}' weights", path)
        return
    own = part.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if unexpected or shapes:
        raise CheckpointError(f"{path} does not match this run's '{name}': unexpected {_names(unexpected)}, "
                              f"shape mismatch {_names(shapes)}")
    part.load_state_dict(tensors)


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Read checkpoints of the single-file engine (format 1) with the current key names."""
    if "optimizers" in state:
        return state
    out = dict(state)
    out["optimizers"] = {"tokenizer": state["gen_opt"], **({"discriminators": state["disc_opt"]} if "disc_opt" in state else {})}
    out["schedulers"] = {"tokenizer": state["gen_sched"]}
    out["precision"] = state["scaler"]
    out["task"] = {"lecam": state["lecam"]}
    return out


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "") if keys else "none"

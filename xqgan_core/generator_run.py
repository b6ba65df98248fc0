"""Generator runs outside training: the frozen tokenizer of a [tokenizer] table, what a generator checkpoint records
about what it was bound to, and ``load_generator`` for sampling.

>>> generator, tokenizer = load_generator("runs/var-tiny")        # EMA weights when the run kept them
>>> run = load_generator_run("runs/var-tiny")                     # + layout, class names, [sample] settings
>>> tokens = run.generator.sample(8, torch.arange(8) % run.num_classes, top_k=1)
>>> images = run.decode(tokens)                                   # (8, 3, R, R) in [-1, 1]

A generator checkpoint holds ``generator.safetensors`` (+ ``generator_ema.safetensors``), never the tokenizer: its
``meta.json`` records (under ``"generator"``) the token layout, the class names and the tokenizer's checkpoint folder,
weight file and sha256; loading finds the tokenizer there (or through the run file's [tokenizer] run) and refuses
weights with another sha256.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import validate, validate_component
from .errors import CheckpointError
from .interfaces import Device, Generator
from .runfile import SampleSection, TokenizerRef
from .token_layout import TokenLayout
from .token_shards import layout_from_json, layout_to_json, weights_sha256
from .tokenizer import Tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["GeneratorRun", "load_frozen_tokenizer", "load_generator", "load_generator_run", "generator_meta",
           "GENERATOR", "GENERATOR_EMA", "META_KEY"]

#: module names (weight files) of a generator run's checkpoints
GENERATOR, GENERATOR_EMA = "generator", "generator_ema"
#: the key of a generator checkpoint's record in meta.json
META_KEY = "generator"


def load_frozen_tokenizer(ref: TokenizerRef, device: Device | str | torch.device | None = None) -> Tokenizer:
    """The tokenizer of a [tokenizer] table, frozen (eval mode, no gradients). CheckpointError naming
    ``tokenizer.run`` when it cannot be loaded, or ``tokenizer.sha256`` when its weights are not the pinned ones."""
    try:
        tok = Tokenizer.from_pretrained(ref.run, filename=ref.filename or None, device=device, use_ema=ref.use_ema)
    except CheckpointError as exc:
        raise CheckpointError(f"tokenizer.run: cannot load the tokenizer {ref.run!r}: {exc}") from exc
    tok.model.requires_grad_(False).eval()
    if ref.sha256:
        found = weights_sha256(tok)
        if found != ref.sha256:
            raise CheckpointError(
                f"tokenizer.sha256: the weights {tok.weights} have sha256 {found}, but the run pins {ref.sha256}: "
                "this is not the tokenizer the generator was trained on (retrained or replaced?)"
            )
    return tok


def tokenizer_identity(ref: TokenizerRef, tok: Tokenizer) -> dict[str, str]:
    """What identifies the frozen tokenizer: ``run`` as written, its ``checkpoint`` folder and ``weights`` file
    (absolute) and the weights' ``sha256``."""
    return {"run": ref.run, "checkpoint": str(Path(tok.checkpoint).resolve()) if tok.checkpoint else "",
            "weights": str(Path(tok.weights).resolve()) if tok.weights else "", "sha256": weights_sha256(tok)}


def generator_meta(layout: TokenLayout, class_names: Sequence[str], tokenizer: Mapping[str, str]) -> dict[str, Any]:
    """The ``meta.json`` record of a generator checkpoint (plain JSON): what ``load_generator`` binds it to."""
    return {META_KEY: {"layout": layout_to_json(layout), "num_classes": len(class_names),
                       "class_names": list(class_names), "tokenizer": dict(tokenizer)}}


@dataclass
class GeneratorRun:
    """A trained generator in eval mode with its frozen tokenizer, on the tokenizer's device."""

    generator: Generator
    tokenizer: Tokenizer
    layout: TokenLayout
    class_names: tuple[str, ...]
    sample: SampleSection  # the run's [sample] settings: defaults for sampling
    checkpoint: Path
    weights: Path  # generator_ema.safetensors or generator.safetensors

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def decode(self, tokens: Tensor) -> Tensor:
        """``(B, L, K)`` tokens of this run's layout -> images ``(B, 3, H, W)`` in [-1, 1]."""
        return self.tokenizer.decode(tokens, layout=self.layout)


def load_generator(
    run_dir: str | Path, device: Device | str | torch.device | None = None, use_ema: bool = True
) -> tuple[Generator, Tokenizer]:
    """A generator run's generator (bound, weights loaded, eval mode) and its frozen tokenizer, on ``device`` (None:
    the best available). ``run_dir``: a generator run's out_dir (its newest loadable checkpoint), a checkpoint folder
    or a file inside one. ``use_ema``: ``generator_ema`` when the run kept an EMA, else ``generator``."""
    run = load_generator_run(run_dir, device, use_ema)
    return run.generator, run.tokenizer


def load_generator_run(
    run_dir: str | Path, device: Device | str | torch.device | None = None, use_ema: bool = True
) -> GeneratorRun:
    """``load_generator`` with what else sampling needs: layout, class names, the run's [sample] settings."""
    return ckpt.load_from(run_dir, lambda folder: _load_folder(folder, device, use_ema))


def _load_folder(folder: Path, device: Device | str | torch.device | None, use_ema: bool) -> GeneratorRun:
    run_file = folder / ckpt.RUN
    try:
        data = tomllib.loads(run_file.read_text(encoding="utf-8"))
        meta = json.loads((folder / ckpt.META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder}: {exc}") from exc
    record = meta.get(META_KEY) if isinstance(meta, dict) else None
    if not isinstance(data.get("generator"), Mapping) or not isinstance(record, Mapping):
        raise CheckpointError(f"{folder} is not a generator checkpoint: its run.toml has no [generator] table or "
                              f"its meta.json no {META_KEY!r} record (a tokenizer run? load it with "
                              "Tokenizer.from_checkpoint)")
    # only the tables sampling needs: the data source and the device of training need not exist here
    spec = validate_component("generator", data["generator"], "generator")
    sample, problems = validate(SampleSection, data.get("sample", {}), "sample")
    if problems:
        raise CheckpointError(f"{run_file}: " + "; ".join(problems))
    tok = _tokenizer_of(folder, data.get("tokenizer", {}), record.get("tokenizer", {}), device)
    layout = layout_from_json(record["layout"])
    class_names = tuple(str(c) for c in record.get("class_names", ()))
    generator: Generator = spec.build()
    generator.bind(layout, tok.model.quantizer, len(class_names))
    ema = folder / f"{GENERATOR_EMA}{ckpt.SUFFIX}"
    weights = ema if use_ema and ema.is_file() else folder / f"{GENERATOR}{ckpt.SUFFIX}"
    ckpt.load_into(generator, ckpt.load_tensors(weights), "generator", weights)
    generator.to(tok.torch_device).eval()
    return GeneratorRun(generator, tok, layout, class_names, sample, folder, weights)


def _tokenizer_of(folder: Path, table: Any, recorded: Mapping[str, Any],
                  device: Device | str | torch.device | None) -> Tokenizer:
    """The tokenizer a checkpoint recorded: its checkpoint folder when it still exists (the run may have been started
    from another directory), else the run file's [tokenizer] run; either way with the recorded sha256."""
    ref, problems = validate(TokenizerRef, table if isinstance(table, Mapping) else {}, "tokenizer")
    if problems:
        raise CheckpointError(f"{folder / ckpt.RUN}: " + "; ".join(problems))
    sha = str(recorded.get("sha256") or ref.sha256)
    where = str(recorded.get("checkpoint") or "")
    if where and Path(where).exists():
        ref = TokenizerRef(run=where, use_ema=ref.use_ema, sha256=sha)
    else:
        ref = TokenizerRef(run=ref.run, use_ema=ref.use_ema, filename=ref.filename, sha256=sha)
    return load_frozen_tokenizer(ref, device)

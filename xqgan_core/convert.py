"""Turn released tokenizer checkpoints of other code bases into xqgan run folders.

Foreign checkpoints are pickled torch files. :func:`read_foreign_checkpoint` reads them with
``torch.load(weights_only=True)`` and an explicit allow-list of the few harmless classes such files contain
(``argparse.Namespace`` for a training script's arguments); anything else is refused before it is imported, so no
pickled code ever runs.

Supported formats:

* ``llamagen``: LlamaGen's VQ tokenizers (``vq_ds16_c2i.pt``: ``{"model": state_dict}``, training checkpoints also
  ``"ema"``, optimizer states and ``"args"``). Its layout is the XQ-GAN-V CNN preset's
  (``configs/xqgan-v-vq16-256.toml``) with other module names; :data:`LLAMAGEN_RULES` renames one into the other.

The converted folder is an ordinary run folder (``<out>/checkpoints/step-00000000/``): ``Tokenizer.from_checkpoint``,
``xqgan-run reconstruct`` / ``eval`` and ``train.init_from`` read it like any trained run.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .errors import CheckpointError
from .registry import Registry

__all__ = [
    "ALLOWED_CLASSES",
    "DEFAULT_PRESET",
    "LLAMAGEN_RULES",
    "convert_llamagen",
    "from_llamagen_keys",
    "read_foreign_checkpoint",
    "to_llamagen_keys",
]

# Classes a foreign checkpoint may need beyond torch's own weights-only set: plain attribute bags, no behaviour.
ALLOWED_CLASSES: tuple[type, ...] = (argparse.Namespace,)

DEFAULT_PRESET = Path(__file__).resolve().parent.parent / "configs" / "xqgan-v-vq16-256.toml"


# ----------------------------------------------------------------------------------------------------------------
# Safe reading


def read_foreign_checkpoint(path: str | Path, allowed: Iterable[type] = ALLOWED_CLASSES) -> Any:
    """Load a torch file that someone else wrote, without ever running pickled code.

    Only tensors, plain Python values and the ``allowed`` classes are accepted (the allow-list is scoped to this
    call). A file that would need any other class or function raises CheckpointError naming it.
    """
    path, allowed = Path(path), list(allowed)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused global, or a truncated / non-torch file
        refused = _refused_globals(path, allowed) or _GLOBAL_IN_MESSAGE.findall(str(exc))
        if refused:  # the safe unpickler stopped at a global; it was never imported or called
            raise CheckpointError(
                f"refusing to load {path}: it needs {', '.join(refused)}, which is not on the allow-list of harmless "
                f"classes ({', '.join(_qualname(c) for c in allowed)}); loading it would import and run code from "
                "the file. Re-save its tensors (e.g. as safetensors) from a trusted environment"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {type(exc).__name__}: {first}") from None


# torch's refusal names the global ("Unsupported global: GLOBAL os.system ...", "unsupported GLOBAL os.system" for
# the pre-zip format, where it is the only source of the name)
_GLOBAL_IN_MESSAGE = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


def _refused_globals(path: Path, allowed: list[type]) -> list[str]:
    """The globals ``path`` references beyond the allow-list, read from the file without importing any of them
    (empty when the file is not a zip-format torch checkpoint)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001
        return []
    ok = {_qualname(c) for c in allowed}
    return [n for n in names if n not in ok]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------------------------------------------
# Key renaming, table-driven
#
# A rule pairs a LlamaGen key pattern with ours. Placeholders: {i}/{j} indices, {p} a parameter name; the same
# table renames both ways. LlamaGen keeps quant_conv / post_quant_conv at the top level, ours belong to the encoder
# and decoder; its mid blocks are a list (res, attn, res), ours are named; "nin_shortcut" is our "shortcut"; its
# per-level "downsample"/"upsample" is our "resample". Decoder levels run from the lowest resolution up in both.

LLAMAGEN_RULES: tuple[tuple[str, str], ...] = (
    ("quant_conv.{p}", "encoder.quant_conv.{p}"),
    ("post_quant_conv.{p}", "decoder.post_quant_conv.{p}"),
    ("quantize.embedding.weight", "quantizer.embedding.weight"),
    ("encoder.conv_in.{p}", "encoder.conv_in.{p}"),
    ("encoder.norm_out.{p}", "encoder.norm_out.{p}"),
    ("encoder.conv_out.{p}", "encoder.conv_out.{p}"),
    ("decoder.conv_in.{p}", "decoder.conv_in.{p}"),
    ("decoder.norm_out.{p}", "decoder.norm_out.{p}"),
    ("decoder.conv_out.{p}", "decoder.conv_out.{p}"),
    ("{part}.conv_blocks.{i}.res.{j}.nin_shortcut.{p}", "{part}.levels.{i}.res.{j}.shortcut.{p}"),
    ("{part}.conv_blocks.{i}.res.{j}.{layer}.{p}", "{part}.levels.{i}.res.{j}.{layer}.{p}"),
    ("{part}.conv_blocks.{i}.attn.{j}.{attn}.{p}", "{part}.levels.{i}.attn.{j}.{attn}.{p}"),
    ("encoder.conv_blocks.{i}.downsample.conv.{p}", "encoder.levels.{i}.resample.conv.{p}"),
    ("decoder.conv_blocks.{i}.upsample.conv.{p}", "decoder.levels.{i}.resample.conv.{p}"),
    ("{part}.mid.0.{layer}.{p}", "{part}.mid.res1.{layer}.{p}"),
    ("{part}.mid.1.{attn}.{p}", "{part}.mid.attn.{attn}.{p}"),
    ("{part}.mid.2.{layer}.{p}", "{part}.mid.res2.{layer}.{p}"),
)

# What each placeholder may stand for (the whole component between dots).
_SLOTS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "part": r"encoder|decoder",
    "layer": r"norm1|conv1|norm2|conv2",
    "attn": r"norm|q|k|v|proj_out",
}

# Source keys that are dropped on purpose: LlamaGen's rolling window of recent code indices (training telemetry;
# our vq keeps its own usage statistics, which start empty).
LLAMAGEN_IGNORED = frozenset({"quantize.codebook_used"})


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_SLOTS[p]})" for n, p in enumerate(parts))
    return re.compile(pattern)


_FORWARD = [(_compile(src), dst) for src, dst in LLAMAGEN_RULES]
_BACKWARD = [(_compile(dst), src) for src, dst in LLAMAGEN_RULES]


def _rename(keys: Iterable[str], rules: list[tuple[re.Pattern[str], str]]) -> tuple[dict[str, str], list[str]]:
    """(old -> new for every key a rule matches, the keys no rule matches)."""
    renamed, unmatched = {}, []
    for key in keys:
        for pattern, target in rules:
            m = pattern.fullmatch(key)
            if m:
                renamed[key] = target.format(**m.groupdict())
                break
        else:
            unmatched.append(key)
    return renamed, unmatched


def from_llamagen_keys(
    state: Mapping[str, torch.Tensor], source: str = "the LlamaGen state dict"
) -> dict[str, torch.Tensor]:
    """A LlamaGen VQ state dict renamed to our TokenizerModel's keys. Known-harmless extras are dropped; any other
    key no rule knows raises CheckpointError listing them (it would be silently lost otherwise)."""
    renamed, unmatched = _rename(state, _FORWARD)
    unknown = sorted(k for k in unmatched if k not in LLAMAGEN_IGNORED)
    if unknown:
        raise CheckpointError(
            f"{source} has {len(unknown)} key(s) the LlamaGen VQ layout does not have: {_listing(unknown)}. Is it a "
            "LlamaGen VQ tokenizer (VQ-8 / VQ-16)?"
        )
    return {renamed[k]: v for k, v in state.items() if k in renamed}


def to_llamagen_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our TokenizerModel's state dict renamed to LlamaGen's keys (for checks and for exporting); keys LlamaGen has
    no place for (our vq's usage statistics) are left out."""
    renamed, _ = _rename(state, _BACKWARD)
    return {renamed[k]: v for k, v in state.items() if k in renamed}


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# LlamaGen -> run folder

# Top-level entries of LlamaGen checkpoints: the released files hold "model"; training checkpoints add the EMA,
# optimizer and discriminator states, the step and the script's argparse.Namespace (not needed for inference).
_LLAMAGEN_WEIGHTS = ("model", "ema")
_LLAMAGEN_TRAINING_ONLY = frozenset({"optimizer", "discriminator", "optimizer_disc", "steps", "args"})


def read_conversion_source(
    source: Path, out_dir: Path, kind: str, weight_entries: Iterable[str], training_only: Iterable[str]
) -> Mapping[str, Any]:
    """The checks every converter makes before writing: ``out_dir`` holds no checkpoints, ``source`` reads safely as
    a dict with at least one of ``weight_entries`` and nothing but those and ``training_only`` entries."""
    root = ckpt.checkpoint_root(out_dir)
    if root.is_dir() and any(root.iterdir()):
        raise CheckpointError(f"{out_dir} already holds checkpoints; choose an empty or new --out folder")
    data = read_foreign_checkpoint(source)
    weights, known = tuple(weight_entries), {*weight_entries, *training_only}
    if not isinstance(data, Mapping) or not any(k in data for k in weights):
        names = " / ".join(repr(w) for w in weights)
        raise CheckpointError(f"{source} is not a {kind} checkpoint: expected a dict with a {names} state dict")
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise CheckpointError(f"{source} has entries a {kind} checkpoint does not: {_listing(unknown)}")
    return data


def convert_llamagen(
    source: str | Path, out_dir: str | Path, preset: str | Path = DEFAULT_PRESET, name: str | None = None
) -> Path:
    """Convert a LlamaGen VQ checkpoint into a run folder at ``out_dir`` built from ``preset``; return the
    checkpoint folder written.

    The weights go to ``model.safetensors`` (and ``ema.safetensors`` when the file has an ``"ema"`` entry, which
    ``Tokenizer.from_checkpoint`` then prefers, as LlamaGen's own samplers do). Every tensor must fit the preset's
    encoder/quantizer/decoder exactly (names and shapes); anything else raises CheckpointError before writing.
    """
    source, out_dir = Path(source), Path(out_dir)
    data = read_conversion_source(source, out_dir, "LlamaGen", _LLAMAGEN_WEIGHTS, _LLAMAGEN_TRAINING_ONLY)

    run_name = name or _run_name_for(source)
    # run.out_dir stays the preset's: a training run started from this run file must not try to resume from the
    # converted folder, which has weights but no optimizer state (fine-tune with train.init_from = <out_dir>)
    registry = Registry.from_toml(preset, overrides=[f"run.name={run_name}"])
    expected = _expected_shapes(registry)
    _check_codebook_metric(registry, data.get("args"), source, preset)
    tensors = {}
    for entry in _LLAMAGEN_WEIGHTS:
        if entry in data:
            state = data[entry]
            where = f"{source} ['{entry}']"
            if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{where} is not a state dict of tensors")
            converted = from_llamagen_keys(state, where)
            _check_fits(converted, expected, where, preset)
            tensors[entry] = converted
    meta = {
        "converted_from": {"format": "llamagen", "file": str(source.resolve()), "sha256": _sha256(source)},
        "preset": str(preset),
    }
    return ckpt.save_checkpoint(
        out_dir, 0, tensors, state={}, run_toml=registry.to_toml(with_provenance=True), meta=meta, keep=1
    )


def _check_codebook_metric(registry: Registry, args: Any, source: Path, preset: str | Path) -> None:
    """LlamaGen's VQ normalises tokens and codes (``codebook_l2_norm``, on in its released tokenizers) and stores
    the raw rows, as our vq with ``l2_norm = true`` does; other settings would pick other codes for the same weights.
    A training checkpoint's ``args`` says which one it used; a released file does not, so it is taken as on."""
    ours = getattr(registry.config.quantizer.config, "l2_norm", None)
    theirs = getattr(args, "codebook_l2_norm", True)
    if ours is not theirs:
        raise CheckpointError(
            f"{source} was trained with codebook_l2_norm={theirs}, but {preset} sets quantizer.l2_norm = "
            f"{str(ours).lower() if ours is not None else 'nothing (not a vq quantizer)'}: set quantizer.l2_norm = "
            f"{str(theirs).lower()} (and use = \"vq\") so the same codes are chosen"
        )


def _expected_shapes(registry: Registry) -> tuple[dict[str, torch.Size], set[str]]:
    """Our model's (key -> shape) and its optional keys, built on the meta device: no memory, no random init."""
    from .model import TokenizerModel

    cfg = registry.config
    if cfg.encoder is None or cfg.quantizer is None or cfg.decoder is None:
        raise CheckpointError(
            f"{registry.source} is not a tokenizer run file: it needs [encoder], [quantizer] and [decoder]"
        )
    with torch.device("meta"):
        model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build())
    return {k: v.shape for k, v in model.state_dict().items()}, ckpt.optional_state_keys(model)


def _check_fits(
    state: Mapping[str, torch.Tensor], expected: tuple[dict[str, torch.Size], set[str]], where: str, preset: str | Path
) -> None:
    shapes, optional = expected
    missing = sorted(set(shapes) - set(state) - optional)
    extra = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(state) & set(shapes) if state[k].shape != shapes[k])
    problems = []
    if wrong:
        pairs = [f"{k} ({tuple(state[k].shape)} vs {tuple(shapes[k])})" for k in wrong]
        problems.append("shape mismatch: " + _listing(pairs))
    if missing:
        problems.append(f"missing: {_listing(missing)}")
    if extra:
        problems.append(f"not in the preset's model: {_listing(extra)}")
    if problems:
        raise CheckpointError(f"{where} does not fit the architecture of {preset}: " + "; ".join(problems))


def _run_name_for(source: Path, prefix: str = "llamagen") -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip(".-") or "converted"
    return f"{prefix}-{stem}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

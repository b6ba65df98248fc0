"""Find a released or trained tokenizer by name: what ``Tokenizer.from_pretrained`` accepts.

:func:`resolve_pretrained` turns a name into a checkpoint path that ``Tokenizer.from_checkpoint`` loads:

* an xqgan run folder, checkpoint folder or a file inside one: used as it is;
* a foreign checkpoint file (``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``, e.g. LlamaGen's ``vq_ds16_c2i.pt`` or the
  XQ-GAN reference code's ``MSVR10P2-4096.pt``; ``format="auto"`` tells them apart by their key names):
  converted once through :mod:`xqgan_core.convert` / :mod:`xqgan_core.convert_reference` into the xqgan cache
  (``$XQGAN_CACHE``, else ``~/.cache/xqgan``), in a folder keyed by the file's sha256 and the presets, and reused
  from there afterwards;
* a Hugging Face repo id (``"owner/name"``) with ``filename``: that file is fetched through huggingface_hub's own
  cache (``hf_hub_download``; offline, ``HF_HUB_OFFLINE=1``, only a cached copy is used), then treated as above;
* a Hugging Face repo id without ``filename``: the repo holds an xqgan run folder (a checkpoint folder at its root,
  or a run's out_dir with ``checkpoints/step-*/``), of which only the checkpoint files (:data:`RUN_FOLDER_PATTERNS`)
  are fetched into the hub's cache (``snapshot_download``, offline as above), then loaded as a run folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt
from .convert import DEFAULT_PRESET, _sha256, convert_llamagen
from .convert_reference import PRESETS as REFERENCE_PRESETS
from .convert_reference import convert_reference, looks_like_reference_checkpoint
from .errors import CheckpointError

__all__ = [
    "CONVERTERS", "FOREIGN_SUFFIXES", "RUN_FOLDER_PATTERNS", "cache_root", "converted_folder", "resolve_pretrained",
]

# Suffixes of foreign (pickled torch) checkpoint files; xqgan's own weights are .safetensors in a checkpoint folder.
FOREIGN_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin"})

# Foreign formats from_pretrained converts on the fly: name -> convert(source, out_dir, preset=..., name=None).
CONVERTERS: dict[str, Callable[..., Path]] = {"llamagen": convert_llamagen, "reference": convert_reference}
# The presets each converter starts from when none is given (the cache key covers their content).
DEFAULT_PRESETS: dict[str, tuple[Path, ...]] = {
    "llamagen": (DEFAULT_PRESET,), "reference": tuple(REFERENCE_PRESETS.values()),
}

# The files of a run folder on the hub that are fetched, at its root or in each checkpoint folder: what makes a
# checkpoint complete (every weight file meta.json lists, discriminators included, which fine-tuning can start
# from); logs, grids and metrics stay on the hub. Publish one checkpoint, with a slim state.pt (``xqgan-run convert``
# writes an empty one), to keep optimizer states out of downloads.
_RUN_FOLDER_FILES = (ckpt.RUN, ckpt.META, ckpt.STATE, f"*{ckpt.SUFFIX}")
RUN_FOLDER_PATTERNS = [f"{where}{name}" for where in ("", "checkpoints/*/") for name in _RUN_FOLDER_FILES]

# "owner/name" as the hub spells repo ids (no leading dot or dash, no "..")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def cache_root() -> Path:
    """Where converted checkpoints are kept: ``$XQGAN_CACHE``, else ``~/.cache/xqgan``."""
    configured = os.environ.get("XQGAN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "xqgan"


def resolve_pretrained(
    name_or_path: str | Path,
    *,
    filename: str | None = None,
    revision: str | None = None,
    hf_cache_dir: str | Path | None = None,
    format: str = "auto",
    preset: str | Path | None = None,
) -> Path:
    """A path ``Tokenizer.from_checkpoint`` loads, for a run/checkpoint folder, a foreign checkpoint file or a
    Hugging Face repo id (see the module doc). Raises CheckpointError naming what was looked for and where."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if filename is not None and path.is_dir() and not (path / ckpt.RUN).is_file():
            path = path / filename  # a local copy of a hub repo: folder + file name
        if _is_foreign_file(path):
            return converted_folder(path, format=format, preset=preset)
        if filename is not None and not path.exists():
            raise CheckpointError(f"{path}: no such file")
        return path
    if isinstance(name_or_path, str) and _REPO_ID.fullmatch(name_or_path):
        if not filename:
            return _hub_run_folder(name_or_path, revision, hf_cache_dir)
        local = _hub_file(name_or_path, filename, revision, hf_cache_dir)
        if _is_foreign_file(local):
            return converted_folder(local, format=format, preset=preset)
        return local
    raise CheckpointError(
        f"{name_or_path}: no such file or folder, and not a Hugging Face repo id ('owner/name' with filename=...)"
    )


def converted_folder(source: Path, *, format: str = "auto", preset: str | Path | None = None) -> Path:
    """The run folder holding ``source`` converted from ``format``, converting it on first use.

    The folder name is keyed by the file's sha256 and the preset's content, so a changed file or preset is never
    served from an old conversion. The conversion is written beside it and moved into place when complete: an
    interrupted one leaves nothing that a later call would take for a result. ``format = "auto"``: a checkpoint
    of the XQ-GAN reference code (its keys name the ViT's latent tokens) is ``"reference"``, any other
    ``"llamagen"``.
    """
    if format == "auto":
        format = "reference" if looks_like_reference_checkpoint(source) else "llamagen"
    if format not in CONVERTERS:
        raise CheckpointError(
            f"{source}: unknown checkpoint format {format!r}; from_pretrained converts {', '.join(sorted(CONVERTERS))}"
        )
    presets = (Path(preset),) if preset is not None else DEFAULT_PRESETS[format]
    for preset_path in presets:
        if not preset_path.is_file():
            raise CheckpointError(f"preset {preset_path}: no such file")
    preset_key = hashlib.sha256("".join(_sha256(p) for p in presets).encode()).hexdigest()[:8]
    key = f"{format}-{_sha256(source)[:20]}-{preset_key}"
    final = cache_root() / "converted" / key
    if ckpt.latest_checkpoint(final) is not None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        CONVERTERS[format](source, tmp, preset=presets[0] if len(presets) == 1 else None)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same conversion first: keep theirs
            if ckpt.latest_checkpoint(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_foreign_file(path: Path) -> bool:
    # a .pt inside an xqgan checkpoint folder (state.pt) belongs to that checkpoint
    return path.is_file() and path.suffix.lower() in FOREIGN_SUFFIXES and not (path.parent / ckpt.RUN).is_file()


def _hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """``filename`` of hub repo ``repo_id`` in huggingface_hub's cache, downloaded there when online."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise CheckpointError(
            f"loading {repo_id}/{filename} from the Hugging Face hub needs the huggingface_hub package "
            "(pip install xqgan-core[hub]), or pass the path of a local copy"
        ) from None
    where = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - offline without a cached copy, no network, no such repo or file
        raise _not_cached(f"{filename} of the Hugging Face repo {repo_id}", revision, where, exc, "") from None


def _not_cached(what: str, revision: str | None, where: Path, exc: Exception, remedy: str) -> CheckpointError:
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set: only cached files are used)" if constants.HF_HUB_OFFLINE else ""
    return CheckpointError(
        f"cannot get {what}{'@' + revision if revision else ''}: it is not in the cache at {where}{offline} and "
        f"could not be downloaded ({type(exc).__name__}). Download it on a machine with network access into that "
        f"cache, pass the path of a local copy{remedy}"
    )


def _hub_run_folder(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """The snapshot folder of hub repo ``repo_id`` holding an xqgan run folder (only :data:`RUN_FOLDER_PATTERNS`),
    downloaded into huggingface_hub's cache when online."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise CheckpointError(
            f"loading the run folder of {repo_id} from the Hugging Face hub needs the huggingface_hub package "
            "(pip install xqgan-core[hub]), or pass the path of a local copy"
        ) from None
    where = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=RUN_FOLDER_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline without a cached snapshot, no network, no such repo
        raise _not_cached(f"the run folder of the Hugging Face repo {repo_id}", revision, where, exc,
                          ", or filename=... for a single checkpoint file in that repo") from None
    try:
        ckpt.resolve_checkpoint(folder)
    except CheckpointError as exc:
        raise CheckpointError(
            f"the Hugging Face repo {repo_id}{'@' + revision if revision else ''} (cached at {folder}) holds no "
            f"xqgan run folder ({exc}); for a single checkpoint file in it pass filename=..."
        ) from None
    return folder

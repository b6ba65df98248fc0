"""Token shards: a dataset tokenized once by a frozen tokenizer (``xqgan-run tokenize``), read back by the ``tokens``
data source so generators train without running the tokenizer.

A token folder holds

* ``shard-NNNNN.safetensors``: ``tokens`` (N, L, K) int16 (int32 when a vocabulary exceeds 32767), laid out by the
  tokenizer's ``TokenLayout``; ``labels`` (N,) int64; with ``flip``, ``tokens_flipped`` (N, L, K): the tokens of the
  mirrored images, an augmentation the reader picks with a coin (not extra items). The safetensors metadata records
  the job the shard belongs to (``job``, see ``job_fingerprint``), its ``count`` and the inputs it ``skipped``
  (unreadable images), so an interrupted job skips the shards it already wrote.
* ``index.json``: written last, once every shard exists: format and version, the tokenizer (``run`` as given,
  ``checkpoint``, ``weights`` file and its ``sha256``), the ``layout`` (grid, vocab_sizes, codebooks, axes, scales),
  ``resolution``, ``flip``, the ``data`` description, ``classes`` (label id -> name), ``shards`` (file, count),
  ``count`` and ``skipped``.

Every file is written to a temporary name and renamed into place, so a shard is either complete or absent.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .atomic import write_bytes_atomic, write_text_atomic
from .errors import XQGanError
from .fallback_dataset import Item, ItemKey, coin, parse_key
from .token_layout import TokenLayout

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = [
    "FORMAT", "INDEX", "VERSION", "TokenFolderError", "TokenFolderMismatch", "TokenIndex", "TokenShards",
    "job_fingerprint", "layout_from_json", "layout_to_json", "read_index", "read_shard_meta", "sha256_file",
    "shard_name", "token_dtype", "weights_sha256", "write_index", "write_shard",
]  # fmt: skip

FORMAT = "xqgan-token-shards"
VERSION = 1
INDEX = "index.json"
TOKENS, LABELS, FLIPPED = "tokens", "labels", "tokens_flipped"


class TokenFolderError(XQGanError):
    """A token folder is missing, incomplete or unreadable."""


class TokenFolderMismatch(TokenFolderError):
    """A token folder was made by another tokenizer (or at another layout) than the one it is used with."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def token_dtype(layout: TokenLayout) -> torch.dtype:
    """The narrowest integer type holding every index of ``layout`` (int16 when every vocabulary fits)."""
    return torch.int16 if max(layout.vocab_sizes) <= torch.iinfo(torch.int16).max else torch.int32


def layout_to_json(layout: TokenLayout) -> dict[str, Any]:
    return {
        "grid": list(layout.grid),
        "vocab_sizes": list(layout.vocab_sizes),
        "codebooks": list(layout.codebooks),
        "axes": [[name, size] for name, size in layout.axes],
        "scales": list(layout.scales),
    }


def layout_from_json(data: Mapping[str, Any]) -> TokenLayout:
    return TokenLayout(
        grid=(int(data["grid"][0]), int(data["grid"][1])),
        vocab_sizes=tuple(int(v) for v in data["vocab_sizes"]),
        codebooks=tuple(str(c) for c in data["codebooks"]),
        axes=tuple((str(name), int(size)) for name, size in data.get("axes", ())),
        scales=tuple(int(s) for s in data.get("scales", ())),
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256 (hex), remembered per (path, size, modification time): tokenizer weights can be GBs."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256_of(str(resolved), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the weight file the tokenizer was loaded from (its identity in a token folder)."""
    if tokenizer.weights is None:
        raise ValueError("this tokenizer was not loaded from a checkpoint: it has no weight file to identify it by")
    return sha256_file(tokenizer.weights)


def job_fingerprint(**parts: Any) -> str:
    """A canonical JSON text of what determines a job's shards (tokenizer hash, data, resolution, flip, ...): two
    runs with equal fingerprints write identical shards, so one can continue the other."""
    return json.dumps({"format": FORMAT, "version": VERSION, **parts}, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------------------------
# writing


def write_shard(
    path: Path, tokens: torch.Tensor, labels: torch.Tensor, flipped: torch.Tensor | None, job: str, skipped: list[str]
) -> None:
    """Write one shard atomically (temporary file, fsync, rename): after a crash it is complete or absent."""
    tensors = {TOKENS: tokens.contiguous(), LABELS: labels.to(torch.int64).contiguous()}
    if flipped is not None:
        tensors[FLIPPED] = flipped.contiguous()
    meta = {"format": FORMAT, "job": job, "count": str(int(labels.shape[0])), "skipped": json.dumps(skipped)}
    # bytes written by us (not save_file): the file gets the user's umask, not mode 0600
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=meta))


def read_shard_meta(path: Path) -> dict[str, Any] | None:
    """A shard's metadata (``job``, ``count``, ``skipped``), or None when the file is absent or not a readable shard."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - absent, truncated, not safetensors: safetensors raises its own error type
        return None
    if meta.get("format") != FORMAT or "job" not in meta:
        return None
    return {"job": meta["job"], "count": int(meta.get("count", 0)), "skipped": json.loads(meta.get("skipped", "[]"))}


def write_index(folder: Path, record: dict[str, Any]) -> Path:
    text = json.dumps({"format": FORMAT, "version": VERSION, **record}, indent=2) + "\n"
    return write_text_atomic(folder / INDEX, text)


# ----------------------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class TokenIndex:
    """A token folder's ``index.json`` (see the module docstring)."""

    folder: Path
    layout: TokenLayout
    tokenizer: dict[str, str]
    classes: tuple[str, ...]
    shards: tuple[tuple[str, int], ...]  # (file name, items)
    flip: bool
    resolution: int
    record: dict[str, Any]  # the whole file, for anything else it records

    @property
    def count(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one that made these tokens (``TokenFolderMismatch``): decoding or
        training against another codebook would silently produce garbage."""
        made_by = self.tokenizer.get("sha256", "")
        given = weights_sha256(tokenizer)
        if given != made_by:
            raise TokenFolderMismatch(
                f"{self.folder} was tokenized by another tokenizer: its index.json records weights "
                f"{self.tokenizer.get('weights', '?')} (sha256 {made_by[:12]}...), but the tokenizer in use loads "
                f"{tokenizer.weights} (sha256 {given[:12]}...). Tokenize the data again with this tokenizer "
                f"(xqgan-run tokenize) or use the tokenizer run {self.tokenizer.get('run', '?')!r}."
            )
        layout = tokenizer.layout_for(self.resolution, self.resolution)
        if layout != self.layout:
            raise TokenFolderMismatch(
                f"{self.folder}: the tokens' layout ({self.layout.describe()}) differs from the tokenizer's at "
                f"{self.resolution} px ({layout.describe()})"
            )


def read_index(folder: str | os.PathLike[str]) -> TokenIndex:
    """Read and check a token folder's ``index.json`` (``TokenFolderError`` naming the folder otherwise)."""
    root = Path(folder).expanduser()
    path = root / INDEX
    if not path.is_file():
        hint = " (an unfinished `xqgan-run tokenize`? run it again to complete it)" if any(root.glob("shard-*")) else ""
        raise TokenFolderError(f"{root} is not a token folder: {INDEX} is missing{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenFolderError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TokenFolderError(f"{path} is not the index of a token folder (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise TokenFolderError(f"{path} has version {data.get('version')!r}; this xqgan reads version {VERSION}")
    try:
        index = TokenIndex(
            folder=root,
            layout=layout_from_json(data["layout"]),
            tokenizer={str(k): str(v) for k, v in data["tokenizer"].items()},
            classes=tuple(str(c) for c in data["classes"]),
            shards=tuple((str(s["file"]), int(s["count"])) for s in data["shards"]),
            flip=bool(data["flip"]),
            resolution=int(data["resolution"]),
            record=data,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenFolderError(f"{path} is damaged: {type(exc).__name__}: {exc}") from exc
    missing = [name for name, _ in index.shards if not (root / name).is_file()]
    if missing:
        raise TokenFolderError(f"{root}: shard file(s) listed in {INDEX} are missing: {', '.join(missing[:5])}")
    return index


class TokenShards(torch.utils.data.Dataset):
    """Items ``{"tokens": (L, K) int64, "label": int, "index": int}`` of a token folder, read from the shards
    through memory maps (nothing is loaded up front).

    ``items``: the item numbers this dataset serves (a split), all by default. Keys are ``ItemKey``s: with
    ``flip`` and flipped copies in the folder, a coin drawn from the key's seed (the global RNG for an int key)
    picks the mirrored image's tokens.
    """

    def __init__(self, index: TokenIndex, items: Sequence[int] | None = None, flip: bool = True) -> None:
        self.index = index
        self.items = list(range(index.count)) if items is None else list(items)
        self.flip = flip and index.flip
        self._starts = [0]
        for _, n in index.shards:
            self._starts.append(self._starts[-1] + n)
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: ItemKey) -> Item:
        position, rng = parse_key(key)
        item = self.items[operator.index(position)]
        shard = bisect.bisect_right(self._starts, item) - 1
        row = item - self._starts[shard]
        f = self._handle(shard)
        name = FLIPPED if self.flip and coin(rng) else TOKENS
        tokens = f.get_slice(name)[row : row + 1][0].to(torch.int64)
        label = int(f.get_slice(LABELS)[row : row + 1][0])
        return {"tokens": tokens, "label": label, "index": item}

    def _handle(self, shard: int) -> Any:
        if shard not in self._open:
            path = self.index.folder / self.index.shards[shard][0]
            try:
                self._open[shard] = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
                raise TokenFolderError(f"cannot read token shard {path}: {exc}") from exc
        return self._open[shard]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) reopen the files themselves
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

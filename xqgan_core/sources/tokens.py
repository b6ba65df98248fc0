"""The ``tokens`` data source: a token folder written by ``xqgan-run tokenize``, for training generators without
running the tokenizer (see ``xqgan_core.token_shards``).

Items are ``{"tokens": (L, K) int64, "label": int, "index": int}``; keys are ints or ``(index, seed)`` like the
image sources' (the seed picks the mirrored image's tokens when the folder has them and ``flip`` is on).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import at_least, between, config, non_empty, option, require_checked
from ..errors import ConfigError
from ..interfaces import DataSource
from ..token_layout import TokenLayout
from ..token_shards import TokenFolderError, TokenIndex, TokenShards, read_index

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


class TokenData(DataSource):
    """A token folder (``xqgan-run tokenize --out``): token sequences and class labels, with a seeded held-out split."""

    plugin_api = 1

    @config
    class Config:
        path: str = option(
            help="Token folder written by `xqgan-run tokenize` (holds index.json).", validator=non_empty()
        )
        holdout: float = option(
            0.0,
            help="Fraction of items held out for evaluation (at least 1 when > 0; 0 = evaluate on training items).",
            validator=between(0.0, 0.9),
        )
        split_seed: int = option(
            0, help="Seed of the permutation that picks held-out items (and the max_items subset)."
        )
        flip: bool = option(
            True, help="Use the mirrored images' tokens for half the training items when the folder has them (--flip)."
        )
        max_items: int = option(
            0, help="Use at most this many items, a seeded random subset (0 = all).", validator=at_least(0)
        )

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        cfg = self.config
        require_checked(cfg, "data")
        try:
            self.index: TokenIndex = read_index(Path(cfg.path))
        except TokenFolderError as exc:
            raise ConfigError([f"data.path: {exc}"]) from None
        n = self.index.count
        if n == 0:
            raise ConfigError([f"data.path: {self.index.folder} holds no tokens (every input image was unreadable?)"])
        order = np.random.default_rng(cfg.split_seed).permutation(n)[: cfg.max_items or n]
        n_eval = 0
        if cfg.holdout > 0 and len(order) > 1:  # at least one held out, at least one left for training
            n_eval = min(len(order) - 1, max(1, round(cfg.holdout * len(order))))
        self._eval_items = sorted(order[:n_eval].tolist()) or sorted(order.tolist())
        self._train_items = sorted(order[n_eval:].tolist())

    @property
    def layout(self) -> TokenLayout:
        return self.index.layout

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def class_names(self) -> Sequence[str]:
        """Label id -> name, as recorded by the tokenization (sorted class folders, sample photographs, ...)."""
        return tuple(self.index.classes)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """``TokenFolderMismatch`` when ``tokenizer`` is not the one that made these tokens."""
        self.index.check_tokenizer(tokenizer)

    def train_set(self) -> torch.utils.data.Dataset:
        return TokenShards(self.index, self._train_items, flip=self.config.flip)

    def eval_set(self) -> torch.utils.data.Dataset:
        return TokenShards(self.index, self._eval_items, flip=False)

    def problems(self) -> Sequence[str]:
        """Images the tokenization skipped (path: reason), as recorded in index.json."""
        return [str(s) for s in self.index.record.get("skipped", [])]

"""A run's logs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard scalars and images."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np


class RunLog:
    """Writes on the main process only (``enabled``); every method is a no-op elsewhere."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - TensorBoard is optional
                warnings.warn(f"TensorBoard logging off ({exc}); metrics.jsonl is still written", stacklevel=2)

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "split": split, "time": time.time(), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def event(self, step: int, kind: str, detail: str) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "split": "event", "event": kind, "detail": detail}) + "\n")

    def image(self, step: int, tag: str, path: Path) -> None:
        if self.tb is not None:
            from PIL import Image

            arr = np.asarray(Image.open(path).convert("RGB"))
            self.tb.add_image(tag, arr, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

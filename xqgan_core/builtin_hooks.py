"""Hook plugins that ship with the core. Switched on per run: ``[[hooks]] use = "step-timer"``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .config import config, option, positive
from .hooks import HookPlugin, hookimpl


class StepTimer(HookPlugin):
    """Measures wall time spent in training steps; the total survives resumes (stored in checkpoints)."""

    plugin_api = 1

    @config
    class Config:
        report_every: int = option(100, help="Add the mean step time to the metrics every N steps.", validator=positive())

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.total_s = 0.0
        self.window: list[float] = []

    @hookimpl
    def xqgan_wrap_train_step(self, step_fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return step_fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.total_s += elapsed
                self.window.append(elapsed)

        return timed

    @hookimpl
    def xqgan_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.config.report_every == 0 and self.window:
            metrics["time/step_s"] = sum(self.window) / len(self.window)
            metrics["time/total_train_s"] = self.total_s
            self.window.clear()

    @hookimpl
    def xqgan_checkpoint_state(self) -> dict[str, Any]:
        return {"total_s": self.total_s}

    @hookimpl
    def xqgan_load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.total_s = float(state.get("total_s", 0.0))

    @hookimpl
    def xqgan_report_header(self, registry: Any) -> str:
        return f"step-timer: mean step time every {self.config.report_every} steps; {self.total_s:.0f} s trained so far"

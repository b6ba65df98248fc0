"""Graceful stop: SIGTERM (cluster preemption, ``scancel``, ``kill``) or a first Ctrl-C asks the run to stop at the
next step boundary, where the engine saves a checkpoint and exits; the same command then resumes exactly there.
A second Ctrl-C interrupts at once (the last periodic checkpoint is still intact)."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch

__all__ = ["StopSignals"]

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that records the first stop signal instead of dying of it (main thread only; elsewhere,
    e.g. inside a notebook worker thread, it records nothing and signals keep their usual effect)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if signum == signal.SIGINT:  # a second Ctrl-C is an immediate KeyboardInterrupt
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, world: int, device: torch.device) -> int | None:
        """The signal to stop on, agreed by every rank (a collective when ``world > 1``: call it on every rank at
        the same step), or None to continue."""
        if world == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

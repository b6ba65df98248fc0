"""Exceptions raised by the core. None of them import torch, so the CLI can report them cheaply."""

from __future__ import annotations

from collections.abc import Iterable


class XQGanError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(XQGanError):
    """One or more problems in a run file, each naming the exact key path.

    All problems found in one pass are collected, so a user fixes them together instead of one per run.
    """

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class PluginError(XQGanError):
    """A component could not be found, was ambiguous, or could not be loaded."""


class PluginNotFoundError(PluginError):
    pass


class AmbiguousPluginError(PluginError):
    pass


class PluginLoadError(PluginError):
    pass


class PluginAPIError(PluginError):
    pass


class CheckpointError(XQGanError):
    """A checkpoint is missing, unreadable, untrusted or does not match the run file."""


class TrainingError(XQGanError):
    """Training cannot continue (e.g. repeated non-finite losses); the last good checkpoint is intact."""


class ImageReadError(XQGanError):
    """One image file could not be read. The message reads ``path: reason``."""

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        # A single positional message keeps it re-raisable by DataLoader worker error forwarding.
        super().__init__(message)
        self.path = path
        self.reason = reason


class NoReadableImageError(XQGanError):
    """Every image of a dataset failed to load."""


class RunInterrupted(XQGanError):
    """Training stopped on a signal (SIGTERM from a scheduler, Ctrl-C) after saving a checkpoint at the current step.

    ``signum`` is the signal; the CLI exits with ``128 + signum``, the shell convention for "killed by signal".
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

"""Lifecycle hooks (pluggy) for one-to-many behaviour: step wrappers, extra checkpoint state, logging sinks.

A hook plugin is a component of kind ``hooks`` (entry-point group ``xqgan.hooks``): a class with a ``Config``,
a ``plugin_api`` and methods marked ``@hookimpl``. It is switched on per run by name::

    [[hooks]]
    use = "my-logger"
    path = "extra.log"

The engine calls the hooks below; every hook is optional for a plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from .config import config

PROJECT = "xqgan"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    @hookspec
    def xqgan_configure(self, registry: Any) -> None:
        """The run file was validated; nothing has been built yet."""

    @hookspec
    def xqgan_model_built(self, model: Any, registry: Any) -> None:
        """The tokenizer (and discriminators) exist; called before optimizers are created."""

    @hookspec
    def xqgan_wrap_train_step(self, step_fn: Callable[..., Any]) -> Callable[..., Any] | None:
        """Return a function wrapping ``step_fn`` (or None to leave it). Wrappers from all plugins are chained."""

    @hookspec
    def xqgan_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """An optimizer step finished; ``metrics`` holds its scalars."""

    @hookspec
    def xqgan_checkpoint_state(self) -> dict[str, Any] | None:
        """Extra JSON-serialisable state to store in each checkpoint (namespaced by the plugin's name)."""

    @hookspec
    def xqgan_load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what ``xqgan_checkpoint_state`` returned, when resuming."""

    @hookspec
    def xqgan_report_header(self, registry: Any) -> list[str] | str | None:
        """Lines to print in the run's header (e.g. a tracking URL)."""


def make_plugin_manager(plugins: Iterable[tuple[str, Any]] = ()) -> pluggy.PluginManager:
    """A plugin manager with the xqgan hook specs and the given ``(name, instance)`` plugins registered."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    pm.check_pending()  # a misspelt hook name fails here, not silently never runs
    return pm


def chain_step_wrappers(pm: pluggy.PluginManager, step_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every plugin's ``xqgan_wrap_train_step`` in registration order."""
    for impl in pm.hook.xqgan_wrap_train_step.get_hookimpls():
        wrapped = impl.function(step_fn=step_fn)
        if wrapped is not None:
            step_fn = wrapped
    return step_fn


class HookPlugin:
    """Base class of a hook plugin component (optional; any class with ``Config`` and ``plugin_api`` works).

    Subclasses declare ``plugin_api`` themselves (the version they were written against) and may override
    ``Config`` with their own options.
    """

    @config
    class Config:
        pass

    def __init__(self, config: Any) -> None:
        self.config = config

"""Discovery of components through Python entry points.

One entry-point group per kind (``xqgan.quantizer``, ``xqgan.encoder``, ...); each entry points at a class.
Listing reads package metadata only and imports nothing heavy: a component's module is imported when a run
selects it (``Entry.load``) or when ``xqgan-run --list-plugins --check`` asks for it.

This module must stay free of torch imports: ``xqgan-run --list-plugins`` relies on that.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any

from .errors import AmbiguousPluginError, PluginAPIError, PluginLoadError, PluginNotFoundError

#: Version of the component interface. A component class declares the version it was written against in its
#: ``plugin_api`` class attribute; a mismatch is refused at load time with an "upgrade X" message.
PLUGIN_API = 1

#: kind -> entry-point group. ``hooks`` are pluggy hook plugins, switched on by name in the run file.
KINDS: dict[str, str] = {
    "encoder": "xqgan.encoder",
    "decoder": "xqgan.decoder",
    "quantizer": "xqgan.quantizer",
    "discriminator": "xqgan.discriminator",
    "aligner": "xqgan.aligner",
    "generator": "xqgan.generator",
    "adapter": "xqgan.adapter",
    "device": "xqgan.device",
    "data": "xqgan.data",
    "hooks": "xqgan.hooks",
}


@dataclass(frozen=True)
class Entry:
    """One component as advertised by an installed distribution (metadata only, nothing imported)."""

    kind: str
    name: str
    target: str  # "module:Class"
    distribution: str
    version: str
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    def load(self) -> type:
        """Import the component's module and return its class, checking the plugin API version and base class."""
        if "cls" in self._loaded:
            return self._loaded["cls"]
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin is reported the same way
            raise PluginLoadError(
                f"{self.kind} '{self.name}' from distribution {self.distribution} {self.version} failed to load "
                f"({self.target}): {type(exc).__name__}: {exc}"
            ) from exc
        check_component_class(self, obj)
        self._loaded["cls"] = obj
        return obj


def check_component_class(entry: Entry, cls: Any) -> None:
    """Refuse a class that does not declare a matching ``plugin_api`` or lacks a ``Config``."""
    api = getattr(cls, "plugin_api", None)
    who = f"{entry.kind} '{entry.name}' ({entry.distribution} {entry.version})"
    if not isinstance(api, int):
        raise PluginAPIError(f"{who}: {entry.target} does not declare an integer `plugin_api`; is it a component class?")
    if api < PLUGIN_API:
        raise PluginAPIError(
            f"{who} was written for plugin API {api}, but xqgan-core {_core_version()} speaks API {PLUGIN_API}: "
            f"upgrade {entry.distribution} (pip install -U {entry.distribution})"
        )
    if api > PLUGIN_API:
        raise PluginAPIError(
            f"{who} needs plugin API {api}, but xqgan-core {_core_version()} speaks API {PLUGIN_API}: "
            f"upgrade xqgan-core (pip install -U xqgan-core)"
        )
    if not hasattr(cls, "Config"):
        raise PluginAPIError(f"{who}: {entry.target} has no `Config` class")
    if entry.kind != "hooks":  # the plugin's module is imported by now, so importing the interfaces costs nothing
        from .interfaces import INTERFACES

        base = INTERFACES[entry.kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginAPIError(f"{who}: {entry.target} must subclass xqgan_core.interfaces.{base.__name__}")


def _core_version() -> str:
    try:
        return md.version("xqgan-core")
    except md.PackageNotFoundError:
        return "(not installed)"


class Catalog:
    """All components offered by the installed distributions, read from entry-point metadata."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries

    @classmethod
    def discover(cls) -> Catalog:
        importlib.invalidate_caches()  # pick up distributions installed since the interpreter started
        seen: set[tuple[str, str, str, str]] = set()
        entries: list[Entry] = []
        groups = {group: kind for kind, group in KINDS.items()}
        for dist in md.distributions():
            dist_name = dist.metadata["Name"] or "?"
            for ep in dist.entry_points:
                kind = groups.get(ep.group)
                if kind is None:
                    continue
                key = (kind, ep.name, ep.value, dist_name.lower())
                if key in seen:  # the same distribution found twice on sys.path (e.g. editable + egg-link)
                    continue
                seen.add(key)
                entries.append(Entry(kind, ep.name, ep.value, dist_name, dist.version))
        entries.sort(key=lambda e: (e.kind, e.name, e.distribution))
        return cls(entries)

    def names(self, kind: str) -> list[str]:
        return sorted({e.name for e in self.entries if e.kind == kind})

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def resolve(self, kind: str, name: str, package: str | None = None) -> Entry:
        """Find exactly one entry for ``kind``/``name``; ``package`` pins the distribution when several offer it."""
        if kind not in KINDS:
            raise PluginNotFoundError(f"unknown component kind '{kind}'; kinds are: {', '.join(KINDS)}")
        matches = [e for e in self.entries if e.kind == kind and e.name == name]
        if package is not None:
            pinned = [e for e in matches if _norm(e.distribution) == _norm(package)]
            if not pinned:
                offered = ", ".join(e.distribution for e in matches) or "no installed distribution"
                raise PluginNotFoundError(
                    f"{kind} '{name}' is not offered by distribution '{package}' (offered by: {offered})"
                )
            matches = pinned
        if not matches:
            installed = self.names(kind)
            close = difflib.get_close_matches(name, installed, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise PluginNotFoundError(
                f"no {kind} named '{name}'.{hint} Installed {kind} components: {', '.join(installed) or 'none'}"
                f" (a plugin is installed with `pip install xqgan-plugin-<name>`)"
            )
        if len(matches) > 1:
            dists = ", ".join(f"{e.distribution} {e.version} ({e.target})" for e in matches)
            raise AmbiguousPluginError(
                f"{kind} '{name}' is offered by {len(matches)} distributions: {dists}. Pin one in the run file, "
                f'e.g. package = "{matches[0].distribution}", or uninstall the other'
            )
        return matches[0]


def _norm(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


_catalog: Catalog | None = None


def catalog(refresh: bool = False) -> Catalog:
    """The process-wide catalog; ``refresh=True`` re-reads metadata (after installing a plugin at run time)."""
    global _catalog
    if _catalog is None or refresh:
        _catalog = Catalog.discover()
    return _catalog

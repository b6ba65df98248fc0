"""``Registry``: a validated run file, and ``build`` for programmatic use.

>>> from xqgan_core import Registry, build
>>> vq = build("quantizer", {"use": "vq", "codebook_size": 4096, "dim": 32})
>>> reg = Registry.from_toml("registry.toml", overrides=["quantizer.codebook_size=8192"])
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .catalog import Catalog, catalog
from .config import ComponentSpec, to_plain, validate, validate_component
from .errors import ConfigError
from .run_checks import cross_table_problems, nesting_problems, not_implemented_tables
from .runfile import RunConfig, complete
from .tomlwrite import dumps as toml_dumps

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Registry:
    """A run file after strict validation: every component resolved to an installed class, nothing built yet."""

    def __init__(self, config: RunConfig, source: str | None = None) -> None:
        self.config = config
        self.source = source

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, overrides: Iterable[str] = (), cat: Catalog | None = None) -> Registry:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"cannot read run file: {exc.strerror or exc}"], source=str(path)) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 1].hex()
            problem = f"not UTF-8 text: byte 0x{bad} at byte position {exc.start} cannot be decoded; save it as UTF-8"
            raise ConfigError([problem], source=str(path)) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], source=str(path)) from None
        except RecursionError:  # the parser recurses per nested array / inline table
            raise ConfigError(["tables / arrays nested too deeply to parse"], source=str(path)) from None
        return cls.from_dict(data, overrides=overrides, source=str(path), cat=cat)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        overrides: Iterable[str] = (),
        source: str | None = None,
        cat: Catalog | None = None,
    ) -> Registry:
        problems = nesting_problems(data)  # before anything walks it recursively (the copy for overrides does)
        if problems:
            raise ConfigError(problems, source=source)
        data = apply_overrides(data, overrides, source)
        problems = nesting_problems(data) + not_implemented_tables(data)
        if problems:
            raise ConfigError(problems, source=source)
        cfg, problems = validate(RunConfig, data, "", cat or catalog())
        if not problems:
            problems = cross_table_problems(cfg)
        if problems:
            raise ConfigError(problems, source=source)
        return cls(complete(cfg), source)

    # -- introspection -----------------------------------------------------------------------------------------
    def components(self) -> list[tuple[str, ComponentSpec]]:
        """Every selected component with its key path, nested ones included (for provenance records)."""
        found: list[tuple[str, ComponentSpec]] = []

        def walk(obj: Any, path: str) -> None:
            if isinstance(obj, ComponentSpec):
                found.append((path, obj))
                obj = obj.config
            if isinstance(obj, tuple):
                for i, item in enumerate(obj):
                    walk(item, f"{path}[{i}]")
                return
            if hasattr(type(obj), "__attrs_attrs__"):
                for f in type(obj).__attrs_attrs__:
                    walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)

        walk(self.config, "")
        return found

    def provenance(self) -> dict[str, dict[str, str]]:
        """key path -> {use, distribution, version}, plus the core itself."""
        out = {"xqgan-core": {"distribution": "xqgan-core", "version": _version("xqgan-core")}}
        for path, spec in self.components():
            out[path] = {"use": spec.use, "distribution": spec.entry.distribution, "version": spec.entry.version}
        return out

    def to_dict(self, with_provenance: bool = False) -> dict[str, Any]:
        """The resolved run file: every option with its effective value (defaults filled in)."""
        return to_plain(self.config, with_provenance)

    def to_toml(self, with_provenance: bool = True) -> str:
        header = "# Resolved run file written by xqgan: every option with its effective value.\n"
        if self.source:
            header += f"# Source: {self.source}\n"
        return header + toml_dumps(self.to_dict(with_provenance))

    def build(self, section: str, index: int | None = None) -> Any:
        """Instantiate the component selected in ``section`` (``index`` for arrays like ``discriminators``)."""
        spec = getattr(self.config, section)
        if index is not None:
            spec = spec[index]
        if spec is None:
            raise ConfigError([f"{section}: no component selected in this run file"], source=self.source)
        return spec.build()


def build(kind: str, table: Mapping[str, Any] | str, cat: Catalog | None = None) -> Any:
    """Validate one component table and instantiate it: ``build("quantizer", {"use": "vq", "dim": 32})``."""
    return validate_component(kind, table, kind, cat).build()


# ----------------------------------------------------------------------------------------------------------------
# --set overrides

_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)(?:\[(\d+)\])?$")


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], source: str | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied (value parsed as TOML, else a string)."""
    out = copy.deepcopy(dict(data))
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. quantizer.codebook_size=8192")
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare words such as `vq` are taken as strings
        except RecursionError:
            problems.append(f"--set {key.strip()}=...: the value is nested too deeply to parse")
            continue
        err = _set_path(out, key.strip().split("."), value)
        if err:
            problems.append(f"--set {item!r}: {err}")
    if problems:
        raise ConfigError(problems, source=source)
    return out


def _set_path(root: dict[str, Any], parts: list[str], value: Any) -> str | None:
    node: Any = root
    for depth, part in enumerate(parts):
        m = _SEGMENT.match(part)
        if not m:
            return f"'{part}' is not a valid key"
        name, index = m.group(1), m.group(2)
        last = depth == len(parts) - 1
        if index is None:
            if last:
                node[name] = value
                return None
            node[name] = _as_table(node.get(name, {}))
            node = node[name]
            if not isinstance(node, dict):
                return f"'{name}' is not a table"
        else:
            arr = node.get(name)
            i = int(index)
            if not isinstance(arr, list) or i >= len(arr):
                return f"'{name}' has no element [{i}]"
            if last:
                arr[i] = value
                return None
            arr[i] = _as_table(arr[i])
            node = arr[i]
            if not isinstance(node, dict):
                return f"'{name}[{i}]' is not a table"
    return None


def _as_table(node: Any) -> Any:
    """A component written in short form (``quantizer = "vq"``, ``discriminators = ["patchgan"]``) as its table,
    so options can be set inside it; anything else unchanged."""
    return {"use": node} if isinstance(node, str) else node


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"

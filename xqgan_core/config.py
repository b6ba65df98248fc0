"""Strict, error-collecting validation of run-file tables against attrs ``Config`` classes.

Every component class declares a frozen, keyword-only attrs ``Config``; each field carries a help text
(``option(..., help=...)``). ``validate`` turns a plain dict (from TOML or Python) into a Config instance:

* types are checked strictly: ``"16"`` is not an int, ``3.7`` is not an int, ``"no"`` is not a bool
  (an int is accepted where a float is asked for, since no information is lost);
* every problem in every table is collected with its exact key path before anything is built;
* nested component tables (``[quantizer.branch.code]``) are resolved through the catalog and validated against
  their own Config, recursively.

Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

import attrs

from .catalog import Catalog, Entry, catalog
from .errors import ConfigError, PluginError

HELP = "xqgan_help"
KIND = "xqgan_kind"
RESERVED = ("use", "package")


# ----------------------------------------------------------------------------------------------------------------
# Declaring configs


def config(cls: type) -> type:
    """Class decorator for a component's ``Config``: frozen, keyword-only attrs class."""
    return attrs.frozen(kw_only=True)(cls)


def option(
    default: Any = attrs.NOTHING,
    *,
    help: str,  # noqa: A002 - mirrors argparse
    validator: Callable[[Any, Any, Any], None] | list | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field with a help text (shown by ``xqgan-run describe``) and optional validators."""
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata={HELP: help})
    return attrs.field(default=default, validator=validator, metadata={HELP: help})


def component(kind: str, *, help: str, default: Any = attrs.NOTHING, many: bool = False) -> Any:  # noqa: A002
    """A field holding another component's table (``use = "name"`` + its options); ``many`` for an array of tables.

    The field always holds a validated ``ComponentSpec`` (or None): a table or a name given when the Config is made
    in Python (``Config()`` with a ``default={"use": "vq"}``, ``Config(code={"use": "lfq", "bits": 8})``) is
    validated through the catalog on construction, and a bad one raises ConfigError. Run files are validated by
    ``validate``, which hands over specs already.
    """
    meta = {HELP: help, KIND: kind}
    if many:
        return attrs.field(factory=tuple, metadata=meta, converter=_to_specs(kind))
    return attrs.field(default=default, metadata=meta, converter=_to_spec(kind))


def _to_spec(kind: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value is None or isinstance(value, ComponentSpec):
            return value
        return validate_component(kind, value)

    return convert


def _to_specs(kind: str) -> Callable[[Any], Any]:
    one = _to_spec(kind)

    def convert(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ConfigError([f"{kind}: expected an array of {kind} tables, got {_describe(value)}"])
        return tuple(one(item) for item in value)

    return convert


def section(cls: type, *, help: str) -> Any:  # noqa: A002
    """A nested plain table (not a component) whose keys are checked against ``cls``; all defaults by default."""
    return attrs.field(factory=cls, metadata={HELP: help})


@attrs.frozen
class ComponentSpec:
    """A validated component table: which class to build and its validated Config."""

    kind: str
    use: str
    entry: Entry = attrs.field(repr=False, eq=False)
    config: Any

    @property
    def cls(self) -> type:
        return self.entry.load()

    def build(self) -> Any:
        """Instantiate the component (``cls(config)``)."""
        return self.cls(self.config)

    def to_dict(self, with_provenance: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"use": self.use}
        if with_provenance:
            out["package"] = self.entry.distribution
        out.update(to_plain(self.config, with_provenance))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Validators with messages that read well after a key path


def _validator(check: Callable[[Any], bool], message: str) -> Callable[[Any, Any, Any], None]:
    def run(_inst: Any, _attr: Any, value: Any) -> None:
        if value is not None and not check(value):
            raise ValueError(f"{message}, got {value!r}")

    run.__doc__ = message
    return run


def positive() -> Callable[[Any, Any, Any], None]:
    return _validator(lambda v: v > 0, "must be > 0")


def at_least(lo: float) -> Callable[[Any, Any, Any], None]:
    return _validator(lambda v: v >= lo, f"must be >= {lo}")


def between(lo: float, hi: float) -> Callable[[Any, Any, Any], None]:
    return _validator(lambda v: lo <= v <= hi, f"must be between {lo} and {hi}")


def non_empty() -> Callable[[Any, Any, Any], None]:
    return _validator(lambda v: len(v) > 0, "must not be empty")


def each(inner: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """Apply ``inner`` to every element of a sequence option."""

    def run(inst: Any, attr: Any, value: Any) -> None:
        for i, v in enumerate(value or ()):
            try:
                inner(inst, attr, v)
            except ValueError as exc:
                raise ValueError(f"element {i}: {exc}") from None

    return run


# ----------------------------------------------------------------------------------------------------------------
# Validation


def validate(cls: type, data: Any, path: str = "", cat: Catalog | None = None) -> tuple[Any, list[str]]:
    """Check ``data`` against attrs class ``cls``; return (instance or None, problems)."""
    cat = cat or catalog()
    where = path or "(top level)"
    if not isinstance(data, Mapping):
        return None, [f"{where}: expected a table, got {_describe(data)}"]
    problems: list[str] = []
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            problems.append(_unknown_key(path, key, cls, list(fields)))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if f.default is attrs.NOTHING:
                problems.append(f"{key_path}: required option is missing ({f.metadata.get(HELP, '')})".rstrip(" ()"))
            elif f.metadata.get(KIND) and isinstance(_default_of(f), Mapping):
                value, errs = _check_component(f.metadata[KIND], _default_of(f), key_path, cat)
                problems += errs
                values[name] = value
            continue
        value, errs = _check(data[name], hints[name], f, key_path, cat)
        if errs:
            problems += errs
            continue
        if f.validator is not None:
            try:
                f.validator(None, f, value)
            except (ValueError, TypeError) as exc:
                problems.append(f"{key_path}: {exc}")
                continue
        values[name] = value
    if problems:
        return None, problems
    try:
        inst = cls(**values)
    except (ValueError, TypeError) as exc:
        return None, [f"{where}: {exc}"]
    check = getattr(inst, "check", None)
    if callable(check):
        problems += [f"{where}: {p}" for p in check()]
    return (None if problems else inst), problems


def require_checked(cfg: Any, path: str) -> None:
    """Run a Config's own ``check()`` (cross-field rules) for a config built in Python without ``validate``, which
    already runs it for run files; raise ConfigError with each problem under ``path``."""
    check = getattr(cfg, "check", None)
    problems = check() if callable(check) else []
    if problems:
        raise ConfigError([f"{path}.{p}" for p in problems])


def validate_component(kind: str, table: Any, path: str | None = None, cat: Catalog | None = None) -> ComponentSpec:
    """Validate one component table (``{"use": ..., **options}``); raise ConfigError listing every problem."""
    spec, problems = _check_component(kind, table, path or kind, cat or catalog())
    if problems:
        raise ConfigError(problems)
    return spec


def _check_component(kind: str, table: Any, path: str, cat: Catalog) -> tuple[Any, list[str]]:
    if isinstance(table, str):  # shorthand: `quantizer = "vq"` means `[quantizer] use = "vq"`
        table = {"use": table}
    if not isinstance(table, Mapping):
        return None, [f"{path}: expected a {kind} table with `use = \"name\"`, got {_describe(table)}"]
    use = table.get("use")
    if not isinstance(use, str):
        names = ", ".join(cat.names(kind)) or "none installed"
        return None, [f"{path}.use: missing or not a string; pick a {kind} ({names})"]
    package = table.get("package")
    if package is not None and not isinstance(package, str):
        return None, [f"{path}.package: must be a distribution name string, got {_describe(package)}"]
    try:
        entry = cat.resolve(kind, use, package)
        cls = entry.load()
    except PluginError as exc:
        return None, [f"{path}.use: {exc}"]
    options = {k: v for k, v in table.items() if k not in RESERVED}
    cfg, problems = validate(cls.Config, options, path, cat)
    if problems:
        return None, problems
    return ComponentSpec(kind=kind, use=use, entry=entry, config=cfg), []


def _check(value: Any, tp: Any, f: Any, path: str, cat: Catalog) -> tuple[Any, list[str]]:
    kind = f.metadata.get(KIND) if f is not None else None
    if kind is not None:
        if _is_sequence_type(tp):
            if not isinstance(value, (list, tuple)):
                return None, [f"{path}: expected an array of {kind} tables ([[{path}]]), got {_describe(value)}"]
            out, problems = [], []
            for i, item in enumerate(value):
                spec, errs = _check_component(kind, item, f"{path}[{i}]", cat)
                out.append(spec)
                problems += errs
            return tuple(out), problems
        return _check_component(kind, value, path, cat)
    return _check_type(value, tp, path, cat)


def _check_type(value: Any, tp: Any, path: str, cat: Catalog) -> tuple[Any, list[str]]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value, []
    if attrs.has(tp):
        return validate(tp, value, path, cat)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value, []
        return None, [f"{path}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}"]
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None, []
        errors: list[str] = []
        for arm in (a for a in args if a is not type(None)):
            out, errs = _check_type(value, arm, path, cat)
            if not errs:
                return out, []
            errors += errs
        return None, errors[:1] if len(errors) == 1 else [f"{path}: {_describe(value)} matches none of {_type_name(tp)}"]
    if tp is bool:
        return (value, []) if isinstance(value, bool) else (None, [_type_error(path, "a boolean (true/false)", value)])
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, []) if ok else (None, [_type_error(path, "an integer", value)])
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), []) if ok else (None, [_type_error(path, "a number", value)])
    if tp is str:
        return (value, []) if isinstance(value, str) else (None, [_type_error(path, "a string", value)])
    if _is_sequence_type(tp):
        if not isinstance(value, (list, tuple)):
            return None, [_type_error(path, f"an array ({_type_name(tp)})", value)]
        elem = args[0] if args else Any
        out, problems = [], []
        for i, item in enumerate(value):
            v, errs = _check_type(item, elem, f"{path}[{i}]", cat)
            out.append(v)
            problems += errs
        return tuple(out), problems
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            return None, [_type_error(path, "a table", value)]
        elem = args[1] if len(args) == 2 else Any
        out_d, problems = {}, []
        for k, item in value.items():
            v, errs = _check_type(item, elem, _join(path, str(k)), cat)
            out_d[k] = v
            problems += errs
        return out_d, problems
    raise TypeError(f"{path}: unsupported option type {tp!r} in a Config class")


def _is_sequence_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (tuple, list) or tp in (tuple, list)


def _default_of(f: Any) -> Any:
    d = f.default
    return d.factory() if isinstance(d, attrs.Factory) else d  # type: ignore[attr-defined]


def _unknown_key(path: str, key: str, cls: type, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{_join(path, str(key))}: unknown option.{hint} Valid options here: {', '.join(known) or 'none'}"


def _type_error(path: str, expected: str, value: Any) -> str:
    return f"{path}: expected {expected}, got {_describe(value)}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ----------------------------------------------------------------------------------------------------------------
# Back to plain data, and self-description


def to_plain(obj: Any, with_provenance: bool = False) -> Any:
    """A validated config as plain TOML-able data (tuples become lists, None values are dropped)."""
    if isinstance(obj, ComponentSpec):
        return obj.to_dict(with_provenance)
    if attrs.has(type(obj)):
        out = {}
        for f in attrs.fields(type(obj)):
            v = to_plain(getattr(obj, f.name), with_provenance)
            if v is not None:
                out[f.name] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, with_provenance) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v, with_provenance) for k, v in obj.items()}
    return obj


@attrs.frozen
class OptionDoc:
    name: str
    type: str
    default: str
    help: str


def describe_config(cls: type, prefix: str = "") -> list[OptionDoc]:
    """Every option of ``cls`` (flattening plain nested sections) with its type, default and help."""
    docs: list[OptionDoc] = []
    hints = typing.get_type_hints(cls)
    for f in attrs.fields(cls):
        name = _join(prefix, f.name)
        tp = hints[f.name]
        kind = f.metadata.get(KIND)
        default = "(required)" if f.default is attrs.NOTHING else _fmt_default(_default_of(f))
        if kind:
            type_name = f"{kind} table" + ("s" if _is_sequence_type(tp) else "")
            docs.append(OptionDoc(name, type_name, default, f.metadata.get(HELP, "")))
        elif attrs.has(tp):
            docs.append(OptionDoc(name, "table", "", f.metadata.get(HELP, "")))
            docs += describe_config(tp, name)
        else:
            docs.append(OptionDoc(name, _type_name(tp), default, f.metadata.get(HELP, "")))
    return docs


def _fmt_default(value: Any) -> str:
    if attrs.has(type(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt_default(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_fmt_default(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "(none)"
    return repr(value) if isinstance(value, str) else str(value)


def missing_help(cls: type, prefix: str = "") -> list[str]:
    """Option paths of ``cls`` (recursively) that lack a help text: the test kit refuses them."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in attrs.fields(cls):
        if not f.metadata.get(HELP):
            out.append(_join(prefix, f.name))
        if attrs.has(hints[f.name]) and not f.metadata.get(KIND):
            out += missing_help(hints[f.name], _join(prefix, f.name))
    return out

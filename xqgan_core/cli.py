"""``xqgan-run``: train from a run file, validate it, list and describe plugins, use a trained tokenizer.

Exit codes: 0 success, 2 bad run file or arguments, 1 runtime failure.
Heavy modules (torch, the engine) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable, Sequence

from .errors import ConfigError, PluginError, RunInterrupted, XQGanError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

USAGE = """\
xqgan-run RUN.toml [--set KEY=VALUE ...]          train (or resume) the run described by RUN.toml
xqgan-run validate RUN.toml [--set KEY=VALUE ...] check a run file, print the resolved options
xqgan-run describe KIND NAME                      options of one component (types, defaults, help)
xqgan-run --list-plugins [--check] [--json]       installed components (--check imports each one)
xqgan-run reconstruct CKPT IMAGE... --out DIR     write reconstructions (--force: replace existing files)
xqgan-run eval CKPT --data FOLDER                 metrics of a trained tokenizer on a folder of images
xqgan-run convert llamagen SRC.pt --out DIR       a released LlamaGen VQ checkpoint -> an xqgan run folder
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE)
            return EXIT_OK if args else EXIT_USAGE
        if "--list-plugins" in args:
            return _list_plugins(args)
        command = args[0]
        handlers = {"validate": _validate, "describe": _describe, "reconstruct": _reconstruct, "eval": _eval,
                    "convert": _convert}
        if command in handlers:
            return handlers[command](args[1:])
        return _run(args)
    except ConfigError as exc:
        print(f"xqgan-run: invalid run file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PluginError as exc:
        print(f"xqgan-run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunInterrupted as exc:
        print(f"xqgan-run: {exc}", file=sys.stderr)
        return 128 + exc.signum  # the shell's convention for "ended by this signal"
    except XQGanError as exc:
        print(f"xqgan-run: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("xqgan-run: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `xqgan-run describe ... | head`
        sys.stderr.close()
        return EXIT_OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lowest`` (argparse turns the ValueError into a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    return parse


def _run_parser(prog: str) -> _Parser:
    p = _Parser(prog=prog)
    p.add_argument("run_file", help="the run file (TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set quantizer.codebook_size=8192 (repeatable)")
    return p


def _load_registry(ns: argparse.Namespace):  # noqa: ANN202 - Registry import kept lazy
    from .registry import Registry

    return Registry.from_toml(ns.run_file, overrides=ns.overrides)


def _run(args: list[str]) -> int:
    ns = _run_parser("xqgan-run").parse_args(args)
    registry = _load_registry(ns)  # every config error surfaces here, before anything is built or written
    from .engine import Engine

    Engine(registry).fit()
    return EXIT_OK


def _validate(args: list[str]) -> int:
    p = _run_parser("xqgan-run validate")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    ns = p.parse_args(args)
    registry = _load_registry(ns)
    if not ns.quiet:
        print(registry.to_toml(with_provenance=True), end="")
        print(f"# OK: {ns.run_file} is valid", file=sys.stderr)
    return EXIT_OK


def _describe(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run describe")
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("--package", default=None, help="distribution to take the component from, if several offer it")
    ns = p.parse_args(args)
    from .catalog import catalog
    from .config import describe_config

    entry = catalog().resolve(ns.kind, ns.name, ns.package)
    cls = entry.load()
    print(f"{ns.kind} '{ns.name}' — {entry.target} ({entry.distribution} {entry.version})")
    doc = inspect.getdoc(cls) or ""
    if doc:
        print(f"\n{doc}\n")
    rows = [(d.name, d.type, d.default, d.help) for d in describe_config(cls.Config)]
    if not rows:
        print("(no options)")
        return EXIT_OK
    widths = [max(len(r[i]) for r in rows + [("option", "type", "default", "")]) for i in range(3)]
    print(f"{'option':<{widths[0]}}  {'type':<{widths[1]}}  {'default':<{widths[2]}}  help")
    for name, type_, default, help_ in rows:
        print(f"{name:<{widths[0]}}  {type_:<{widths[1]}}  {default:<{widths[2]}}  {help_}")
    return EXIT_OK


def _list_plugins(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run --list-plugins")
    p.add_argument("--list-plugins", action="store_true")
    p.add_argument("--check", action="store_true", help="import each component and report failures (exit 1 if any)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    ns = p.parse_args(args)
    from .catalog import catalog

    rows = []
    failed = 0
    for e in catalog().entries:
        row = {"kind": e.kind, "name": e.name, "distribution": e.distribution, "version": e.version, "target": e.target}
        if ns.check:
            try:
                e.load()
                row["status"] = "ok"
            except PluginError as exc:
                row["status"] = f"FAILED: {exc}"
                failed += 1
        rows.append(row)
    if ns.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = ["kind", "name", "distribution", "version", "target"] + (["status"] if ns.check else [])
        widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols[:-1]}
        print("  ".join(f"{c:<{widths[c]}}" if c in widths else c for c in cols))
        for r in rows:
            print("  ".join(f"{r[c]:<{widths[c]}}" if c in widths else r[c] for c in cols))
        if not rows:
            print("(no components installed)")
    if failed:
        print(f"{failed} component(s) failed to load", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _reconstruct(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run reconstruct")
    p.add_argument("checkpoint", help="checkpoint folder or its model.safetensors")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use EMA weights if present")
    p.add_argument("--force", action="store_true", help="overwrite existing output files (never an input image)")
    ns = p.parse_args(args)
    from .tokenizer import OutputExistsError, reconstruct_files

    try:
        written = reconstruct_files(ns.checkpoint, ns.images, ns.out, use_ema=ns.ema, overwrite=ns.force)
    except OutputExistsError as exc:
        print(f"xqgan-run reconstruct: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(path)
    return EXIT_OK


def _eval(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run eval")
    p.add_argument("checkpoint", help="checkpoint folder or its model.safetensors")
    p.add_argument("--data", required=True, help="folder of images (flat or class sub-folders)")
    p.add_argument("--max-images", type=_int_at_least(0), default=0, help="0 = all")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use EMA weights if present")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(args)
    from pathlib import Path

    if not Path(ns.data).is_dir():
        p.error(f"--data {ns.data}: not a folder")
    from .tokenizer import evaluate_folder

    metrics = evaluate_folder(ns.checkpoint, ns.data, max_images=ns.max_images, batch_size=ns.batch_size, use_ema=ns.ema)
    if ns.json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return EXIT_OK


def _convert(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run convert")
    p.add_argument("format", choices=["llamagen"], help="layout of the source file (only LlamaGen's VQ for now)")
    p.add_argument("source", help="the checkpoint to convert (a torch .pt file; read without running pickled code)")
    p.add_argument("--out", required=True, help="run folder to create (must hold no checkpoints yet)")
    p.add_argument("--preset", default=None,
                   help="run file giving the architecture (default: configs/xqgan-v-vq16-256.toml)")
    p.add_argument("--name", default=None, help="run.name of the converted run (default: llamagen-<file stem>)")
    ns = p.parse_args(args)
    from pathlib import Path

    from .convert import DEFAULT_PRESET, convert_llamagen
    from .errors import CheckpointError

    preset = ns.preset or DEFAULT_PRESET
    if not Path(preset).is_file():
        p.error(f"--preset {preset}: no such run file")
    try:
        folder = convert_llamagen(ns.source, ns.out, preset=preset, name=ns.name)
    except CheckpointError as exc:  # a refused or unfitting file is the caller's input, not a runtime failure
        print(f"xqgan-run convert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(folder)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

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
xqgan-run eval CKPT --data FOLDER [--rfid]        metrics of a trained tokenizer on a folder of images
xqgan-run fid GENERATED_DIR --ref REF             gFID (--isc, --prc) of generated images vs .npz stats or a folder
xqgan-run tokenize TOKENIZER_RUN --data D --out DIR    token shards of an image folder / webdataset tars
xqgan-run sample GENERATOR_RUN --classes 0,3 --out DIR  PNGs + a labelled grid sampled from a generator run
xqgan-run convert llamagen SRC.pt --out DIR       a released LlamaGen VQ checkpoint -> an xqgan run folder
xqgan-run convert reference SRC.pt --out DIR      a released XQ-GAN (reference code, ViT) checkpoint -> a run folder
xqgan-run make-tiny-teachers DIR [--only NAME]    tiny random-weight aligner teachers for CPU tries (not real runs)
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
                    "convert": _convert,
                    "make-tiny-teachers": _make_tiny_teachers, "fid": _fid,
                    "tokenize": _tokenize, "sample": _sample}
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
    p.add_argument("--rfid", action="store_true",
                   help="also rFID: Inception features of the reconstructions vs the originals (needs xqgan-core[fid])")
    p.add_argument("--ref", default=None,
                   help="rFID against these statistics instead of the originals: an .npz (ADM format) or a folder")
    p.add_argument("--inception-weights", default=None, help="Inception-v3 weights file for rFID (see docs/evaluation.md)")
    ns = p.parse_args(args)
    from pathlib import Path

    if not Path(ns.data).is_dir():
        p.error(f"--data {ns.data}: not a folder")
    if ns.ref is not None and not Path(ns.ref).exists():
        p.error(f"--ref {ns.ref}: no such file or folder")
    from .tokenizer import evaluate_folder

    metrics = evaluate_folder(ns.checkpoint, ns.data, max_images=ns.max_images, batch_size=ns.batch_size, use_ema=ns.ema,
                              rfid=ns.rfid, reference=ns.ref, inception_weights=ns.inception_weights)
    if ns.json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return EXIT_OK


def _fid(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run fid")
    p.add_argument("generated", nargs="?", help="folder of generated images (searched recursively)")
    p.add_argument("--ref", required=True,
                   help="reference: an .npz of Inception statistics (ADM's VIRTUAL_imagenet256_labeled.npz format, "
                   "or one written by --save-ref) or a folder of images")
    p.add_argument("--batch-size", type=_int_at_least(1), default=50)
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cuda:1 (default: cuda when available)")
    p.add_argument("--isc", action="store_true", help="also the Inception Score of the generated images")
    p.add_argument("--prc", action="store_true", help="also precision/recall (k = 3, Inception pool features)")
    p.add_argument("--resolution", type=_int_at_least(1), default=None,
                   help="centre-crop the images of a reference folder to N x N (e.g. 256 for ImageNet val)")
    p.add_argument("--save-ref", default=None, metavar="REF.npz",
                   help="write the statistics of a reference folder (then GENERATED_DIR may be omitted)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception-v3 weights file (default: $XQGAN_INCEPTION_WEIGHTS, else torch-fidelity's file in "
                   "the torch hub cache, downloaded when online)")
    p.add_argument("--workers", type=_int_at_least(0), default=0, help="image-decoding worker processes")
    p.add_argument("--out", default=None, help="JSON file for the results (default: GENERATED_DIR/fid.json)")
    ns = p.parse_args(args)
    from pathlib import Path

    if ns.generated is None and ns.save_ref is None:
        p.error("give GENERATED_DIR (or only --save-ref to precompute reference statistics)")
    if ns.generated is not None and not Path(ns.generated).is_dir():
        p.error(f"{ns.generated}: not a folder")
    if not Path(ns.ref).exists():
        p.error(f"--ref {ns.ref}: no such file or folder")
    if ns.save_ref is not None and not Path(ns.ref).is_dir():
        p.error("--save-ref needs --ref to be a folder of images")
    import torch

    from .fid import format_table, generation_metrics, load_reference, write_json
    from .inception import load_inception

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_inception(ns.inception_weights, device)
    if ns.generated is None:
        ref = load_reference(ns.ref, net, batch_size=ns.batch_size, resolution=ns.resolution, workers=ns.workers)
        print(ref.save(ns.save_ref))
        return EXIT_OK
    metrics = generation_metrics(ns.generated, ns.ref, inception=net, batch_size=ns.batch_size, isc=ns.isc,
                                 prc=ns.prc, resolution=ns.resolution, save_reference=ns.save_ref, workers=ns.workers)
    print(format_table(metrics))
    if not net.official:
        print(f"note: Inception weights {net.weights} are not torch-fidelity's published file: these numbers are not "
              "comparable with published ones")
    out = write_json(metrics, ns.out or Path(ns.generated) / "fid.json")
    print(f"written: {out}")
    return EXIT_OK


def _convert(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run convert")
    p.add_argument("format", choices=["llamagen", "reference"],
                   help="layout of the source file: LlamaGen's VQ, or the XQ-GAN reference code's ViT tokenizers")
    p.add_argument("source", help="the checkpoint to convert (a torch .pt file; read without running pickled code)")
    p.add_argument("--out", required=True, help="run folder to create (must hold no checkpoints yet)")
    p.add_argument("--preset", default=None,
                   help="run file giving the architecture (default: llamagen: configs/xqgan-v-vq16-256.toml; "
                   "reference: the configs/xqgan-sc-*.toml preset matching the checkpoint's args)")
    p.add_argument("--name", default=None, help="run.name of the converted run (default: <format>-<file stem>)")
    p.add_argument("--weights", choices=["ema", "model"], default=None,
                   help="reference: which weights to convert (default: ema when the file has them, else model)")
    ns = p.parse_args(args)
    from pathlib import Path

    from .convert import DEFAULT_PRESET, convert_llamagen
    from .errors import CheckpointError

    if ns.weights is not None and ns.format != "reference":
        p.error("--weights applies to reference checkpoints only")
    preset = ns.preset or (DEFAULT_PRESET if ns.format == "llamagen" else None)
    if preset is not None and not Path(preset).is_file():
        p.error(f"--preset {preset}: no such run file")
    try:
        if ns.format == "reference":
            from .convert_reference import convert_reference

            folder = convert_reference(ns.source, ns.out, preset=preset, name=ns.name, weights=ns.weights)
        else:
            folder = convert_llamagen(ns.source, ns.out, preset=preset, name=ns.name)
    except CheckpointError as exc:  # a refused or unfitting file is the caller's input, not a runtime failure
        print(f"xqgan-run convert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(folder)
    return EXIT_OK


def _make_tiny_teachers(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run make-tiny-teachers",
                description="Write a tiny random-weight teacher of the real architecture for every installed aligner "
                "that offers one into FOLDER and print the [[aligners]] tables that read them. Their features mean "
                "nothing: for tests and CPU-sized runs (configs/xqgan-sc-tiny-aligned.toml), never for real training.")
    p.add_argument("folder", help="where the weight files are written; the tables name them by this path (a relative "
                   "path is read relative to the folder a run starts in)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="only this aligner (repeatable), e.g. --only dinov2 --only clip")
    ns = p.parse_args(args)
    from .tiny_teachers import make_tiny_teachers
    from .tomlwrite import dumps

    try:
        tables, without = make_tiny_teachers(ns.folder, ns.only)
    except ValueError as exc:
        p.error(f"--only: {exc}")
    for name in without:
        print(f"# {name}: offers no tiny teacher", file=sys.stderr)
    print("# random-weight teachers: their features mean nothing (tests and CPU-sized runs only)")
    print(dumps({"aligners": tables}), end="")
    return EXIT_OK


def _tokenize(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run tokenize")
    p.add_argument("tokenizer", help="tokenizer run / checkpoint folder, or any Tokenizer.from_pretrained name")
    p.add_argument("--data", default=None,
                   help="image folder (class sub-folders = labels, sorted names -> ids) or webdataset tar shards "
                   "('shards/{000..009}.tar': an image and a 'cls' entry per sample)")
    p.add_argument("--built-in-samples", action="store_true",
                   help="tokenize seeded random crops of the built-in sample photographs (class = photograph)")
    p.add_argument("--crops-per-image", type=_int_at_least(1), default=32, help="--built-in-samples: crops per photo")
    p.add_argument("--seed", type=int, default=0, help="--built-in-samples: seed of the crops")
    p.add_argument("--out", required=True, help="token folder to write (a restarted job continues where it stopped)")
    p.add_argument("--flip", action="store_true", help="also store the tokens of the mirrored images (augmentation)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="image-decoding worker processes (default: up to 4, at most the usable CPUs)")
    p.add_argument("--device", default=None, help="cpu, cuda, hpu (default: the best available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast of the encoder (auto: bf16 where the device supports it, else fp32)")
    p.add_argument("--shard-size", type=_int_at_least(1), default=5000, help="images per shard (folders, samples)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use EMA weights if present")
    p.add_argument("--filename", default=None,
                   help="with a Hugging Face repo id as TOKENIZER: the checkpoint file in it ([tokenizer] filename)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    ns = p.parse_args(args)
    if (ns.data is None) == (not ns.built_in_samples):
        p.error("give exactly one of --data and --built-in-samples")
    from .tokenize_dataset import TokenizeError, tokenize

    try:
        index = tokenize(ns.tokenizer, ns.out, data=ns.data, built_in_samples=ns.built_in_samples,
                         crops_per_image=ns.crops_per_image, seed=ns.seed, flip=ns.flip, batch_size=ns.batch_size,
                         workers=ns.workers, device=ns.device, precision=ns.precision, shard_size=ns.shard_size,
                         use_ema=ns.ema, progress=ns.progress, filename=ns.filename)  # fmt: skip
    except TokenizeError as exc:  # about the command line (--data, --out), not a runtime failure
        print(f"xqgan-run tokenize: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if index is not None:
        record = json.loads(index.read_text(encoding="utf-8"))
        print(f"{index.parent}: {record['count']} token sequences, {len(record['classes'])} classes, "
              f"{len(record['shards'])} shard(s), {len(record['skipped'])} image(s) skipped")
    return EXIT_OK


def _sample(args: list[str]) -> int:
    p = _Parser(prog="xqgan-run sample")
    p.add_argument("generator", help="generator run folder (its out_dir or a checkpoint folder)")
    p.add_argument("--classes", default=None,
                   help="class ids: 0,3,7 or ranges 0-999 or 'all' (default: the first 8; not for unconditional runs)")
    # --per-class also under torchrun, whose parser takes a bare --n for an abbreviation of its own options
    p.add_argument("--n", "--per-class", dest="n", type=_int_at_least(1), default=4, help="samples per class")
    run_default = "(default: the generator run's [sample] setting)"
    p.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale, 1 = none {run_default}")
    p.add_argument("--temperature", type=float, default=None, help=f"softmax temperature {run_default}")
    p.add_argument("--top-k", type=_int_at_least(0), default=None, help=f"0 = no top-k, 1 = greedy {run_default}")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass, 1 = off {run_default}")
    p.add_argument("--seed", type=int, default=None, help=f"seed of the sampling generators {run_default}")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="sequences sampled at once (part of what a seed reproduces)")
    p.add_argument("--out", required=True, help="output folder: one PNG per sample and grid.png")
    p.add_argument("--device", default=None, help="cpu, cuda, hpu (default: the best available)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use EMA weights if present")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="also write grid.png (the first 32 classes x 16 samples, labelled)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="complete an interrupted job: keep the batches already written, sample the rest")
    again.add_argument("--force", action="store_true", help="overwrite existing PNGs in --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    ns = p.parse_args(args)
    if ns.temperature is not None and ns.temperature <= 0:
        p.error("--temperature must be > 0")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if ns.cfg is not None and ns.cfg < 0:
        p.error("--cfg must be >= 0")
    from .sample_images import SamplingOptions, parse_classes, sample_run
    from .tokenizer import OutputExistsError

    if ns.classes is not None and ns.classes.strip() != "all":
        try:
            parse_classes(ns.classes)  # the syntax, before the run is loaded
        except ValueError as exc:
            p.error(str(exc))
    options = SamplingOptions(cfg_scale=ns.cfg, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                              seed=ns.seed, batch_size=ns.batch_size)  # fmt: skip
    try:
        written = sample_run(ns.generator, ns.out, classes=ns.classes, n=ns.n, options=options, device=ns.device,
                             use_ema=ns.ema, overwrite=ns.force, resume=ns.resume, grid=ns.grid,
                             progress=ns.progress)  # fmt: skip
    except (OutputExistsError, ValueError) as exc:
        print(f"xqgan-run sample: {exc}", file=sys.stderr)
        return EXIT_USAGE
    pngs = written[:-1] if ns.grid else written  # the grid comes last
    print(f"{len(pngs)} sample(s) in {ns.out}" + (f", grid {written[-1]}" if ns.grid else ""))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

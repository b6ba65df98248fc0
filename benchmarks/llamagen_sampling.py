"""LlamaGen-style sampling speed on the CPU: tokens/s of our ``llamagen`` generator (KV cache) next to LlamaGen's own
``autoregressive/models/gpt.py`` + ``generate.py`` (FoundationVision/LlamaGen), same configuration on both sides.

Configuration (flags): a class-conditional transformer of ``--depth`` blocks, ``--width`` wide, ``--heads`` heads,
SwiGLU hidden rounded to 256 (both sides' rule), ``--vocab`` codes on a ``--grid`` x ``--grid`` raster, 1000
classes, random weights; ``--batch`` images per call with classifier-free guidance at ``--cfg`` (the batch doubled
with the null class when != 1) and top-k ``--top-k`` (LlamaGen's sample_c2i.py defaults: cfg 4, top-k 2000).

* Ours: ``build("generator", {"use": "llamagen", ...})``, bound to a one-codebook ``TokenLayout``, ``sample()``.
* Theirs: ``Transformer(ModelArgs(...))`` and ``generate(...)`` imported from a work tree of the LlamaGen repository
  (``--reference-repo``; never part of this repository), run by ``--reference-python`` (any Python with torch).

Every measurement is a fresh subprocess; ours and theirs alternate (ABAB...) over ``--reps`` rounds so load from
other jobs hits both alike. A child builds the model, runs one untimed call, then ``--calls`` timed calls, and reports
each call's wall time; tokens/s = batch * grid^2 / seconds. The table shows medians over every timed call, the
ratio ours / theirs, and the 1-minute load average before and after.

Usage::

    git -C /work/.mirror/FoundationVision+LlamaGen/repo archive HEAD autoregressive utils | tar -x -C /tmp/ref-llamagen
    .venv/bin/python benchmarks/llamagen_sampling.py --reference-repo /tmp/ref-llamagen \\
        --reference-python /work/refenv/bin/python
    .venv/bin/python benchmarks/llamagen_sampling.py --sides ours --profile     # where our time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 1000
TARGET_SPEEDUP = 1.3  # issue 11: at least 1.3x LlamaGen's own sampling tokens/s


# ----------------------------------------------------------------------------------------------------------------
# children (one process per measurement)


def our_sampler(args: argparse.Namespace) -> Callable[[Any], Any]:
    import torch

    from xqgan_core import build
    from xqgan_core.token_layout import TokenLayout

    gen = build("generator", {"use": "llamagen", "depth": args.depth, "width": args.width, "heads": args.heads,
                              "ffn_multiple_of": 256})
    gen.bind(TokenLayout.single((args.grid, args.grid), args.vocab), None, NUM_CLASSES)
    gen = gen.to(getattr(torch, args.dtype)).eval()

    def call(labels: Any) -> Any:
        with torch.no_grad():
            return gen.sample(len(labels), labels, cfg_scale=args.cfg, top_k=args.top_k)

    return call


def reference_sampler(args: argparse.Namespace) -> Callable[[Any], Any]:
    import torch

    sys.path.insert(0, str(Path(args.reference_repo).resolve()))
    from autoregressive.models.generate import generate  # type: ignore[import-not-found]
    from autoregressive.models.gpt import ModelArgs, Transformer  # type: ignore[import-not-found]

    model = Transformer(ModelArgs(n_layer=args.depth, dim=args.width, n_head=args.heads, vocab_size=args.vocab,
                                  block_size=args.grid**2, num_classes=NUM_CLASSES, cls_token_num=1,
                                  model_type="c2i"))
    model = model.to(getattr(torch, args.dtype)).eval()

    def call(labels: Any) -> Any:
        return generate(model, labels, args.grid**2, cfg_scale=args.cfg, temperature=1.0, top_k=args.top_k,
                        top_p=1.0, sample_logits=True)

    return call


def child(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # LlamaGen's generate uses a deprecated sdp_kernel context on every step
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    call = our_sampler(args) if args.child == "ours" else reference_sampler(args)
    labels = torch.arange(args.batch) % NUM_CLASSES
    seq = call(labels)  # warm-up (allocator, kernels)
    assert tuple(seq.shape)[:2] == (args.batch, args.grid**2) or tuple(seq.shape) == (args.batch, args.grid**2, 1)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(labels)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    seconds = []
    for _ in range(args.calls):
        start = time.perf_counter()
        call(labels)
        seconds.append(time.perf_counter() - start)
    return {"side": args.child, "seconds": seconds, "tokens": args.batch * args.grid**2}


# ----------------------------------------------------------------------------------------------------------------
# parent


CONFIG_FLAGS = ("depth", "width", "heads", "vocab", "grid", "batch", "cfg", "top_k", "calls", "threads", "dtype")


def run_child(args: argparse.Namespace, side: str) -> dict[str, Any]:
    python = sys.executable if side == "ours" else args.reference_python
    cmd = [python, str(Path(__file__).resolve()), "--child", side]
    for flag in CONFIG_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if side == "ref":
        cmd += ["--reference-repo", str(args.reference_repo)]
    if args.profile:
        cmd.append("--profile")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{side} child failed:\n{proc.stderr[-4000:]}")
    if args.profile:
        print(proc.stderr, file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", choices=["ours", "ref"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--sides", nargs="+", choices=["ours", "ref"], default=["ours", "ref"])
    p.add_argument("--reference-repo", type=Path, default=None,
                   help="work tree with LlamaGen's autoregressive/ and utils/")
    p.add_argument("--reference-python", default=sys.executable, help="Python that runs LlamaGen's code")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--calls", type=int, default=2, help="timed calls per child")
    p.add_argument("--reps", type=int, default=3, help="rounds of (ours, theirs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one call per child")
    p.add_argument("--json", type=Path, default=None, help="write every child's record to this file")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if "ref" in args.sides and args.reference_repo is None:
        p.error("--reference-repo is needed to run LlamaGen's code (or pass --sides ours)")

    load_before = os.getloadavg()[0]
    results = [run_child(args, side) for _ in range(args.reps) for side in args.sides]
    load_after = os.getloadavg()[0]
    print(f"config: depth {args.depth}, width {args.width}, heads {args.heads}, vocab {args.vocab}, "
          f"{args.grid}x{args.grid} tokens, batch {args.batch}, cfg {args.cfg}, top-k {args.top_k}, {args.dtype}, "
          f"{args.threads} threads; {args.reps} rounds x {args.calls} timed calls; load {load_before:.2f} -> "
          f"{load_after:.2f}")
    rates: dict[str, float] = {}
    for side in args.sides:
        calls = [s for r in results if r["side"] == side for s in r["seconds"]]
        tokens = next(r["tokens"] for r in results if r["side"] == side)
        rates[side] = tokens / statistics.median(calls)
        print(f"{side:>4}: median {statistics.median(calls):.3f} s/call (min {min(calls):.3f}, max {max(calls):.3f})"
              f" -> {rates[side]:.0f} tokens/s")
    if len(rates) == 2:
        ratio = rates["ours"] / rates["ref"]
        verdict = "meets" if ratio >= TARGET_SPEEDUP else "misses"
        print(f"ours / LlamaGen: {ratio:.2f}x ({verdict} the {TARGET_SPEEDUP}x target)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"reference_repo": str(args.reference_repo),
                                                                "json": str(args.json)},
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""VAR on the CPU: the training step (forward + backward from tokens) and cached sampling (images/s) of our ``var``
generator next to VAR's own ``models/var.py`` (FoundationVision/VAR), same configuration on both sides.

Configuration (flags): depth ``--depth`` (width 64 d, d heads, MLP ratio 4, l2-normalised attention, drop path
0.1 d / 24 as VAR's ``build_vae_var``), VAR's scales 1..16 (680 tokens), a ``--vocab``-code codebook of 32 channels
with 4 shared phi convs, 1000 classes, random weights.

* train: ``--batch`` token sequences; the step builds the next-scale inputs from the indices (ours: the quantizer's
  ``next_scale_inputs`` inside ``forward``; theirs: ``VectorQuantizer2.idxBl_to_var_input``), runs the model, the
  cross entropy, and the backward pass (no optimizer step). Images/s = batch / seconds.
* sample: ``--sample-batch`` images with classifier-free guidance (ours ``cfg_scale = 1 + cfg``, theirs ``cfg``: the
  same guided logits ``(1 + t) cond - t uncond`` at the last scale, both ramped linearly over scales), top-k
  ``--top-k``, top-p ``--top-p``. VAR's sampler ends by decoding ``f_hat`` with its VAE; that decode is replaced by
  the identity on their side so both sides time the generator only (tokens / ``f_hat``, no pixels).

Every measurement is a fresh subprocess; ours and theirs alternate over ``--reps`` rounds. A child builds the model,
runs one untimed call, then ``--calls`` timed calls. The table shows medians, the ratio ours / theirs (also per
round, where load drift between rounds cancels, and of the fastest calls) and the load.

Usage::

    git -C /work/.mirror/FoundationVision+VAR/repo archive HEAD | tar -x -C /tmp/ref-var
    .venv/bin/python benchmarks/var_step.py --reference-repo /tmp/ref-var --reference-python /work/refenv/bin/python \
        --threads 1 --reps 5
    .venv/bin/python benchmarks/var_step.py --sides ours --profile     # where our time goes
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
SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
NUM_CLASSES = 1000
CODE_DIM = 32
TARGET_SPEEDUP = 1.3  # issue 11: at least 1.3x VAR's own training step and sampling images/s

Call = Callable[[], Any]


def random_indices(batch: int, vocab: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (batch, s, s), generator=g) for s in SCALES]


# ----------------------------------------------------------------------------------------------------------------
# children (one process per measurement)


def our_calls(args: argparse.Namespace) -> tuple[Call, Call]:
    import torch

    from xqgan_core import build
    from xqgan_core.sampling import token_cross_entropy

    q = build("quantizer", {"use": "msrq", "scales": list(SCALES), "phi_count": 4,
                            "code": {"use": "vq", "dim": CODE_DIM, "codebook_size": args.vocab}}).eval()
    gen = build("generator", {"use": "var", "depth": args.depth, "drop_path": 0.1 * args.depth / 24})
    layout = q.token_layout(SCALES[-1], SCALES[-1])
    gen.bind(layout, q, NUM_CLASSES)
    tokens = layout.to_sequence(random_indices(args.batch, args.vocab))
    labels = torch.arange(args.batch) % NUM_CLASSES
    sample_labels = torch.arange(args.sample_batch) % NUM_CLASSES

    def train() -> Any:
        gen.train()
        out = gen(tokens, labels)
        loss = token_cross_entropy(out.logits, tokens)
        loss.backward()
        gen.zero_grad(set_to_none=True)
        return loss

    def sample() -> Any:
        gen.eval()
        with torch.no_grad():
            return gen.sample(args.sample_batch, sample_labels, cfg_scale=1 + args.cfg, top_k=args.top_k,
                              top_p=args.top_p)

    return train, sample


def reference_calls(args: argparse.Namespace) -> tuple[Call, Call]:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(args.reference_repo).resolve()))
    from models import build_vae_var  # type: ignore[import-not-found]

    vae, var = build_vae_var(device="cpu", patch_nums=SCALES, V=args.vocab, Cvae=CODE_DIM, ch=32, depth=args.depth,
                             num_classes=NUM_CLASSES, attn_l2_norm=True, flash_if_available=False,
                             fused_if_available=False)
    vae.fhat_to_img = lambda f_hat: f_hat  # time the generator only (see the module docstring)
    idx_bl = [i.flatten(1) for i in random_indices(args.batch, args.vocab)]
    labels = torch.arange(args.batch) % NUM_CLASSES
    sample_labels = torch.arange(args.sample_batch) % NUM_CLASSES
    target = torch.cat(idx_bl, dim=1)

    def train() -> Any:
        var.train()
        x = vae.quantize.idxBl_to_var_input(idx_bl)
        logits = var(labels, x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1))
        loss.backward()
        var.zero_grad(set_to_none=True)
        return loss

    def sample() -> Any:
        var.eval()
        with torch.no_grad():
            return var.autoregressive_infer_cfg(args.sample_batch, sample_labels, cfg=args.cfg, top_k=args.top_k,
                                                top_p=args.top_p)

    return train, sample


def child(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, sample = our_calls(args) if args.child == "ours" else reference_calls(args)
    record: dict[str, Any] = {"side": args.child}
    for mode, call, images in (("train", train, args.batch), ("sample", sample, args.sample_batch)):
        if mode not in args.modes:
            continue
        call()  # warm-up
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            print(f"== {args.child} {mode}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20),
                  file=sys.stderr)
        seconds = []
        for _ in range(args.calls):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        record[mode] = {"seconds": seconds, "images": images}
    return record


# ----------------------------------------------------------------------------------------------------------------
# parent


CONFIG_FLAGS = ("depth", "vocab", "batch", "sample_batch", "cfg", "top_k", "top_p", "calls", "threads")


def run_child(args: argparse.Namespace, side: str) -> dict[str, Any]:
    python = sys.executable if side == "ours" else args.reference_python
    cmd = [python, str(Path(__file__).resolve()), "--child", side, "--modes", *args.modes]
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


def paired_speedups(results: list[dict[str, Any]], mode: str) -> str:
    """Load drifts between rounds, not within one: the speed-up of each round (its VAR median / its ours median),
    summarised by the median over rounds, and the ratio of the two sides' fastest calls."""
    def med(r: dict[str, Any]) -> float:
        return statistics.median(r[mode]["seconds"])

    ours = [r for r in results if r["side"] == "ours"]
    theirs = [r for r in results if r["side"] == "ref"]
    per_round = [med(t) / med(o) for o, t in zip(ours, theirs)]
    fastest = min(s for r in theirs for s in r[mode]["seconds"]) / min(s for r in ours for s in r[mode]["seconds"])
    return (f"per round {' '.join(f'{x:.2f}' for x in per_round)} (median {statistics.median(per_round):.2f}x), "
            f"fastest calls {fastest:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", choices=["ours", "ref"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--sides", nargs="+", choices=["ours", "ref"], default=["ours", "ref"])
    p.add_argument("--modes", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    p.add_argument("--reference-repo", type=Path, default=None, help="work tree of FoundationVision/VAR")
    p.add_argument("--reference-python", default=sys.executable, help="Python that runs VAR's code")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--sample-batch", type=int, default=4, help="images per sampling call")
    p.add_argument("--cfg", type=float, default=1.5, help="VAR's cfg (ours: cfg_scale = 1 + cfg)")
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--calls", type=int, default=2, help="timed calls per child and mode")
    p.add_argument("--reps", type=int, default=3, help="rounds of (ours, theirs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one call per mode")
    p.add_argument("--json", type=Path, default=None, help="write every child's record to this file")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if "ref" in args.sides and args.reference_repo is None:
        p.error("--reference-repo is needed to run VAR's code (or pass --sides ours)")

    load_before = os.getloadavg()[0]
    results = [run_child(args, side) for _ in range(args.reps) for side in args.sides]
    load_after = os.getloadavg()[0]
    print(f"config: VAR-d{args.depth} (width {64 * args.depth}), scales {list(SCALES)}, vocab {args.vocab}, "
          f"train batch {args.batch}, sample batch {args.sample_batch} (cfg {args.cfg}, top-k {args.top_k}, top-p "
          f"{args.top_p}), {args.threads} threads; {args.reps} rounds x {args.calls} calls; load {load_before:.2f} "
          f"-> {load_after:.2f}")
    for mode in args.modes:
        rates: dict[str, float] = {}
        for side in args.sides:
            calls = [s for r in results if r["side"] == side for s in r[mode]["seconds"]]
            images = next(r[mode]["images"] for r in results if r["side"] == side)
            rates[side] = images / statistics.median(calls)
            print(f"{mode:>6} {side:>4}: median {statistics.median(calls):.3f} s/call (min {min(calls):.3f}, max "
                  f"{max(calls):.3f}) -> {rates[side]:.2f} images/s")
        if len(rates) == 2:
            ratio = rates["ours"] / rates["ref"]
            verdict = "meets" if ratio >= TARGET_SPEEDUP else "misses"
            print(f"{mode:>6} ours / VAR: {ratio:.2f}x ({verdict} the {TARGET_SPEEDUP}x target); "
                  f"{paired_speedups(results, mode)}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()

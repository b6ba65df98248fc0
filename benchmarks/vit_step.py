"""The ViT tokenizer's training step, ours next to the reference XQ-GAN code (lxa9867/ImageFolder), on the CPU.

The step (issue 9, "Speed and memory"): forward + MSE reconstruction loss + the quantizer's losses + backward,
batch 4 at 256 px, no LPIPS, no discriminator, no optimizer step; MSVR10P2 layout (2 product branches of 11 x 11
latent tokens, each a 10-scale residual VQ with 4096 codes of dim 32), random weights, drop_path 0.1 on both sides.

* Ours is built through the real code: ``configs/xqgan-sc-msvr10p2-4096.toml`` (trunk size, ``init = ""``, CPU,
  ``sample`` data, no discriminator / LPIPS / EMA) -> ``Registry`` -> ``TokenizerTask``, and the step is the task's
  own ``tokenizer_loss_terms`` + ``precision.backward``; ``train.precision`` selects fp32 or bf16 autocast.
* The reference is its ``VQModel`` built by ``scripts/reference_models.py`` from a work tree of the reference
  repository (``--reference-repo``), run by the reference's Python (``--reference-python``, timm 1.0.9), with the
  loss its generator step computes here: ``mse(recon, x) + vq + commit + entropy``.

Every measurement is a fresh subprocess (so peak memory does not mix), ours and the reference's alternated in
ABAB... order over ``--reps`` rounds, so load from other jobs on a shared machine hits both alike. A child builds
the model, runs ``--warmup`` untimed and ``--steps`` timed steps, and reports every step's wall time and its peak
resident memory (``VmHWM``: the whole process, torch and the imports included, as ``ps`` would show it) and the
resident memory after the imports. The table shows the median over all timed steps of all rounds.

Usage::

    git -C /work/.mirror/lxa9867+ImageFolder/repo archive HEAD | tar -x -C /tmp/ref-imagefolder
    .venv/bin/python benchmarks/vit_step.py --reference-repo /tmp/ref-imagefolder                 # ViT-S and ViT-B
    .venv/bin/python benchmarks/vit_step.py --reference-repo /tmp/ref-imagefolder --sizes S --reps 3
    .venv/bin/python benchmarks/vit_step.py --sizes S --variants bf16 --profile                   # where ours spends
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN_FILE = REPO / "configs" / "xqgan-sc-msvr10p2-4096.toml"
GIB = 1024**3

#: trunk widths / heads by size letter (depth 12 for both), the reference's timm DINOv2 S and B
SIZES = {"S": (384, 6), "B": (768, 12)}

#: our variants: train.precision and the vit option `checkpointing`
OUR_VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-ckpt": ("bf16", True),
                "fp32-ckpt": ("fp32", True)}

#: a variant name ending in this runs its child with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_): large
#: tensors then go straight back to the kernel when freed instead of staying in the heap, so the peak resident
#: memory follows the live tensors (at the cost of page faults on every large allocation)
FIXED_MMAP_SUFFIX = "+mmap"
FIXED_MMAP_THRESHOLD = 128 * 1024

#: the reference's figures on this CPU (issue 9): s/step and peak bytes, and the targets against them
REFERENCE_FIGURES = {"S": (3.4, 2.4e9), "B": (11.1, 4.2e9)}
TARGET_FP32_SLOWDOWN = 1.05  # fp32 within 5 % of the reference's time
TARGET_BF16_SPEEDUP = 2.0  # bf16 autocast at least 2x faster than the reference (fp32)
TARGET_MEMORY_FRACTION = 0.6  # peak at most 60 % of the reference's in at least one configuration


# ----------------------------------------------------------------------------------------------------------------
# children (one process per measurement; run by our venv or by the reference's Python)


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def our_step(size: str, variant: str, batch: int) -> tuple[Any, Any]:
    """(step function, model) for our tokenizer built from the MSVR10P2 run file through Registry + TokenizerTask."""
    import tempfile
    import tomllib

    import torch

    from xqgan_core.distributed import DistEnv
    from xqgan_core.hooks import make_plugin_manager
    from xqgan_core.precision import Precision
    from xqgan_core.registry import Registry
    from xqgan_core.task import Runtime
    from xqgan_core.tokenizer_task import TokenizerTask

    precision, checkpointing = OUR_VARIANTS[variant]
    width, heads = SIZES[size]
    data = tomllib.loads(RUN_FILE.read_text(encoding="utf-8"))
    for extra in ("discriminators", "aligners"):  # the step has neither adversarial nor alignment terms
        data.pop(extra, None)
    for part in ("encoder", "decoder"):
        data[part].update(init="", embed_dim=width, num_heads=heads, checkpointing=checkpointing)
    data["device"] = {"use": "cpu"}
    data["data"] = {"use": "sample", "resolution": 256}
    data["loss"].update(perceptual=0.0, require_perceptual=False)
    data["eval"] = {"lpips": False}
    data["train"].update(precision=precision, ema_decay=0.0, num_workers=0, batch_size=batch)
    cfg = Registry.from_dict(data, source=f"{RUN_FILE} (benchmark overrides)").config
    device = cfg.device.build()
    runtime = Runtime(device, Precision(device, cfg.train.precision), DistEnv(), Path(tempfile.mkdtemp()), seed=0)
    task = TokenizerTask(Registry(cfg), runtime, make_plugin_manager(), resuming=False)
    task.model.train()
    images = torch.rand(batch, 3, 256, 256) * 2 - 1

    def step() -> float:
        task.tokenizer_opt.zero_grad(set_to_none=True)
        _, _, terms = task.tokenizer_loss_terms(images, False, {}, 1)
        loss = sum(terms.values())
        runtime.precision.backward(loss)
        return float(loss.detach())

    return step, task.model


def reference_step(size: str, variant: str, batch: int, repo: str) -> tuple[Any, Any]:
    """(step function, model) for the reference's VQModel and its generator loss without LPIPS / discriminator."""
    import contextlib

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "scripts"))
    from reference_models import build_reference_vit_tokenizer, ensure_process_group

    ensure_process_group()  # its training forward all-reduces code hits
    model = build_reference_vit_tokenizer(repo, size=size, train=True)
    images = torch.rand(batch, 3, 256, 256) * 2 - 1
    bf16 = variant == "bf16"

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            recon, codebook, _, _, _ = model(images, 0, 0.0, 0.0, 0.0)  # epoch, alpha/beta/delta (perturbation)
            loss = F.mse_loss(images, recon) + codebook[0] + codebook[1] + codebook[2]
        loss.backward()
        return float(loss.detach())

    return step, model


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rss_imports = proc_status_bytes("VmRSS")
    variant = args.variant.removesuffix(FIXED_MMAP_SUFFIX)  # the parent set the environment
    if args.side == "ours":
        step, model = our_step(args.size, variant, args.batch)
    else:
        step, model = reference_step(args.size, variant, args.batch, args.reference_repo)
    if args.profile:
        return profile_step(step, args)
    times, loss = [], float("nan")
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "side": args.side, "size": args.size, "variant": args.variant, "batch": args.batch,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": times, "loss": loss, "peak_GiB": proc_status_bytes("VmHWM") / GIB,
        "after_imports_GiB": rss_imports / GIB, "load": os.getloadavg()[0],
    }


def profile_step(step: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Top operators by self CPU time of one step after the warm-up (forward and backward together)."""
    import torch

    for _ in range(max(args.warmup, 1)):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"side": args.side, "size": args.size, "variant": args.variant, "profile": True, "wall_s": wall,
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events[:30]]}


# ----------------------------------------------------------------------------------------------------------------
# the parent: interleaved children, then the table


def run_child(args: argparse.Namespace, side: str, size: str, variant: str) -> dict[str, Any] | None:
    python = sys.executable if side == "ours" else args.reference_python
    cmd = [python, str(Path(__file__).resolve()), "--child", side, "--size", size, "--variant", variant,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if side == "reference":
        cmd += ["--reference-repo", str(args.reference_repo)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile:
        cmd.append("--profile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if variant.endswith(FIXED_MMAP_SUFFIX):
        env["MALLOC_MMAP_THRESHOLD_"] = str(FIXED_MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode != 0:  # reported, and the other measurements go on
        sys.stderr.write(proc.stderr[-4000:] + f"\nbenchmark child failed: {' '.join(cmd)}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def schedule(args: argparse.Namespace, size: str) -> list[tuple[str, str]]:
    """One round's (side, variant) order; odd rounds run it backwards, so each side goes first as often."""
    runs = [("ours", v) for v in args.variants] + [("reference", v) for v in args.reference_variants]
    # alternate sides: ours, reference, ours, reference, ... while either has runs left
    ours, ref = [r for r in runs if r[0] == "ours"], [r for r in runs if r[0] == "reference"]
    order = [r for pair in zip(ours, ref) for r in pair] + ours[len(ref):] + ref[len(ours):]
    return order


def summarise(results: list[dict[str, Any]], size: str) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r["size"] == size:
            groups.setdefault((r["side"], r["variant"]), []).append(r)
    rows = []
    for (side, variant), rs in groups.items():
        steps = [t for r in rs for t in r["step_s"]]
        rows.append({"side": side, "variant": variant, "median_s": statistics.median(steps), "min_s": min(steps),
                     "round_medians": [statistics.median(r["step_s"]) for r in rs],
                     "peak_GiB": statistics.median(r["peak_GiB"] for r in rs),
                     "after_imports_GiB": statistics.median(r["after_imports_GiB"] for r in rs),
                     "params_M": rs[0]["params_M"]})
    return rows


def format_table(rows: list[dict[str, Any]], size: str) -> str:
    ref = next((r for r in rows if r["side"] == "reference" and r["variant"] == "fp32"), None)
    head = ("ViT", "side", "variant", "s/step median (min)", "round medians", "peak GiB (after imports)",
            "speed vs ref fp32", "peak vs ref fp32", "target")
    lines = []
    for r in rows:
        speed = mem = target = "-"
        if ref is not None:
            ratio = ref["median_s"] / r["median_s"]
            frac = r["peak_GiB"] / ref["peak_GiB"]
            speed, mem = f"{ratio:.2f}x", f"{frac:.0%}"
            if r["side"] == "ours":
                goal = 1 / TARGET_FP32_SLOWDOWN if r["variant"].startswith("fp32") else TARGET_BF16_SPEEDUP
                met = ratio >= goal
                target = (f"speed >= {goal:.2f}x {'yes' if met else 'NO'}, "
                          f"mem <= 60% {'yes' if frac <= TARGET_MEMORY_FRACTION else 'no'}")
        lines.append((size, r["side"], r["variant"], f"{r['median_s']:.2f} ({r['min_s']:.2f})",
                      ", ".join(f"{m:.2f}" for m in r["round_medians"]),
                      f"{r['peak_GiB']:.2f} ({r['after_imports_GiB']:.2f})", speed, mem, target))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-repo", type=Path, default=None,
                   help="work tree of lxa9867/ImageFolder (omit to measure ours only)")
    p.add_argument("--reference-python", default="/work/refenv/bin/python",
                   help="Python with the reference's dependencies (torch, timm 1.0.9, peft, einops)")
    p.add_argument("--sizes", default="S,B", help="comma-separated trunk sizes: S, B")
    p.add_argument("--variants", default="fp32,bf16,bf16-ckpt",
                   help=f"our variants, comma-separated, of {','.join(OUR_VARIANTS)}, each optionally with "
                   f"'{FIXED_MMAP_SUFFIX}'")
    p.add_argument("--reference-variants", default="fp32", help="the reference's: fp32 and/or bf16")
    # any variant + "+mmap" (e.g. bf16-ckpt+mmap): its child runs with MALLOC_MMAP_THRESHOLD_ fixed (see above)
    p.add_argument("--reps", type=int, default=2, help="rounds of the interleaved schedule")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per child before the timed ones")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every child")
    p.add_argument("--profile", action="store_true", help="profile one step of each child instead of timing")
    p.add_argument("--json", type=Path, default=None, help="write every child's record to this file")
    p.add_argument("--child", choices=("ours", "reference"), dest="side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default="S", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.side is not None:
        print(json.dumps(child(args)))
        return

    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted({v.removesuffix(FIXED_MMAP_SUFFIX) for v in args.variants} - set(OUR_VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {sorted(OUR_VARIANTS)}")
    args.reference_variants = [v for v in args.reference_variants.split(",") if v] if args.reference_repo else []
    sizes = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}  "
          f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps per child, {args.reps} rounds",
          flush=True)
    results = []
    for size in sizes:
        order = schedule(args, size)
        for rep in range(1 if args.profile else args.reps):
            for side, variant in order if rep % 2 == 0 else order[::-1]:
                r = run_child(args, side, size, variant)
                if r is None:
                    continue
                results.append(r)
                if args.json:  # after every child, so an interrupted run keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
                if r.get("profile"):
                    print(f"\n## ViT-{size} {side} {variant}: one step {r['wall_s']:.2f} s")
                    for name, secs, calls in r["top"]:
                        print(f"  {secs:8.3f} s  x{calls:<5d} {name}")
                    continue
                print(f"  ViT-{size} {side:9s} {variant:9s} steps {', '.join(f'{t:.2f}' for t in r['step_s'])} s, "
                      f"peak {r['peak_GiB']:.2f} GiB, load {r['load']:.1f}", flush=True)
        if not args.profile:
            print()
            print(format_table(summarise(results, size), size), flush=True)
            if size in REFERENCE_FIGURES:
                s, b = REFERENCE_FIGURES[size]
                print(f"(issue 9's reference figures for ViT-{size}: {s} s, {b / 1e9:.1f} GB)")
    print(f"# done {time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

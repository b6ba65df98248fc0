"""Time one tokenizer training step and measure its peak memory on the CPU.

A step is: forward (encoder -> quantizer -> decoder) + MSE reconstruction loss + the quantizer's own losses
+ backward, and then an AdamW step. Both are reported: "fwd+bwd" (what the reference figure below measured)
and "train" (fwd+bwd plus optimizer step and zero_grad).

Every (configuration, options) pair runs in a fresh subprocess so that peak-RSS readings do not mix. Inside it:

1. RSS is read right before the model is built (torch is already imported then);
2. phase A: ``warmup`` + ``steps`` fwd+bwd steps without an optimizer; ``ru_maxrss`` is read -> peak of fwd+bwd;
3. phase B (unless ``--no-optimizer``): ``warmup`` + ``steps`` full steps with AdamW (the first one allocates the
   optimizer state); ``ru_maxrss`` is read again -> peak of training. ``ru_maxrss`` never decreases, so the second
   reading is the peak of the whole process.

Usage::

    python benchmarks/train_step.py --config both
    python benchmarks/train_step.py --config xqgan-v-256 --batch 4 --channels-last --checkpointing --json out.json
    python benchmarks/train_step.py --config xqgan-v-256 --batch 4 --variants   # plain/cl/ckpt/cl+ckpt in turn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Reference figures for the 256-px XQ-GAN-V configuration (LlamaGen VQ-16 sizes, batch 4): measured by the team on
# this 2-core CPU with the public reference code, forward + reconstruction and quantizer losses + backward, without
# LPIPS or the discriminator (no optimizer step). Targets: >= 1.3x faster and <= 60% of this peak.
REFERENCE_S_PER_STEP = 38.0
REFERENCE_PEAK_BYTES = 10e9  # "10 GB"
TARGET_SPEEDUP = 1.3
TARGET_MEMORY_FRACTION = 0.6

# LlamaGen VQ-16 sizes: base 128 channels, multipliers 1,1,2,2,4 (16x downsampling), 2 ResBlocks per level in the
# encoder and 3 in the decoder (the cnn plugin's defaults), attention in the middle block and the lowest level,
# 16384 l2-normalised codes of dimension 8. 256-px images -> 16x16 tokens.
XQGAN_V_256: dict[str, Any] = {
    "resolution": 256,
    "batch_size": 4,
    "encoder": {"use": "cnn", "channels": 128, "channel_mult": [1, 1, 2, 2, 4], "z_channels": 256, "out_dim": 8},
    "quantizer": {"use": "vq", "codebook_size": 16384, "dim": 8, "l2_norm": True},
    "decoder": {"use": "cnn", "channels": 128, "channel_mult": [1, 1, 2, 2, 4], "z_channels": 256, "in_dim": 8},
}

CONFIGS = ("default", "xqgan-v-256")
GIB = 1024**3


# ----------------------------------------------------------------------------------------------------------------
# memory helpers (Linux: /proc/self/status in kB, ru_maxrss in KiB)


def current_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------------------------
# contention: the machine is shared, so every timed step also records how much CPU other processes took meanwhile


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy since boot (first line of /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_others: float, budget_s: float, window_s: float = 2.0) -> float:
    """Idle until other processes use less than ``max_others`` of the CPUs over a ``window_s`` window, or until
    ``budget_s`` has passed. Returns the seconds waited. (This process is idle meanwhile, so all busy time counts.)"""
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        b0 = machine_busy_seconds()
        time.sleep(window_s)
        if (machine_busy_seconds() - b0) / (window_s * (os.cpu_count() or 1)) < max_others:
            break
    return time.perf_counter() - start


class StepClock:
    """Wall time, this process's CPU time and the other processes' share of the machine's CPUs over an interval."""

    def __enter__(self) -> StepClock:
        self.t0, self.c0, self.b0 = time.perf_counter(), time.process_time(), machine_busy_seconds()
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        # kernel time and page faults: large tensors are mmapped fresh by the allocator on every step
        self.sys = r1.ru_stime - self.r0.ru_stime
        self.minflt = r1.ru_minflt - self.r0.ru_minflt
        others = machine_busy_seconds() - self.b0 - self.cpu
        self.others_share = min(max(others / (self.wall * (os.cpu_count() or 1)), 0.0), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# the measurement itself (runs in the child process)


def load_config(name: str) -> dict[str, Any]:
    """Component tables, resolution and batch size of a named configuration."""
    if name == "xqgan-v-256":
        return json.loads(json.dumps(XQGAN_V_256))  # deep copy
    if name == "default":
        from xqgan_core.registry import Registry

        reg = Registry.from_toml(REPO / "registry.toml")
        plain = reg.to_dict()
        return {
            "resolution": int(plain["data"]["resolution"]),
            "batch_size": int(plain["train"]["batch_size"]),
            "encoder": plain["encoder"],
            "quantizer": plain["quantizer"],
            "decoder": plain["decoder"],
        }
    raise ValueError(f"unknown config {name!r}; choose from {CONFIGS}")


@contextmanager
def maybe_bf16(enabled: bool) -> Iterator[None]:
    import torch

    if enabled:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from xqgan_core import build
    from xqgan_core.model import TokenizerModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config)
    batch = args.batch or cfg["batch_size"]
    res = cfg["resolution"]
    if args.checkpointing:
        cfg["encoder"]["checkpointing"] = True
        cfg["decoder"]["checkpointing"] = True

    rss_before = current_rss_bytes()
    model = TokenizerModel(build("encoder", cfg["encoder"]), build("quantizer", cfg["quantizer"]),
                           build("decoder", cfg["decoder"]))
    model.train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    images = (torch.rand(batch, 3, res, res) * 2 - 1).contiguous(memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())

    def fwd_bwd() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with maybe_bf16(args.bf16):
            recon, quant = model(images)
            loss = F.mse_loss(recon.float(), images) + quant.loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, float(loss.detach())

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    if args.profile:
        return profile(args, model, images, fwd_bwd)

    out: dict[str, Any] = {
        "config": args.config,
        "options": options_label(args),
        "batch": batch,
        "resolution": res,
        "params_M": n_params / 1e6,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "rss_before_build_GiB": rss_before / GIB,
    }

    # phase A: forward + losses + backward, no optimizer (comparable to the reference figure).
    # Per step: wall time, this process's CPU time and the other processes' share of the CPUs ("others"); on this
    # shared machine the step with the least interference ("best") is the estimate of the uncontended speed.
    fwd, walls, cpus, others, sys_s, faults = [], [], [], [], [], []
    waited = 0.0
    for i in range(args.warmup + args.steps):
        if i >= args.warmup and args.wait_quiet:
            waited += wait_until_quiet(args.max_others, args.wait_quiet)
        with StepClock() as clock:
            f, _, loss = fwd_bwd()
            model.zero_grad(set_to_none=True)
        if i >= args.warmup:
            fwd.append(f)
            walls.append(clock.wall)
            cpus.append(clock.cpu)
            others.append(clock.others_share)
            sys_s.append(clock.sys)
            faults.append(clock.minflt)
    peak_a = peak_rss_bytes()
    best = min(range(len(walls)), key=walls.__getitem__)
    out.update(
        fwd_s=mean(fwd), fwd_bwd_s=mean(walls), fwd_bwd_min_s=walls[best], fwd_bwd_min_others=others[best],
        fwd_bwd_all_s=walls, fwd_bwd_cpu_all_s=cpus, fwd_bwd_sys_all_s=sys_s, fwd_bwd_minor_faults=faults, fwd_bwd_others_all=others, others_mean=mean(others),
        peak_fwd_bwd_GiB=peak_a / GIB, peak_fwd_bwd_increase_GiB=(peak_a - rss_before) / GIB, loss=loss,
    )

    # phase B: full training step with AdamW
    if not args.no_optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        steps, others_b = [], []
        for i in range(args.warmup + args.steps):
            if i >= args.warmup and args.wait_quiet:
                waited += wait_until_quiet(args.max_others, args.wait_quiet)
            with StepClock() as clock:
                fwd_bwd()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                steps.append(clock.wall)
                others_b.append(clock.others_share)
        peak_b = peak_rss_bytes()
        out.update(
            train_s=mean(steps), train_min_s=min(steps), train_all_s=steps, train_others_all=others_b,
            peak_train_GiB=peak_b / GIB, peak_train_increase_GiB=(peak_b - rss_before) / GIB,
        )
    out["load_after"] = os.getloadavg()
    out["waited_for_quiet_s"] = waited
    return out


def profile(args: argparse.Namespace, model: Any, images: Any, fwd_bwd: Any) -> dict[str, Any]:
    """One profiled fwd+bwd step after the warmup: top operators by self CPU time, and time per top-level stage."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    for _ in range(args.warmup):
        fwd_bwd()
        model.zero_grad(set_to_none=True)
    # label the stages so the profile can be split by where the time goes (forward part only: autograd
    # runs the backward of every stage outside these ranges)
    stages = [("enc." + n, m) for n, m in model.encoder.named_children()] + [("quantizer", model.quantizer)] + [
        ("dec." + n, m) for n, m in model.decoder.named_children()]
    handles = []
    for name, module in stages:
        mods = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        for j, m in enumerate(mods):
            label = f"{name}.{j}" if len(mods) > 1 else name
            handles.append(m.register_forward_pre_hook(lambda _m, _i, label=label: _m.__dict__.__setitem__(
                "_rf", record_function("stage::" + label).__enter__())))
            handles.append(m.register_forward_hook(lambda _m, _i, _o: _m.__dict__.pop("_rf").__exit__(None, None, None)))
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        t0 = time.perf_counter()
        fwd_bwd()
        wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    events = prof.key_averages()
    ops = sorted((e for e in events if not e.key.startswith("stage::")), key=lambda e: e.self_cpu_time_total,
                 reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:25]]
    fwd_stages = [{"stage": e.key[len("stage::"):], "fwd_s": e.cpu_time_total / 1e6}
                  for e in events if e.key.startswith("stage::")]
    return {"config": args.config, "options": options_label(args), "profile": True, "wall_s": wall,
            "self_total_s": total, "top_ops": top, "forward_stages": fwd_stages}


# ----------------------------------------------------------------------------------------------------------------
# the parent: one subprocess per (config, options), then a table


def options_label(args: argparse.Namespace) -> str:
    parts = [name for flag, name in ((args.channels_last, "channels-last"), (args.checkpointing, "checkpointing"),
                                     (args.bf16, "bf16")) if flag]
    return "+".join(parts) or "plain"


def run_child(args: argparse.Namespace, config: str, flags: dict[str, bool]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", config,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_optimizer:
        cmd.append("--no-optimizer")
    if args.wait_quiet:
        cmd += ["--wait-quiet", str(args.wait_quiet), "--max-others", str(args.max_others)]
    if args.profile:
        cmd.append("--profile")
    cmd += [f"--{name}" for name, on in flags.items() if on]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_profile(r: dict[str, Any]) -> None:
    print(f"\n## profile: {r['config']} [{r['options']}]: one fwd+bwd step {r['wall_s']:.2f} s wall, "
          f"{r['self_total_s']:.2f} s op self time (main thread)")
    print("top operators by self CPU time (forward and backward):")
    for t in r["top_ops"]:
        print(f"  {t['self_s']:8.3f} s  {100 * t['self_s'] / r['self_total_s']:5.1f}%  x{t['calls']:<5d} {t['op']}")
    print("forward time per stage:")
    for st in r["forward_stages"]:
        print(f"  {st['fwd_s']:8.3f} s  {st['stage']}")


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table. Times are "mean (best)" over the timed steps; images/s and the speed ratio use the best step,
    which is the estimate least affected by other jobs on a shared machine. "others" is the share of the machine's
    CPUs that other processes used during the fwd+bwd steps: mean (during the best step)."""
    head = ("config", "batch", "options", "fwd+bwd s/step", "others", "img/s", "train s/step", "img/s",
            "peak fwd+bwd GiB (+incr)", "peak train GiB (+incr)", "load 1m", "vs ref: speed / peak")
    rows = []
    for r in results:
        vs = ""
        if r["config"] == "xqgan-v-256" and r["batch"] == 4:
            speed = REFERENCE_S_PER_STEP / r["fwd_bwd_min_s"]
            mem = r["peak_fwd_bwd_GiB"] * GIB / REFERENCE_PEAK_BYTES
            ok = speed >= TARGET_SPEEDUP and mem <= TARGET_MEMORY_FRACTION
            vs = f"{speed:.2f}x / {mem:.0%}{' (target met)' if ok else ''}"
        train = r.get("train_s")
        rows.append((
            r["config"], str(r["batch"]), r["options"], f"{r['fwd_bwd_s']:.2f} ({r['fwd_bwd_min_s']:.2f})",
            f"{r['others_mean']:.0%} ({r['fwd_bwd_min_others']:.0%})", f"{r['batch'] / r['fwd_bwd_min_s']:.2f}",
            f"{train:.2f} ({r['train_min_s']:.2f})" if train else "-",
            f"{r['batch'] / r['train_min_s']:.2f}" if train else "-",
            f"{r['peak_fwd_bwd_GiB']:.2f} (+{r['peak_fwd_bwd_increase_GiB']:.2f})",
            f"{r['peak_train_GiB']:.2f} (+{r['peak_train_increase_GiB']:.2f})" if train else "-",
            f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}", vs,
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=(*CONFIGS, "both"), default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps per phase (after the warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in encoder and decoder")
    p.add_argument("--bf16", action="store_true", help="forward under torch.autocast('cpu', dtype=bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed step wait up to SECONDS for other processes to use < --max-others of the "
                   "CPUs (for shared machines; 0 = don't wait)")
    p.add_argument("--max-others", type=float, default=0.15, help="CPU share of other processes that counts as quiet")
    p.add_argument("--no-optimizer", action="store_true", help="skip the AdamW phase (fwd+bwd only)")
    p.add_argument("--variants", action="store_true",
                   help="run plain, channels-last, checkpointing and channels-last+checkpointing (plus --bf16 if given)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile one fwd+bwd step (torch.profiler) and print where time goes")
    p.add_argument("--json", type=Path, default=None, help="write all results (with environment) to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args)))
        return

    configs = CONFIGS if args.config == "both" else (args.config,)
    if args.variants:
        combos = [dict(channels_last=cl, checkpointing=ck, bf16=args.bf16) for ck in (False, True) for cl in (False, True)]
    else:
        combos = [dict(channels_last=args.channels_last, checkpointing=args.checkpointing, bf16=args.bf16)]
    flags = [{k.replace("_", "-"): v for k, v in c.items()} for c in combos]

    import torch

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu_count']} CPUs ({env['cpu_capability']})  "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for config in configs:
        for f in flags:
            r = run_child(args, config, f)
            results.append(r)
            if r.get("profile"):
                print_profile(r)
                continue
            print(f"  {r['config']} [{r['options']}] batch {r['batch']}: fwd+bwd "
                  f"{', '.join(f'{w:.1f}' for w in r['fwd_bwd_all_s'])} s (others "
                  f"{', '.join(f'{o:.0%}' for o in r['fwd_bwd_others_all'])}), "
                  f"train {r.get('train_s', float('nan')):.2f} s, peak {r['peak_fwd_bwd_GiB']:.2f} / "
                  f"{r.get('peak_train_GiB', float('nan')):.2f} GiB, load {r['load_before'][0]:.1f}->"
                  f"{r['load_after'][0]:.1f}", flush=True)
    if args.profile:
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
        return
    print()
    print(format_table(results))
    if any(r["config"] == "xqgan-v-256" and r["batch"] == 4 for r in results):
        print(f"\nreference (public code, batch 4, fwd+losses+bwd): {REFERENCE_S_PER_STEP:.0f} s/step, "
              f"{REFERENCE_PEAK_BYTES / 1e9:.0f} GB peak; target <= {REFERENCE_S_PER_STEP / TARGET_SPEEDUP:.1f} s "
              f"and <= {TARGET_MEMORY_FRACTION * REFERENCE_PEAK_BYTES / GIB:.2f} GiB "
              f"({TARGET_MEMORY_FRACTION * REFERENCE_PEAK_BYTES / 1e9:.0f} GB)")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

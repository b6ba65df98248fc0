"""What semantic alignment costs on the XQ-GAN-SC MSVR10P2 training step, ours next to the reference's (issue 10).

The step (as in ``vit_step.py``): forward + MSE reconstruction + the quantizer's losses + backward, batch 4 at 256 px,
ViT-B encoder and decoder with random weights, no LPIPS, no optimizer step. Measured in three modes, interleaved
step by step inside ONE process per side (same model, same memory, same threads; load from other jobs hits every
mode alike), median over all timed steps:

* ``plain``: no alignment;
* ``aligned``: + the aligners of ``configs/xqgan-sc-msvr10p2-4096.toml`` (DINOv2-B/16 on the semantic branch, CLIP
  ViT-B/16 on the detail branch, global InfoNCE), their teachers with random weights of the real size saved to files
  and read through the plugins' real loaders; the reference: its ``semantic_guide = dinov2`` + ``detail_guide =
  clip`` (``guide_type_2 = patch``, the only value its code accepts), random weights, both losses in the backward;
* ``aligned, bf16 teachers`` (ours only): the same with ``teacher_precision = "bf16"`` (``auto``, the default, is
  fp32 on a CPU);
* ``aligned+dino`` (ours only): + the DINO discriminator (real ViT-S/16 size, random trunk) behind DiffAugment: the
  adversarial term in the tokenizer's pass and the discriminator's own forward / backward (``TokenizerTask.
  training_step`` past ``disc_start``).

Ours toggles alignment with ``loss.alignment = 0`` (the run-file switch), the reference by setting its guide
attributes to ``"none"`` between steps. Each side also times its teachers' forward alone (fp32 and bf16 autocast)
to say where the alignment time goes.

Usage (reference tree: ``git -C /work/.mirror/lxa9867+ImageFolder/repo archive HEAD | tar -x -C /tmp/ref``)::

    .venv/bin/python benchmarks/alignment_step.py --reference-repo /tmp/ref          # ours and the reference, fp32
    .venv/bin/python benchmarks/alignment_step.py --precision bf16                   # ours in bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_step import GIB, REPO, RUN_FILE, SIZES, proc_status_bytes  # noqa: E402 - the ViT step's machinery

#: the reference's figures on this CPU (issue 10): s/step without and with its DINOv2 + CLIP guides
REFERENCE_FIGURES = (11.1, 12.8)
TARGET_ALIGNMENT_OVERHEAD = 0.10  # ours: alignment at most +10 % on the same step


# ----------------------------------------------------------------------------------------------------------------
# random teachers of the real size, as files the plugins' loaders read


def write_random_teachers(folder: Path) -> dict[str, Path]:
    """DINOv2-B/14 (timm, released geometry: 518 px) and the CLIP ViT-B/16 image tower (open_clip), random weights."""
    import open_clip
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files = {"dinov2": folder / "dinov2-b14-random.safetensors", "clip": folder / "clip-b16-visual-random.safetensors"}
    torch.manual_seed(0)
    if not files["dinov2"].exists():
        net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files["dinov2"]))
    if not files["clip"].exists():
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, str(files["clip"]))
    return files


# ----------------------------------------------------------------------------------------------------------------
# the two sides: build, then a step per mode


def our_side(size: str, precision: str, batch: int, teachers: dict[str, Path], dino: bool) -> dict[str, Any]:
    """Mode -> step function, and the teachers' forward, for our task built from the MSVR10P2 preset."""
    import tomllib

    import attrs
    import torch

    from xqgan_core.alignment import shared_teachers  # noqa: F401 - the task builds its aligners inside it
    from xqgan_core.distributed import DistEnv
    from xqgan_core.hooks import make_plugin_manager
    from xqgan_core.precision import Precision
    from xqgan_core.registry import Registry
    from xqgan_core.task import Runtime
    from xqgan_core.tokenizer_task import TokenizerTask

    width, heads = SIZES[size]
    data = tomllib.loads(RUN_FILE.read_text(encoding="utf-8"))
    for part in ("encoder", "decoder"):
        data[part].update(init="", embed_dim=width, num_heads=heads)
    for table in data["aligners"]:
        table["weights"] = str(teachers[table["use"]])
    for table in data["discriminators"]:
        table["init"] = ""  # DINO ViT-S/16 with seeded random weights
    data["device"] = {"use": "cpu"}
    data["data"] = {"use": "sample", "resolution": 256}
    data["loss"].update(perceptual=0.0, require_perceptual=False, disc_start=1)
    data["eval"] = {"lpips": False}
    data["train"].update(precision=precision, ema_decay=0.0, num_workers=0, batch_size=batch)
    cfg = Registry.from_dict(data, source=f"{RUN_FILE} (benchmark overrides)").config
    device = cfg.device.build()
    runtime = Runtime(device, Precision(device, cfg.train.precision), DistEnv(), Path(tempfile.mkdtemp()), seed=0)
    task = TokenizerTask(Registry(cfg), runtime, make_plugin_manager(), resuming=False)
    task.model.train()
    batch_ = [{"image": torch.rand(batch, 3, 256, 256) * 2 - 1}]
    on, off = cfg, attrs.evolve(cfg, loss=attrs.evolve(cfg.loss, alignment=0.0))

    teachers_held = [aligner.teacher for aligner in task.aligners]  # one shared object per distinct teacher

    def step(config: Any, disc_step: int, teacher_precision: str = "auto") -> Callable[[], None]:
        def run() -> None:
            task.cfg = config
            for teacher in teachers_held:
                teacher.precision = teacher_precision
            task.training_step(batch_, disc_step)  # forward + backward (+ the discriminator's once on)

        return run

    modes = {"plain": step(off, 0), "aligned": step(on, 0), "aligned, bf16 teachers": step(on, 0, "bf16")}
    if dino:
        modes["aligned+dino"] = step(on, 1)
    teacher_objs = {spec.use: aligner.teacher for spec, aligner in zip(cfg.aligners, task.aligners)}
    def features(teacher: Any, x: Any, bf16: bool) -> Any:  # as training runs it: the teacher's own precision
        teacher.precision = "bf16" if bf16 else "fp32"
        try:
            return teacher.features(x)
        finally:
            teacher.precision = "auto"

    return {"modes": modes, "teachers": teacher_forwards(teacher_objs, batch_[0]["image"], features),
            "params_M": sum(p.numel() for p in task.model.parameters()) / 1e6}


def reference_side(size: str, batch: int, repo: str) -> dict[str, Any]:
    """Mode -> step function for the reference's VQModel with its guides switched on / off between steps."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "scripts"))
    from reference_models import build_reference_vit_tokenizer, ensure_process_group

    ensure_process_group()  # its guides' ClipLoss and the code-hit all-reduce need a (one-process) group
    model = build_reference_vit_tokenizer(repo, size=size, train=True, semantic_guide="dinov2", detail_guide="clip",
                                          guide_type_2="patch")
    images = torch.rand(batch, 3, 256, 256) * 2 - 1

    def step(guides: bool) -> Callable[[], None]:
        def run() -> None:
            model.semantic_guide = "dinov2" if guides else "none"
            model.detail_guide = "clip" if guides else "none"
            model.zero_grad(set_to_none=True)
            recon, codebook, sem, detail, _ = model(images, 0, 0.0, 0.0, 0.0)  # epoch, perturbation alpha/beta/delta
            loss = F.mse_loss(images, recon) + codebook[0] + codebook[1] + codebook[2]
            loss = loss + (sem if sem is not None else 0.0) + (detail if detail is not None else 0.0)
            loss.backward()

        return run

    normalize = lambda x: model.normalize(model.denormalize(x))  # noqa: E731 - its input transform for the guides
    teachers = {"dinov2": model.semantic_model, "clip": model.detail_model}

    def forward(net: Any, x: Any, bf16: bool) -> Any:  # bf16: autocast around its fp32 teacher, as its trainer
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net.forward_features(normalize(x))

    return {"modes": {"plain": step(False), "aligned": step(True)},
            "teachers": teacher_forwards(teachers, images, forward),
            "params_M": sum(p.numel() for n, p in model.named_parameters()
                            if not n.startswith(("semantic_model", "detail_model"))) / 1e6}


def teacher_forwards(teachers: dict[str, Any], images: Any, forward: Callable[[Any, Any, bool], Any]
                     ) -> dict[str, Any]:  # fmt: skip
    """name -> {precision: function timing one forward of that teacher on the batch}; ``forward(net, images, bf16)``
    runs it the way its side's training does in that precision."""

    def timed(net: Any, bf16: bool) -> Callable[[], None]:
        def run() -> None:
            forward(net, images, bf16)

        return run

    return {name: {"fp32": timed(net, False), "bf16": timed(net, True)} for name, net in teachers.items()}


# ----------------------------------------------------------------------------------------------------------------
# a child: one side, every mode interleaved


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.side == "ours":
        teachers = {k: Path(v) for k, v in json.loads(args.teacher_files).items()}
        side = our_side(args.size, args.precision, args.batch, teachers, not args.no_dino)
    else:
        side = reference_side(args.size, args.batch, args.reference_repo)
    modes: dict[str, Callable[[], None]] = side["modes"]
    for run in modes.values():  # warm-up: one untimed step per mode
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}  # this process's CPU time: robust to other jobs' load
    order = list(modes)
    for r in range(args.rounds):  # ABC CBA ABC ...: each mode as often first as last
        for mode in order if r % 2 == 0 else order[::-1]:
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                modes[mode]()
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
                print(f"{args.side} {mode}: {times[mode][-1]:.2f} s, CPU {cpu[mode][-1]:.2f} s", file=sys.stderr,
                      flush=True)
    teacher_s: dict[str, dict[str, float]] = {}
    for name, by_precision in side["teachers"].items():
        teacher_s[name] = {}
        for precision, run in by_precision.items():
            run()  # warm-up
            samples = []
            for _ in range(3):
                c0 = time.process_time()
                run()
                samples.append(time.process_time() - c0)
            teacher_s[name][precision] = statistics.median(samples)
    return {"side": args.side, "size": args.size, "precision": args.precision if args.side == "ours" else "fp32",
            "batch": args.batch, "threads": torch.get_num_threads(), "params_M": side["params_M"],
            "step_s": times, "step_cpu_s": cpu, "teacher_forward_s": teacher_s, "peak_GiB": proc_status_bytes("VmHWM") / GIB,
            "load": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------------------------------------
# the parent


def run_child(args: argparse.Namespace, side: str, teachers: dict[str, Path]) -> dict[str, Any] | None:
    python = sys.executable if side == "ours" else args.reference_python
    cmd = [python, str(Path(__file__).resolve()), "--child", side, "--size", args.size, "--batch", str(args.batch),
           "--precision", args.precision, "--rounds", str(args.rounds), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--teacher-files", json.dumps({k: str(v) for k, v in teachers.items()})]
    if side == "reference":
        cmd += ["--reference-repo", str(args.reference_repo)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_dino:
        cmd.append("--no-dino")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:] + f"\nbenchmark child failed: {' '.join(cmd)}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| side | precision | mode | s/step median (min) | steps | vs plain | share of the step |",
             "|---|---|---|---|---|---|---|"]
    for side in ("ours", "reference"):
        rs = [r for r in results if r["side"] == side]
        if not rs:
            continue
        steps = {m: [t for r in rs for t in r["step_s"].get(m, [])] for m in rs[0]["step_s"]}
        plain = statistics.median(steps["plain"])
        previous = plain
        for mode, ts in steps.items():
            med = statistics.median(ts)
            extra = ("-" if mode == "plain" else f"+{med / previous - 1:.1%} (DINO disc, vs aligned)"
                     if mode == "aligned+dino" else f"+{med / plain - 1:.1%} (alignment)")
            lines.append(f"| {side} | {rs[0]['precision']} | {mode} | {med:.2f} ({min(ts):.2f}) | {len(ts)} | "
                         f"{med / plain:.3f}x | {extra} |")
            if mode == "aligned":
                previous = med
    lines.append("")
    lines.append("CPU time (this process, all threads; robust to other jobs' load), median per mode:")
    for r in results:
        if "step_cpu_s" in r:
            lines.append(f"  {r['side']:9s} " + ", ".join(f"{m} {statistics.median(ts):.2f} s"
                                                         for m, ts in r["step_cpu_s"].items()))
    lines.append("teachers' forward alone, batch of the step, CPU time (median of 3):")
    for r in results[:2] if len(results) > 1 else results:
        for name, t in r["teacher_forward_s"].items():
            lines.append(f"  {r['side']:9s} {name:7s} fp32 {t['fp32']:.2f} s, bf16 autocast {t['bf16']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-repo", type=Path, default=None, help="work tree of lxa9867/ImageFolder (omit: ours only)")
    p.add_argument("--reference-python", default="/work/refenv/bin/python")
    p.add_argument("--size", default="B", choices=sorted(SIZES), help="trunk size of encoder and decoder")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="our train.precision")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds inside each child")
    p.add_argument("--steps", type=int, default=1, help="timed steps per mode per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before the rounds")
    p.add_argument("--reps", type=int, default=1, help="children per side, ours and the reference's alternated")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-dino", action="store_true", help="skip the DINO discriminator mode")
    p.add_argument("--teachers-dir", type=Path, default=Path(tempfile.gettempdir()) / "xqgan-bench-teachers",
                   help="where the random teachers of the real size are written (kept for reruns, ~0.7 GB)")
    p.add_argument("--json", type=Path, default=None, help="write every child's record to this file")
    p.add_argument("--child", choices=("ours", "reference"), dest="side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher-files", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_repo and args.size != "B":
        p.error("the reference's guides need ViT-B: its CLIP-B detail guide goes through the encoder-width quant_conv")
    if args.side is not None:
        print(json.dumps(child(args)))
        return

    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}  "
          f"ViT-{args.size}, batch {args.batch}, ours {args.precision}; per child {args.warmup} warm-up + "
          f"{args.rounds} rounds x {args.steps} step(s) per mode", flush=True)
    teachers = write_random_teachers(args.teachers_dir)
    sides = ["ours", "reference"] if args.reference_repo else ["ours"]
    results = []
    for rep in range(args.reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            r = run_child(args, side, teachers)
            if r is None:
                continue
            results.append(r)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
            steps = "; ".join(f"{m} " + ", ".join(f"{t:.2f}" for t in ts) for m, ts in r["step_s"].items())
            print(f"  {side:9s} {steps} s; peak {r['peak_GiB']:.2f} GiB, load {r['load']:.1f}", flush=True)
    print()
    print(format_table(results))
    print(f"(issue 10's reference figures: {REFERENCE_FIGURES[0]} -> {REFERENCE_FIGURES[1]} s, "
          f"+{REFERENCE_FIGURES[1] / REFERENCE_FIGURES[0] - 1:.0%}; target for ours: alignment <= "
          f"+{TARGET_ALIGNMENT_OVERHEAD:.0%})")
    print(f"# done {time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

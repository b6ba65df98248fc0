"""Time one tokenizer training step and its peak memory on a CUDA GPU.

The same model and step as ``train_step.py`` (forward encoder -> quantizer -> decoder, MSE + the quantizer's losses,
backward, then AdamW), timed with CUDA synchronisation; peak memory is ``torch.cuda.max_memory_allocated``.
Each variant runs in this one process with the peak counter reset in between, so run it on an otherwise idle GPU.

Usage::

    python benchmarks/cuda_step.py --config xqgan-v-256 --batch 4 32 --json cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import CONFIGS, GIB, load_config  # noqa: E402  (same model tables as the CPU benchmark)

VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {},
    "tf32": {"tf32": True},
    "bf16": {"bf16": True},
    "bf16+channels-last": {"bf16": True, "channels_last": True},
    "bf16+checkpointing": {"bf16": True, "checkpointing": True},
}


def measure(config: str, batch: int, variant: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from xqgan_core import build
    from xqgan_core.model import TokenizerModel

    flags = VARIANTS[variant]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(flags.get("tf32"))
    torch.manual_seed(0)
    cfg = load_config(config)
    if flags.get("checkpointing"):
        cfg["encoder"]["checkpointing"] = cfg["decoder"]["checkpointing"] = True
    dev = torch.device("cuda")
    fmt = torch.channels_last if flags.get("channels_last") else torch.contiguous_format
    model = TokenizerModel(build("encoder", cfg["encoder"]), build("quantizer", cfg["quantizer"]),
                           build("decoder", cfg["decoder"])).to(dev, memory_format=fmt).train()
    res = cfg["resolution"]
    images = (torch.rand(batch, 3, res, res, device=dev) * 2 - 1).contiguous(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    def step(with_opt: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(flags.get("bf16"))):
            recon, quant = model(images)
            loss = F.mse_loss(recon.float(), images) + quant.loss
        loss.backward()
        if with_opt:
            opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict[str, Any] = {"config": config, "variant": variant, "batch": batch, "resolution": res,
                           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for phase, with_opt in (("fwd_bwd", False), ("train", True)):
        for _ in range(warmup):
            step(with_opt)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step(with_opt)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[f"{phase}_median_s"] = med
        out[f"{phase}_min_s"] = min(times)
        out[f"{phase}_images_per_s"] = batch / med
        out[f"{phase}_peak_GiB"] = torch.cuda.max_memory_allocated() / GIB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="xqgan-v-256")
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("cuda_step.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · CUDA {torch.version.cuda}")
    print("| config | batch | variant | fwd+bwd s (img/s) | train s (img/s) | peak GiB (train) |")
    print("|---|---|---|---|---|---|")
    results = []
    for batch in args.batch:
        for variant in args.variants:
            r = measure(args.config, batch, variant, args.steps, args.warmup)
            torch.cuda.empty_cache()  # the finished variant's model and optimizer are garbage now
            results.append(r)
            print(f"| {r['config']} | {batch} | {variant} | {r['fwd_bwd_median_s']:.4f} ({r['fwd_bwd_images_per_s']:.1f})"
                  f" | {r['train_median_s']:.4f} ({r['train_images_per_s']:.1f}) | {r['train_peak_GiB']:.2f} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

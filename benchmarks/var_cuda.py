"""VAR-d16 on a GPU (issue 11): training images/s and sampling images/s of our ``var`` generator at batch 64, on the
token layout of the paper's XQGAN-MSVR10P2-4096 tokenizer (286 steps of 2 tokens from 4096 codes each; the quantizer
of ``configs/xqgan-sc-msvr10p2-4096.toml`` with random weights builds the next-scale inputs), 1000 classes.

* train: a full optimizer step as ``GeneratorTask`` runs it (forward with the next-scale inputs, token cross entropy,
  backward, gradient clipping at 2, AdamW with VAR's decay groups), bf16 autocast by default; images/s and the peak
  memory (``torch.cuda.max_memory_allocated``).
* sample: ``sample()`` with the KV cache, classifier-free guidance 4.25 (the reference's --cfg 3.25), top-k 750,
  top-p 0.95 (the reference's settings), tokens only (no pixels); images/s.

Usage (an otherwise idle GPU; ``scripts/device-check.sh`` runs it)::

    python benchmarks/var_cuda.py --depth 16 --batch 64 --json var-d16.json
    python benchmarks/var_cuda.py --device cpu --depth 2 --batch 2 --steps 2 --warmup 1   # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_PRESET = REPO / "configs" / "xqgan-sc-msvr10p2-4096.toml"
NUM_CLASSES = 1000
GIB = 1024**3


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from xqgan_core import Registry, build
    from xqgan_core.generator_task import decay_groups
    from xqgan_core.sampling import token_cross_entropy

    device = torch.device(args.device)
    torch.manual_seed(0)
    tokenizer = Registry.from_toml(TOKENIZER_PRESET).config
    quantizer = tokenizer.quantizer.build().to(device).eval()
    grid = tokenizer.encoder.config.latent_size
    layout = quantizer.token_layout(grid, grid)
    generator = build("generator", {"use": "var", "depth": args.depth, "drop_path": 0.1 * args.depth / 24})
    generator.bind(layout, quantizer, NUM_CLASSES)
    generator.to(device)
    params = sum(p.numel() for p in generator.parameters())
    opt = torch.optim.AdamW(decay_groups(generator, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")  # fmt: skip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    g = torch.Generator().manual_seed(0)
    tokens = torch.stack([torch.randint(v, (args.batch, layout.length), generator=g) for v in layout.vocab_sizes], -1)
    tokens, labels = tokens.to(device), torch.randint(NUM_CLASSES, (args.batch,), generator=g).to(device)

    def train_step() -> None:
        with autocast:
            loss = token_cross_entropy(generator(tokens, labels).logits, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample() -> None:
        with torch.no_grad(), autocast:
            generator.sample(args.batch, labels, cfg_scale=4.25, top_k=750, top_p=0.95,
                             generator=torch.Generator(device=device).manual_seed(1))  # fmt: skip

    out: dict[str, Any] = {"depth": args.depth, "params": params, "batch": args.batch, "steps_per_image": layout.length,
                           "precision": args.precision, "device": str(device),
                           "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    for mode, call in (("train", train_step), ("sample", sample)):
        generator.train(mode == "train")
        for _ in range(args.warmup):
            call()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[mode] = {"s_per_call": seconds, "images_per_s": args.batch / seconds,
                     "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=10, help="timed calls per mode (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    result = measure(args)
    print(f"VAR-d{result['depth']} ({result['params'] / 1e6:.1f} M parameters, {result['steps_per_image']} steps of "
          f"2 tokens) on {result['name']}, batch {result['batch']}, {result['precision']}:")
    for mode in ("train", "sample"):
        r = result[mode]
        peak = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
        print(f"  {mode:6s} {r['s_per_call'] * 1000:8.1f} ms/call  {r['images_per_s']:8.1f} images/s{peak}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Held-out evaluation of a tokenizer (PSNR, SSIM, LPIPS, codebook use, optionally rFID) and reconstruction grids.

Two codebook-use numbers, not to be confused: ``utilization`` (``metrics.CodebookUsage``: % of a codebook's codes
hit at least once over the pass) and ``var_usage`` (``metrics.VarCodebookUsage``: the "usage" VAR and the XQ-GAN
reference code print, % of codes hit at least 8 % as often as a uniform spread of the full-resolution positions
would, per scale; the column the paper reports).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import image_grid
from .metrics import CodebookUsage, MetricAverager, VarCodebookUsage, bicubic_thumbnail, psnr, ssim
from .model import TokenizerModel

if TYPE_CHECKING:
    from .fid import ReconstructionFid

T = TypeVar("T")


def _leaves_global_rng_alone(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` on forked RNG states (CPU and ``device``'s), so that evaluating in the middle of a run changes
    nothing in the training run's random stream: a resumed run stays bit-identical whatever was evaluated."""

    @functools.wraps(fn)
    def wrapper(model: Any, dataset: Any, device: Any, *args: Any, **kwargs: Any) -> T:
        with forked_rng(device):
            return fn(model, dataset, device, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def forked_rng(device: Any) -> Iterator[None]:
    """The CPU's and the xqgan ``device``'s RNG states are restored on exit: random draws inside (evaluation,
    sample grids) leave the training run's random stream as it was."""
    dev = device.torch_device
    # the accelerator's generator too, where its torch module exposes one (cuda; hpu with its plugin)
    forkable = hasattr(getattr(torch, dev.type, None), "get_rng_state") and dev.type != "cpu"
    accelerator = [dev.index or 0] if forkable else []
    with torch.random.fork_rng(devices=accelerator, device_type=dev.type if forkable else "cuda"):
        yield


@_leaves_global_rng_alone
@torch.no_grad()
def evaluate(
    model: TokenizerModel,
    dataset: torch.utils.data.Dataset,
    device: Any,
    *,
    batch_size: int = 8,
    max_images: int = 0,
    perceptual: torch.nn.Module | None = None,
    grid_images: int = 0,
    progress: bool = True,
    rfid: ReconstructionFid | None = None,
) -> tuple[dict[str, float], tuple[Tensor, Tensor] | None]:
    """Metrics over ``dataset`` (the first ``max_images``; 0 = all) and the first ``grid_images`` pairs.

    ``rfid`` (``xqgan_core.fid.ReconstructionFid``) adds ``rfid``: the FID of the reconstructions against the
    originals (or the reference statistics it holds)."""
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    # its own generator: creating the iterator would otherwise draw a seed from the global (training) RNG
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    averages = MetricAverager()
    usage: CodebookUsage | None = None
    var_usage: VarCodebookUsage | None = None
    group_names: list[str] = []
    originals, recons = [], []
    dev = device.torch_device
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x = batch["image"].to(dev)
        recon, quant = model(x)
        recon = recon.float().clamp(-1, 1)
        values = {"psnr": psnr(recon, x), "ssim": ssim(recon, x)}
        # baseline: a thumbnail at the token grid's size (the quantizer's input map, as the model ran it)
        thumbnail = bicubic_thumbnail(x, tuple(quant.z_q.shape[-2:]))
        values["thumbnail/psnr"] = psnr(thumbnail, x)
        values["thumbnail/ssim"] = ssim(thumbnail, x)
        if perceptual is not None:
            values["lpips"] = perceptual(recon, x)
        averages.update(values)
        # indices are read through the quantizer's token layout: one histogram per codebook it names
        layout = model.quantizer.token_layout(*quant.z_q.shape[-2:])
        sequence = layout.to_sequence(quant.indices)
        groups = layout.codebook_tokens(sequence)
        var_usage = var_usage or VarCodebookUsage(layout)
        var_usage.update(sequence)
        if rfid is not None:
            rfid.update(x, recon)
        if usage is None:
            group_names = list(groups)
            sizes = layout.codebook_sizes
            usage = CodebookUsage([sizes[g] for g in group_names] if len(groups) > 1 else sizes[group_names[0]])
        usage.update(list(groups.values()) if len(groups) > 1 else groups[group_names[0]])
        if sum(o.shape[0] for o in originals) < grid_images:
            originals.append(x.cpu())
            recons.append(recon.cpu())
    metrics = averages.compute()
    codebook = usage.compute() if usage is not None else {}
    for key, value in codebook.items():  # per-codebook entries come as "utilization/<i>": name them
        name, _, index = key.partition("/")
        metrics[f"{name}/{group_names[int(index)]}" if index else name] = value
    if var_usage is not None:
        metrics.update(var_usage.compute())
    if rfid is not None and n > 0:
        metrics.update(rfid.compute())
    metrics["images"] = float(n)
    model.train(was_training)
    grid = None
    if originals:
        grid = (torch.cat(originals)[:grid_images], torch.cat(recons)[:grid_images])
    return metrics, grid


def save_grid(originals: Tensor, recons: Tensor, path: str | Path, columns: int = 8) -> Path:
    """A PNG with rows of originals, each followed by a row of their reconstructions (2 px white gutters)."""
    columns = max(1, min(columns, originals.shape[0]))
    top, bottom = (image_grid.in_rows(image_grid.to_uint8(images), columns) for images in (originals, recons))
    pairs = np.stack([top, bottom], axis=1)  # (rows, 2, columns, H, W, 3): a row of originals, then theirs
    return image_grid.save_grid(image_grid.grid_image(pairs.reshape(-1, *pairs.shape[2:])), path)

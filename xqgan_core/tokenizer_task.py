"""The tokenizer recipe as a ``Task``: encoder -> quantizer -> decoder trained with reconstruction, perceptual,
quantizer, alignment and adversarial terms (the adversarial one scaled by the adaptive weight), discriminators
trained with LeCam and lazy R1 and seeing images through DiffAug (``loss.diffaug``), an EMA of the weights, ``train.init_from`` and adapters for fine-tuning.

The loop around it (data order, read-back, skipping, checkpoints, cadence) is the ``Trainer``'s.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pluggy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ckpt
from .alignment import AlignmentInputs, shared_teachers
from .diffaug import DiffAug
from .distributed import all_reduce_mean_grads, broadcast_buffers, broadcast_module_state, wrap_ddp
from .errors import CheckpointError, ConfigError
from .evaluation import evaluate, save_grid
from .losses import LeCam, adaptive_weight, adversarial_loss, discriminator_loss, r1_penalty
from .model import TokenizerModel
from .optim import EMA, clip_gradients, warmup_schedule
from .perceptual import Perceptual, load_lpips
from .registry import Registry
from .task import Batch, Runtime, Task, TensorState
from .tokenizer import Tokenizer


class TokenizerTask(Task):
    """Trains the tokenizer a run file describes ([encoder], [quantizer], [decoder], optional [[discriminators]],
    [[aligners]], [[adapters]]). Everything that can fail on bad input fails in the constructor."""

    progress_keys = ("loss", "rec")

    def __init__(self, registry: Registry, runtime: Runtime, hooks: pluggy.PluginManager, *, resuming: bool) -> None:
        cfg = registry.config
        t, lw = cfg.train, cfg.loss
        self.cfg = cfg
        self.runtime = runtime
        dev = runtime.torch_device
        self.data = cfg.data.build()
        self.train_images, self.eval_images = self.data.train_set(), self.data.eval_set()
        if len(self.train_images) == 0:
            raise ConfigError(["data: the training split is empty"], source=registry.source)

        model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build())
        discs = nn.ModuleList([spec.build() for spec in cfg.discriminators])
        # before adapters change the layout; a resumed run takes its weights from its own checkpoint instead
        self.initialised_from = None if resuming else self._init_from_checkpoint(model, discs)
        for adapter in cfg.adapters:
            model = adapter.build().apply(model)
        with shared_teachers():  # aligners with equal teacher options load and run one teacher
            aligners = nn.ModuleList([spec.build() for spec in cfg.aligners])
        for i, aligner in enumerate(aligners):  # heads are sized for the quantizer's codes (before the optimizer)
            try:
                aligner.attach(model.quantizer)
            except ValueError as exc:
                raise ConfigError([f"aligners[{i}] ({cfg.aligners[i].use}): {exc}"], source=registry.source) from exc
        model.to(dev)
        discs.to(dev)
        aligners.to(dev)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
            discs.to(memory_format=torch.channels_last)
        hooks.hook.xqgan_model_built(model=model, registry=registry)
        self.model, self.discs, self.aligners = model, discs, aligners
        self.adaptive_ref = _adaptive_reference(model) if lw.adaptive_weight and len(discs) else None
        self.train_model = wrap_ddp(model, dev)
        broadcast_module_state(discs)  # every rank starts from rank 0's discriminators
        broadcast_module_state(aligners)  # ... and aligner heads (teachers are loaded identically by every rank)

        self.perceptual = self._load_perceptual(dev)
        # the aligners' heads train with the tokenizer; their frozen teachers are not parameters at all
        params = [p for p in (*model.parameters(), *aligners.parameters()) if p.requires_grad]
        self.tokenizer_params = params
        self.tokenizer_opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.lr_factor = warmup_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_hold)
        self.tokenizer_sched = torch.optim.lr_scheduler.LambdaLR(self.tokenizer_opt, self.lr_factor)
        self.disc_opt = (torch.optim.AdamW(discs.parameters(), lr=t.disc_lr, betas=t.betas,
                                           weight_decay=t.disc_weight_decay) if len(discs) else None)
        self.lecam = LeCam(lw.lecam_decay).to(dev)
        self.diffaug = DiffAug.from_loss_section(lw)  # None when loss.diffaug is off
        self.lecam_before_step: dict[str, Tensor] = {}
        self.ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None

    # -- what is checkpointed ----------------------------------------------------------------------------------
    def train_set(self) -> torch.utils.data.Dataset:
        return self.train_images

    def modules(self) -> dict[str, nn.Module | TensorState]:
        parts: dict[str, nn.Module | TensorState] = {"model": self.model}
        if self.ema is not None:
            parts["ema"] = self.ema
        if len(self.discs):
            parts["discriminators"] = self.discs
        if any(True for _ in self.aligners.parameters()):
            parts["aligner_heads"] = self.aligners
        return parts

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts: dict[str, torch.optim.Optimizer] = {"tokenizer": self.tokenizer_opt}
        if self.disc_opt is not None:
            opts["discriminators"] = self.disc_opt
        return opts

    def schedulers(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_sched}

    def state_dict(self) -> dict[str, Any]:
        return {"lecam": self.lecam.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lecam" in state:
            self.lecam.load_state_dict(state["lecam"])

    # -- one step ----------------------------------------------------------------------------------------------
    def discriminators_on(self, step: int) -> bool:
        return len(self.discs) > 0 and step >= self.cfg.loss.disc_start

    def training_step(self, micro: list[Batch], step: int) -> dict[str, Tensor]:
        """Gradients of the tokenizer (and, once they are on, of the discriminators) over the micro-batches.

        Every rank runs every backward pass whatever the values, so a NaN on one rank cannot leave the others
        waiting in a collective; the Trainer's read-back then lets every rank take the same skip decision. The
        discriminators' gradients are computed here too (from detached reconstructions: the tokenizer's optimizer
        step does not change them), so the whole step needs one host sync.
        """
        t = self.cfg.train
        dev = self.runtime.torch_device
        images = [b["image"].to(dev, non_blocking=True) for b in micro]
        if t.channels_last:
            images = [x.contiguous(memory_format=torch.channels_last) for x in images]
        accum = len(images)
        disc_on = self.discriminators_on(step)
        self.tokenizer_opt.zero_grad(set_to_none=True)
        self.discs.requires_grad_(False)  # the tokenizer's pass must not fill the discriminators' grads
        sums: dict[str, Tensor] = {}
        fakes = []
        for i, x in enumerate(images):
            # DDP all-reduces gradients in backward: only the last micro-batch of an accumulated step needs it
            sync = i == accum - 1 or not hasattr(self.train_model, "no_sync")
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                recon, quant_stats, terms = self.tokenizer_loss_terms(x, disc_on, sums, accum, step=step)
                loss = sum(terms.values())
                self.runtime.precision.backward(loss / accum)
            for name, value in {"loss": loss, **terms}.items():
                _accumulate(sums, name, value.detach().float() / accum)
            for name, value in quant_stats.items():
                _accumulate(sums, f"q/{name}", _scalar(value, dev) / accum)
            if disc_on:
                fakes.append((x, recon.detach()))
        self.runtime.precision.unscale_(self.tokenizer_opt)
        all_reduce_mean_grads(self.aligners.parameters())  # heads are not in DDP: averaged by hand
        # the same on every rank (DDP all-reduced the gradients)
        sums["grad_norm"] = clip_gradients(self.tokenizer_params, t.grad_clip)
        if disc_on:
            sums.update(self._discriminator_grads(fakes, step))
        return sums

    def tokenizer_loss_terms(
        self, x: Tensor, disc_on: bool, sums: dict[str, Tensor], accum: int, step: int = 0
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        """Reconstruction, quantizer stats and weighted loss terms (``rec``, ``perceptual``, ``q/*``, ``align``,
        ``adv``) of one micro-batch; the adaptive weight is added to ``sums``."""
        lw = self.cfg.loss
        aligning = len(self.aligners) > 0 and lw.alignment > 0
        with self.runtime.precision.autocast():
            recon, quant, *latents = self.train_model(x, return_latents=True) if aligning else self.train_model(x)
        recon = recon.float()
        rec = lw.l2 * F.mse_loss(recon, x) + (lw.l1 * F.l1_loss(recon, x) if lw.l1 > 0 else 0.0)
        terms: dict[str, Tensor] = {"rec": rec}
        if self.perceptual is not None and lw.perceptual > 0:
            terms["perceptual"] = lw.perceptual * self.perceptual(recon, x).mean()
        nll = sum(terms.values())
        for name, value in quant.losses.items():
            terms[f"q/{name}"] = lw.quantizer * value.float()
        if aligning:
            inputs = AlignmentInputs(x, latents[0], quant, self.model.quantizer, step)
            align = x.new_zeros(())
            for i, aligner in enumerate(self.aligners):
                for name, value in aligner(inputs).items():
                    align = align + value.float()
                    _accumulate(sums, f"align/{i}/{name}", value.detach().float() / accum)
            terms["align"] = lw.alignment * align
        if disc_on and lw.adversarial > 0:
            seen = self.disc_view(recon)  # augmented (loss.diffaug), differentiably: the gradient reaches recon
            with self.runtime.precision.autocast():
                adv = sum(adversarial_loss(lw.disc_loss, d(seen).float()) for d in self.discs)
            weight = (adaptive_weight(nll, adv, self.adaptive_ref, lw.adaptive_max)
                      if self.adaptive_ref is not None else torch.ones((), device=x.device))
            terms["adv"] = lw.adversarial * weight * adv
            _accumulate(sums, "adv_weight", weight.detach().float() / accum)
        return recon, quant.stats, terms

    def _discriminator_grads(self, fakes: list[tuple[Tensor, Tensor]], step: int) -> dict[str, Tensor]:
        lw, t = self.cfg.loss, self.cfg.train
        assert self.disc_opt is not None
        self.discs.requires_grad_(True)
        for group in self.disc_opt.param_groups:  # same warm-up + cosine shape, on the global step
            group["lr"] = t.disc_lr * self.lr_factor(step)
        self.disc_opt.zero_grad(set_to_none=True)
        # LeCam's anchors move in forward: kept to undo them if the whole step is skipped
        self.lecam_before_step = {k: v.clone() for k, v in self.lecam.state_dict().items()}
        sums: dict[str, Tensor] = {}
        for real, fake in fakes:
            x, fake = self.disc_view(real), self.disc_view(fake)  # independent DiffAug draws (loss.diffaug)
            loss = x.new_zeros(())
            with self.runtime.precision.autocast():
                for d in self.discs:
                    real_logits, fake_logits = d(x).float(), d(fake).float()
                    loss = loss + discriminator_loss(lw.disc_loss, real_logits, fake_logits)
                    if lw.lecam > 0:
                        reg = self.lecam(real_logits, fake_logits)
                        loss = loss + lw.lecam * reg
                        _accumulate(sums, "d_lecam", reg.detach().float() / len(fakes))
            if lw.r1 > 0 and step % lw.r1_every == 0:  # the same steps on every rank
                r1 = sum(r1_penalty(d, x) for d in self.discs)
                loss = loss + 0.5 * lw.r1 * lw.r1_every * r1
                _accumulate(sums, "d_r1", r1.detach().float() / len(fakes))
            (loss / len(fakes)).backward()  # on every rank: the gradient all-reduce below is a collective
            _accumulate(sums, "d_loss", loss.detach().float() / len(fakes))
        # discriminators are not DDP-wrapped (two forward passes per step): average by hand, and keep their
        # buffers (BatchNorm statistics) equal on every rank
        all_reduce_mean_grads(self.discs.parameters())
        broadcast_buffers(self.discs)
        sums["d_grad_norm"] = clip_gradients(self.discs.parameters(), t.grad_clip)
        return sums

    def disc_view(self, images: Tensor) -> Tensor:
        """What the discriminators see of ``images``: their DiffAug (``loss.diffaug``, random per sample from the
        device's global RNG, which checkpoints restore) or the images themselves."""
        return images if self.diffaug is None else self.diffaug(images)

    def apply_step(self, values: dict[str, float], step: int) -> dict[str, float] | None:
        precision = self.runtime.precision
        disc_on = self.discriminators_on(step)
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self.tokenizer_opt.zero_grad(set_to_none=True)
            precision.update()
            if disc_on:  # the whole step is skipped: the discriminators neither step nor move LeCam's anchors
                assert self.disc_opt is not None
                self.disc_opt.zero_grad(set_to_none=True)
                self.lecam.load_state_dict(self.lecam_before_step)
            return None
        precision.step(self.tokenizer_opt)
        precision.update()
        self.tokenizer_sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        metrics = dict(values)
        metrics["lr"] = self.tokenizer_sched.get_last_lr()[0]
        if disc_on:
            assert self.disc_opt is not None
            if math.isfinite(values["d_loss"]) and math.isfinite(values["d_grad_norm"]):
                self.disc_opt.step()
                metrics.setdefault("d_lecam", 0.0)
            else:
                self.disc_opt.zero_grad(set_to_none=True)
                for key in [k for k in metrics if k.startswith("d_")]:
                    del metrics[key]
                metrics["d_skipped"] = 1.0
        return metrics

    # -- evaluation and reports --------------------------------------------------------------------------------
    def evaluate(self, step: int, log: Any) -> dict[str, float]:
        if len(self.eval_images) == 0:
            return {}
        ev = self.cfg.eval
        model = self.runtime.device.wrap_for_eval(self.eval_model())
        metrics, grid = evaluate(model, self.eval_images, self.runtime.device, batch_size=ev.batch_size,
                                 max_images=ev.max_images, perceptual=self.perceptual if ev.lpips else None,
                                 grid_images=ev.grid_images)
        if grid is not None:
            out_dir = self.runtime.out_dir
            path = save_grid(*grid, out_dir / "grids" / f"step-{step:08d}.png")
            save_grid(*grid, out_dir / "reconstructions.png")
            log.image(step, "eval/reconstructions", path)
        return metrics

    def eval_model(self) -> TokenizerModel:
        """A copy of the model for evaluation, with the EMA weights when there is an EMA: never the live training
        model, which a device's ``wrap_for_eval`` (HPU graphs) could capture."""
        shadow = copy.deepcopy(self.model)
        if self.ema is not None:
            self.ema.copy_to(shadow)
        return shadow

    def header_lines(self) -> list[str]:
        n_params = sum(p.numel() for p in self.model.parameters())
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        trainable = "" if n_trainable == n_params else f" ({n_trainable / 1e6:.3f} M trainable)"
        lines = [
            f"tokenizer {n_params / 1e6:.2f} M params{trainable}, {len(self.discs)} discriminator(s)",
            f"data: {len(self.train_images)} training / {len(self.eval_images)} held-out images",
            f"perceptual loss / LPIPS: {'on' if self.perceptual is not None else 'OFF (no LPIPS backbone weights)'}",
        ]
        for spec, aligner in zip(self.cfg.aligners, self.aligners):
            view = aligner.config_view(aligner.config) or ("?", None)
            head = sum(p.numel() for p in aligner.parameters())
            frozen = sum(p.numel() for part in aligner.frozen_parts().values() for p in part.parameters())
            lines.append(f"aligner {spec.use} on branch {view[0]}: head {head:,} params (trained), "
                         f"teacher {frozen:,} params (frozen)")
        if self.initialised_from:
            lines.append(f"weights from {self.initialised_from}")
        return lines

    def summary_rows(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        rows = []
        thumbnail = self._thumbnail_label()
        for key, label in [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"),
                           ("utilization", "codebook utilization"), ("var_usage", "codebook usage (VAR margin)"),
                           ("perplexity", "codebook perplexity")]:
            if key in metrics:
                value = metrics[key]
                shown = f"{value:.1f} %" if key in ("utilization", "var_usage") else f"{value:.4f}"
                if f"thumbnail/{key}" in metrics:  # the baseline every tokenizer should beat
                    shown += f"   ({thumbnail}: {metrics[f'thumbnail/{key}']:.4f})"
                rows.append((label, shown))
            elif key == "lpips":
                rows.append((label, "n/a (no LPIPS backbone weights)"))
        rows.append(("reconstructions", str(self.runtime.out_dir / "reconstructions.png")))
        return rows

    def _thumbnail_label(self) -> str:
        resolution = getattr(self.cfg.data.config, "resolution", None)
        if isinstance(resolution, int):
            try:
                h, w = self.model.latent_grid(resolution, resolution)
            except ValueError:  # not a size the encoder accepts: the evaluation reports its own grid
                pass
            else:
                return f"bicubic {h}x{w} thumbnail"
        return "bicubic thumbnail at the token grid's size"

    def problems(self) -> list[str]:
        return list(self.data.problems())

    # -- construction helpers ----------------------------------------------------------------------------------
    def _load_perceptual(self, dev: torch.device) -> Perceptual | None:
        lw, ev = self.cfg.loss, self.cfg.eval
        if lw.perceptual <= 0 and not ev.lpips:
            return None
        # warns once (saying where the file goes) if missing, or stops here with loss.require_perceptual
        module = load_lpips(lw.lpips_weights or None, dev, required=lw.require_perceptual)
        return Perceptual(module).to(dev) if module is not None else None

    def _init_from_checkpoint(self, model: nn.Module, discs: nn.ModuleList) -> str | None:
        """``train.init_from`` (fine-tuning): load a trained tokenizer (and its discriminators) into a fresh run.
        A mismatch fails here, before the output folder is touched."""
        t = self.cfg.train
        if not t.init_from:
            return None
        try:
            # through the source run's own run file: adapters it was trained with (LoRA) are folded in first
            source = Tokenizer.from_checkpoint(t.init_from, device="cpu", use_ema=t.init_use_ema)
            what = "tokenizer (encoder/quantizer/decoder)"
            ckpt.load_into(model, source.model.state_dict(), what, Path(source.weights or t.init_from))
        except CheckpointError as exc:
            raise CheckpointError(f"train.init_from: {exc}") from exc
        described = str(source.weights)
        if t.init_discriminators and len(discs):
            try:
                found = ckpt.load_discriminator_weights(discs, t.init_from)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"train.init_from: {exc} Set train.init_discriminators = false to start them from scratch."
                ) from exc
            if found is not None:
                described += f" (+ {found.name})"
        return described


def _adaptive_reference(model: TokenizerModel) -> Tensor | None:
    """The parameter the adaptive GAN weight compares gradient norms at: the decoder's last layer, or, when an
    adapter froze it (LoRA, frozen parts), the decoder's last trainable parameter (e.g. that layer's LoRA branch).
    None, with a warning, when nothing in the decoder trains: the adversarial term then keeps weight 1."""
    last = model.decoder.last_layer
    if last.requires_grad:
        return last
    trainable = [p for p in model.decoder.parameters() if p.requires_grad]
    if trainable:
        return trainable[-1]
    warnings.warn("the decoder has no trainable parameter: the adaptive GAN weight is off (weight 1)", stacklevel=3)
    return None


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _scalar(value: Any, device: torch.device) -> Tensor:
    """A quantizer statistic as a detached fp32 0-d tensor (no host sync)."""
    if isinstance(value, Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value), device=device)

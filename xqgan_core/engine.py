"""``Engine(registry).fit()``: trains a tokenizer from a run file. ``xqgan-run RUN.toml`` calls exactly this.

The engine owns data loading, optimizers and schedules, mixed precision, EMA, gradient clipping and accumulation,
distributed training (``torchrun``; the backend comes from the Device), checkpoint/resume, evaluation and logging.
Components never reach into the engine; plugins extend it through the lifecycle hooks in ``hooks.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .devices import auto_device
from .errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from .evaluation import evaluate, save_grid
from .hooks import chain_step_wrappers, make_plugin_manager
from .interfaces import Device
from .losses import LeCam, adaptive_weight, discriminator_loss, generator_loss, r1_penalty
from .model import TokenizerModel
from .optim import EMA, warmup_cosine
from .perceptual import Perceptual, load_lpips
from .registry import Registry
from .stopping import StopSignals
from .tokenizer import Tokenizer


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """Yields micro-batches of indices forever, reshuffled each epoch with a seeded permutation.

    The batch at position k depends only on (seed, k), so a resumed run continues with exactly the batches the
    interrupted one would have seen. Each rank of a distributed run takes its own slice of the global batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        per_global = self.batch_size * self.world
        while True:
            first = k * per_global + self.rank * self.batch_size
            out = []
            for pos in range(first, first + self.batch_size):
                epoch, offset = divmod(pos, self.size)
                out.append(int(self._permutation(epoch)[offset]))
            yield out
            k += 1

    def _permutation(self, epoch: int) -> Tensor:
        if getattr(self, "_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=g), epoch
        return self._perm


class Engine:
    """Trains the tokenizer described by a validated ``Registry``."""

    def __init__(self, registry: Registry) -> None:
        cfg = registry.config
        problems = []
        if cfg.encoder is None:
            problems.append("the engine trains tokenizers: select [encoder], [quantizer] and [decoder]")
        if cfg.data is None:
            problems.append('data: select an image source, e.g. [data] use = "sample" (built in) or use = "folder"')
        if problems:
            raise ConfigError(problems, source=registry.source)
        self.registry = registry
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir.replace("{name}", cfg.run.name))
        self.rank, self.world, self.local_rank = _dist_env()

    # ------------------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train (or resume) to ``train.steps``; returns the final evaluation metrics."""
        cfg, t = self.cfg, self.cfg.train
        self.device: Device = cfg.device.build() if cfg.device else auto_device()
        if self.world > 1:
            self._init_distributed()
        _seed_everything(cfg.run.seed + self.rank)
        self.is_main = self.rank == 0

        # everything that can fail on bad input happens before the output folder is touched
        data = cfg.data.build()
        train_set, eval_set = data.train_set(), data.eval_set()
        if len(train_set) == 0:
            raise ConfigError(["data: the training split is empty"], source=self.registry.source)
        hooks = [(f"{spec.use}#{i}", spec.build()) for i, spec in enumerate(cfg.hooks)]
        self.pm = make_plugin_manager(hooks)
        self.pm.hook.xqgan_configure(registry=self.registry)

        dev = self.device.torch_device
        model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build())
        discs = nn.ModuleList([spec.build() for spec in cfg.discriminators])
        self.initialised_from = self._init_from_checkpoint(model, discs)  # before adapters change the layout
        for adapter in cfg.adapters:
            model = adapter.build().apply(model)
        aligners = nn.ModuleList([spec.build() for spec in cfg.aligners])
        model.to(dev)
        discs.to(dev)
        aligners.to(dev)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
            discs.to(memory_format=torch.channels_last)
        self.pm.hook.xqgan_model_built(model=model, registry=self.registry)
        self.model, self.discs, self.aligners = model, discs, aligners
        self.adaptive_ref = _adaptive_reference(model) if cfg.loss.adaptive_weight and len(discs) else None
        self.train_model: nn.Module = model
        if self.world > 1:
            ddp_kw = {"device_ids": [dev.index]} if dev.type == "cuda" else {}
            self.train_model = nn.parallel.DistributedDataParallel(model, **ddp_kw)
            for tensor in discs.state_dict().values():  # every rank starts from rank 0's discriminators
                torch.distributed.broadcast(tensor, src=0)

        self.perceptual = self._perceptual(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        self.gen_opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        factor = warmup_cosine(t.warmup_steps, t.steps, t.min_lr_ratio)
        self.gen_sched = torch.optim.lr_scheduler.LambdaLR(self.gen_opt, factor)
        self.lr_factor = factor
        self.disc_opt = None
        if len(discs):
            self.disc_opt = torch.optim.AdamW(discs.parameters(), lr=t.disc_lr, betas=t.betas, weight_decay=t.disc_weight_decay)
        self.lecam = LeCam(cfg.loss.lecam_decay).to(dev)
        self.ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        self.autocast_dtype = self.device.autocast_dtype(t.precision)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.autocast_dtype == torch.float16)

        self.step, self.bad_steps_total, self.train_seconds = 0, 0, 0.0
        resumed_from = self._maybe_resume() if cfg.run.resume else None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "run.toml").write_text(self.registry.to_toml(with_provenance=True), encoding="utf-8")
        self.log = _RunLog(self.out_dir, enabled=self.is_main)
        self._header(resumed_from, len(train_set), len(eval_set))

        sampler = StepSampler(len(train_set), t.batch_size, cfg.run.seed, start=self.step * t.grad_accum,
                              rank=self.rank, world=self.world)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=t.num_workers,
                                             pin_memory=dev.type == "cuda", persistent_workers=t.num_workers > 0)
        batches = iter(loader)
        step_fn = chain_step_wrappers(self.pm, self._train_step)
        final_metrics: dict[str, float] = {}
        consecutive_bad = 0
        bar = tqdm(total=t.steps, initial=self.step, desc=cfg.run.name, disable=not self.is_main, dynamic_ncols=True)
        images_per_step = t.batch_size * t.grad_accum * self.world
        started_at = self.step
        with StopSignals() as stop:
            try:
                while self.step < t.steps:
                    if (signum := stop.agreed(self.world, dev)) is not None:
                        self._stop_on_signal(signum)
                    micro = [next(batches)["image"].to(dev, non_blocking=True) for _ in range(t.grad_accum)]
                    if t.channels_last:
                        micro = [x.contiguous(memory_format=torch.channels_last) for x in micro]
                    start = time.perf_counter()
                    metrics = step_fn(micro)
                    self.device.step_end()
                    elapsed = time.perf_counter() - start
                    self.step += 1
                    if metrics is None:  # non-finite loss: the step was skipped
                        consecutive_bad += 1
                        self.bad_steps_total += 1
                        bar.write(f"step {self.step}: non-finite loss, step skipped ({consecutive_bad} in a row)")
                        if consecutive_bad >= t.max_bad_steps:
                            raise TrainingError(
                                f"{consecutive_bad} consecutive steps had a NaN/inf loss (train.max_bad_steps = "
                                f"{t.max_bad_steps}); stopping. The last good checkpoint in {ckpt.checkpoint_root(self.out_dir)} "
                                "is intact: lower train.lr, check the data, or raise train.grad_clip's strictness."
                            )
                        continue
                    consecutive_bad = 0
                    self.train_seconds += elapsed
                    metrics["images_per_s"] = images_per_step / max(elapsed, 1e-9)
                    self.pm.hook.xqgan_step_end(step=self.step, metrics=metrics)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", rec=f"{metrics['rec']:.4f}",
                                    img_s=f"{metrics['images_per_s']:.1f}", refresh=False)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        self.log.scalars(self.step, "train", metrics)
                    last = self.step == t.steps
                    if self.step % t.checkpoint_every == 0 or last:
                        self._save()
                    if self.step % t.eval_every == 0 or last:
                        final_metrics = self._evaluate(eval_set, bar)
                if started_at >= t.steps:
                    bar.write(f"run already complete at step {self.step} (train.steps = {t.steps}): nothing left to train; "
                              "raise train.steps to continue it")
                if not final_metrics:  # complete before this call, or the last step was skipped or its evaluation lost
                    final_metrics = self._completed_metrics() or self._evaluate(eval_set, bar)
            finally:
                bar.close()
                self.log.close()
        problems = list(data.problems())
        if self.is_main:
            self._summary(final_metrics, problems)
        if self.world > 1:
            torch.distributed.destroy_process_group()
        return final_metrics

    # ------------------------------------------------------------------------------------------------------------
    def _train_step(self, micro: list[Tensor]) -> dict[str, float] | None:
        """One optimizer step of the tokenizer (and of the discriminators once they are on).

        Every rank runs every backward pass, even after a non-finite loss, and the decision to skip the step is
        taken from values all ranks share (all-reduced), so a NaN on one rank cannot leave the others waiting in a
        collective. Values are gathered as tensors and read back once per step: each ``.item()`` would stall an
        accelerator's queue.
        """
        cfg, lw = self.cfg, self.cfg.loss
        accum = len(micro)
        disc_on = len(self.discs) > 0 and self.step >= lw.disc_start
        self.gen_opt.zero_grad(set_to_none=True)
        self.discs.requires_grad_(False)  # the generator pass must not fill the discriminators' grads
        sums: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        fakes = []
        for i, x in enumerate(micro):
            # DDP all-reduces gradients in backward: only the last micro-batch of an accumulated step needs it
            sync = i == accum - 1 or not hasattr(self.train_model, "no_sync")
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                recon, quant_stats, terms = self._generator_terms(x, disc_on, sums, accum)
                loss = sum(terms.values())
                self.scaler.scale(loss / accum).backward()
            for name, value in {"loss": loss, **terms}.items():
                _accumulate(sums, name, value.detach().float() / accum)
            for name, value in quant_stats.items():
                stats[f"q/{name}"] = stats.get(f"q/{name}", 0.0) + float(value) / accum
            if disc_on:
                fakes.append((x, recon.detach()))
        self.scaler.unscale_(self.gen_opt)
        # the same on every rank (DDP all-reduced the gradients)
        sums["grad_norm"] = _clip(self.model.parameters(), cfg.train.grad_clip)
        values = _read_back(sums, distributed=self.world > 1)  # the step's one host sync
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self.gen_opt.zero_grad(set_to_none=True)
            self.scaler.update()
            return None
        self.scaler.step(self.gen_opt)
        self.scaler.update()
        self.gen_sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        values.update(stats)
        values["lr"] = self.gen_sched.get_last_lr()[0]
        if disc_on:
            values.update(self._disc_step(fakes))
        return values

    def _generator_terms(
        self, x: Tensor, disc_on: bool, sums: dict[str, Tensor], accum: int
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        """Reconstruction, quantizer stats and weighted loss terms (``rec``, ``perceptual``, ``q/*``, ``align``,
        ``adv``) of one micro-batch; the adaptive weight is added to ``sums``."""
        lw = self.cfg.loss
        with self.device.autocast(self.autocast_dtype):
            recon, quant = self.train_model(x)
        recon = recon.float()
        rec = lw.l2 * F.mse_loss(recon, x) + (lw.l1 * F.l1_loss(recon, x) if lw.l1 > 0 else 0.0)
        terms: dict[str, Tensor] = {"rec": rec}
        if self.perceptual is not None and lw.perceptual > 0:
            terms["perceptual"] = lw.perceptual * self.perceptual(recon, x).mean()
        nll = sum(terms.values())
        for name, value in quant.losses.items():
            terms[f"q/{name}"] = lw.quantizer * value.float()
        if len(self.aligners) and lw.alignment > 0:
            terms["align"] = lw.alignment * sum(a(x, quant) for a in self.aligners)
        if disc_on and lw.adversarial > 0:
            with self.device.autocast(self.autocast_dtype):
                adv = sum(generator_loss(lw.disc_loss, d(recon).float()) for d in self.discs)
            weight = (adaptive_weight(nll, adv, self.adaptive_ref, lw.adaptive_max)
                      if self.adaptive_ref is not None else torch.ones((), device=x.device))
            terms["adv"] = lw.adversarial * weight * adv
            _accumulate(sums, "adv_weight", weight.detach().float() / accum)
        return recon, quant.stats, terms

    def _disc_step(self, fakes: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        lw = self.cfg.loss
        self.discs.requires_grad_(True)
        for group in self.disc_opt.param_groups:  # same warm-up + cosine shape, on the global step
            group["lr"] = self.cfg.train.disc_lr * self.lr_factor(self.step)
        self.disc_opt.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for x, fake in fakes:
            loss = x.new_zeros(())
            with self.device.autocast(self.autocast_dtype):
                for d in self.discs:
                    real_logits, fake_logits = d(x).float(), d(fake).float()
                    loss = loss + discriminator_loss(lw.disc_loss, real_logits, fake_logits)
                    if lw.lecam > 0:
                        reg = self.lecam(real_logits, fake_logits)
                        loss = loss + lw.lecam * reg
                        _accumulate(sums, "d_lecam", reg.detach().float() / len(fakes))
            if lw.r1 > 0 and self.step % lw.r1_every == 0:  # the same steps on every rank
                r1 = sum(r1_penalty(d, x) for d in self.discs)
                loss = loss + 0.5 * lw.r1 * lw.r1_every * r1
                _accumulate(sums, "d_r1", r1.detach().float() / len(fakes))
            (loss / len(fakes)).backward()  # on every rank: the gradient all-reduce below is a collective
            _accumulate(sums, "d_loss", loss.detach().float() / len(fakes))
        if self.world > 1:  # discriminators are not DDP-wrapped (two forward passes per step): average by hand
            _all_reduce_mean_grads(self.discs.parameters(), self.world)
        sums["d_grad_norm"] = _clip(self.discs.parameters(), self.cfg.train.grad_clip)
        values = _read_back(sums, distributed=self.world > 1)
        if not (math.isfinite(values["d_loss"]) and math.isfinite(values["d_grad_norm"])):
            self.disc_opt.zero_grad(set_to_none=True)
            return {"d_skipped": 1.0}
        self.disc_opt.step()
        values.setdefault("d_lecam", 0.0)
        return values

    # ------------------------------------------------------------------------------------------------------------
    def _perceptual(self, dev: torch.device) -> Perceptual | None:
        lw, ev = self.cfg.loss, self.cfg.eval
        if lw.perceptual <= 0 and not ev.lpips:
            return None
        module = load_lpips(lw.lpips_weights or None, dev)  # warns once (saying where the file goes) if missing
        return Perceptual(module).to(dev) if module is not None else None

    def _eval_model(self) -> TokenizerModel:
        if self.ema is None:
            return self.model
        shadow = copy.deepcopy(self.model)
        self.ema.copy_to(shadow)
        return shadow

    def _evaluate(self, eval_set: torch.utils.data.Dataset, bar: Any) -> dict[str, float]:
        if not self.is_main or len(eval_set) == 0:
            return {}
        ev = self.cfg.eval
        perceptual = self.perceptual if ev.lpips else None
        model = self.device.wrap_for_eval(self._eval_model())
        metrics, grid = evaluate(model, eval_set, self.device, batch_size=ev.batch_size, max_images=ev.max_images,
                                 perceptual=perceptual, grid_images=ev.grid_images)
        self.log.scalars(self.step, "eval", metrics)
        if grid is not None:
            path = save_grid(*grid, self.out_dir / "grids" / f"step-{self.step:08d}.png")
            save_grid(*grid, self.out_dir / "reconstructions.png")
            self.log.image(self.step, "eval/reconstructions", path)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "images")
        bar.write(f"eval @ step {self.step}: {shown}")
        return metrics

    def _init_from_checkpoint(self, model: nn.Module, discs: nn.ModuleList) -> str | None:
        """``train.init_from`` (fine-tuning): load a trained tokenizer (and its discriminators) into a fresh run.
        Skipped when this run resumes; a mismatch fails here, before the output folder is touched."""
        t = self.cfg.train
        if not t.init_from or (self.cfg.run.resume and ckpt.latest_checkpoint(self.out_dir) is not None):
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

    def _stop_on_signal(self, signum: int) -> None:
        """Save a checkpoint at the current step (unless the last step just wrote one) and stop the run."""
        latest = ckpt.latest_checkpoint(self.out_dir)
        if latest is None or latest.name != f"step-{self.step:08d}":
            self._save()
        name = signal.Signals(signum).name
        message = (f"stopped by {name} at step {self.step}; checkpoint {ckpt.latest_checkpoint(self.out_dir)} holds "
                   "this step: rerun the same command to resume")
        if self.world > 1:
            torch.distributed.destroy_process_group()
        raise RunInterrupted(message, signum)

    def _completed_metrics(self) -> dict[str, float]:
        """The held-out metrics ``summary.json`` recorded for the current step, if a finished run left them."""
        path = self.out_dir / "summary.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("step") != self.step:
            return {}
        return {k: float(v) for k, v in saved.items() if k != "step" and isinstance(v, (int, float))}

    # ------------------------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "step": self.step,
            "bad_steps_total": self.bad_steps_total,
            "train_seconds": self.train_seconds,
            "gen_opt": self.gen_opt.state_dict(),
            "gen_sched": self.gen_sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lecam": self.lecam.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": list(random.getstate()[1]),
                "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2])],
            },
            "hooks": {name: plugin.xqgan_checkpoint_state() for name, plugin in self._stateful_hooks()},
        }
        if torch.cuda.is_available() and self.device.torch_device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state()
        if self.disc_opt is not None:
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    def _stateful_hooks(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.pm.list_name_plugin() if hasattr(p, "xqgan_checkpoint_state")]

    def _save(self) -> None:
        if not self.is_main:
            return
        discs = {f"{i}.{k}": v for i, d in enumerate(self.discs) for k, v in d.state_dict().items()}
        path = ckpt.save_checkpoint(
            self.out_dir, self.step, self.model.state_dict(), self._state(), self.registry.to_toml(with_provenance=True),
            {"provenance": self.registry.provenance(), "seed": self.cfg.run.seed},
            ema=self.ema.state_dict() if self.ema else None, discriminators=discs, keep=self.cfg.train.keep_checkpoints,
        )
        self.log.event(self.step, "checkpoint", str(path))

    def _maybe_resume(self) -> str | None:
        found = ckpt.latest_checkpoint(self.out_dir)
        if found is None:
            return None
        state = ckpt.load_state(found)  # weights_only: refuses pickled code
        ckpt.load_into(self.model, ckpt.load_tensors(found / ckpt.MODEL), "tokenizer (encoder/quantizer/decoder)", found)
        if self.ema is not None and (found / ckpt.EMA).is_file():
            self.ema.load_state_dict(ckpt.load_tensors(found / ckpt.EMA))
        if len(self.discs):
            disc_file = found / ckpt.DISC
            if disc_file.is_file():
                ckpt.load_into(self.discs, ckpt.load_tensors(disc_file), "discriminators", found)
            if "disc_opt" in state:
                self.disc_opt.load_state_dict(state["disc_opt"])
        self.gen_opt.load_state_dict(state["gen_opt"])
        self.gen_sched.load_state_dict(state["gen_sched"])
        self.scaler.load_state_dict(state["scaler"])
        self.lecam.load_state_dict(state["lecam"])
        self.step = int(state["step"])
        self.bad_steps_total = int(state["bad_steps_total"])
        self.train_seconds = float(state["train_seconds"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(int(v) for v in rng["python"]), None))
        np.random.set_state(("MT19937", rng["numpy"][0].numpy().astype(np.uint32), rng["numpy"][1], 0, 0.0))
        if "cuda" in rng and self.device.torch_device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        saved = state.get("hooks", {})
        for name, plugin in self.pm.list_name_plugin():
            if saved.get(name) is not None and hasattr(plugin, "xqgan_load_checkpoint_state"):
                plugin.xqgan_load_checkpoint_state(state=saved[name])
        return str(found)

    # ------------------------------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        self.device.init_distributed()
        if self.device.torch_device.type == "cuda":
            visible = torch.cuda.device_count()
            if self.local_rank >= visible:
                raise TrainingError(
                    f"process with LOCAL_RANK={self.local_rank} has no GPU of its own: {visible} CUDA device(s) are "
                    f"visible on this node. Start at most {visible} process(es) per node "
                    f"(torchrun --nproc_per_node={visible}), or select another device ([device] use = \"cpu\")."
                )
            torch.cuda.set_device(self.local_rank)
        torch.distributed.init_process_group(backend=self.device.dist_backend)

    def _header(self, resumed_from: str | None, n_train: int, n_eval: int) -> None:
        if not self.is_main:
            return
        t = self.cfg.train
        n_params = sum(p.numel() for p in self.model.parameters())
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        trainable = "" if n_trainable == n_params else f" ({n_trainable / 1e6:.3f} M trainable)"
        lines = [
            f"xqgan run '{self.cfg.run.name}' -> {self.out_dir}",
            f"  device {self.device.torch_device} x{self.world}, precision {self.autocast_dtype or torch.float32}, "
            f"tokenizer {n_params / 1e6:.2f} M params{trainable}, {len(self.discs)} discriminator(s)",
            f"  data: {n_train} training / {n_eval} held-out images; {t.steps} steps of "
            f"{t.batch_size}x{t.grad_accum}x{self.world} images",
            f"  perceptual loss / LPIPS: {'on' if self.perceptual is not None else 'OFF (no LPIPS backbone weights)'}",
            f"  {'resumed from ' + resumed_from + f' (step {self.step})' if resumed_from else 'starting from step 0'}"
            + (f", weights from {self.initialised_from}" if self.initialised_from else ""),
        ]
        for extra in self.pm.hook.xqgan_report_header(registry=self.registry):
            if extra:
                lines += [f"  {x}" for x in ([extra] if isinstance(extra, str) else extra)]
        tqdm.write("\n".join(lines))

    def _summary(self, metrics: dict[str, float], problems: list[str]) -> None:
        rows = [("steps", f"{self.step}"), ("train time", f"{self.train_seconds:.0f} s"),
                ("skipped (non-finite) steps", f"{self.bad_steps_total}")]
        for key, label in [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"),
                           ("utilization", "codebook utilization"), ("perplexity", "codebook perplexity")]:
            if key in metrics:
                value = metrics[key]
                rows.append((label, f"{value:.1f} %" if key == "utilization" else f"{value:.4f}"))
            elif key == "lpips":
                rows.append((label, "n/a (no LPIPS backbone weights)"))
        latest = ckpt.latest_checkpoint(self.out_dir)
        rows += [("checkpoint", str(latest)), ("reconstructions", str(self.out_dir / "reconstructions.png")),
                 ("metrics", str(self.out_dir / "metrics.jsonl"))]
        if problems:
            rows.append(("unreadable images skipped", f"{len(problems)} (listed above)"))
        width = max(len(r[0]) for r in rows)
        out = ["", "=" * (width + 40), f"{'run summary':^{width + 40}}", "=" * (width + 40)]
        out += [f"{k:<{width}}  {v}" for k, v in rows]
        if problems:
            out += ["", "unreadable images (skipped):"] + [f"  {p}" for p in problems]
        tqdm.write("\n".join(out))
        if "psnr" in metrics and (self.out_dir / "summary.json").parent.exists():
            (self.out_dir / "summary.json").write_text(json.dumps({"step": self.step, **metrics}, indent=2))


# ----------------------------------------------------------------------------------------------------------------


class _RunLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars/images, on the main process only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - TensorBoard is optional
                warnings.warn(f"TensorBoard logging off ({exc}); metrics.jsonl is still written", stacklevel=2)

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "split": split, "time": time.time(), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def event(self, step: int, kind: str, detail: str) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "split": "event", "event": kind, "detail": detail}) + "\n")

    def image(self, step: int, tag: str, path: Path) -> None:
        if self.tb is not None:
            from PIL import Image

            arr = np.asarray(Image.open(path).convert("RGB"))
            self.tb.add_image(tag, arr, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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


def _read_back(sums: dict[str, Tensor], distributed: bool) -> dict[str, float]:
    """Tensors -> Python floats in one device-to-host copy. Under torch.distributed a value that is not finite on
    any rank is made non-finite on every rank, so that all ranks take the same skip decision."""
    names = list(sums)
    device = next(iter(sums.values())).device
    packed = torch.stack([sums[n].reshape(()).to(device) for n in names])
    if distributed:
        bad = (~torch.isfinite(packed)).float()
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        packed = torch.where(bad > 0, torch.full_like(packed, float("nan")), packed)
    return dict(zip(names, packed.tolist()))


def _clip(params: Any, max_norm: float) -> Tensor:
    """Clip to ``max_norm`` (when > 0) and return the total gradient norm before clipping, as a 0-d tensor."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).float()
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))


def _all_reduce_mean_grads(params: Any, world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


"""The generator recipe as a ``Task``: an autoregressive generator (``[generator]``) trained with token cross entropy on
the tokens of a frozen tokenizer (``[tokenizer]``), read from token shards (``[data] use = "tokens"``) or made on the
fly from any image source. AdamW with a warm-up + cosine / linear schedule, an EMA of the generator, gradient
clipping, autocast and DDP; held-out cross entropy and accuracy plus a grid of samples at evaluation.

The loop around it (data order, read-back, skipping, checkpoints, resume, cadence) is the ``Trainer``'s. The tokenizer
is never trained or saved: checkpoints hold ``generator`` (+ ``generator_ema``), and ``meta.json`` records the
tokenizer's checkpoint, weight file and sha256 with the token layout and class names (``generator_run``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .distributed import wrap_ddp
from .errors import CheckpointError, ConfigError
from .evaluation import forked_rng
from .generator_run import GENERATOR, GENERATOR_EMA, generator_meta, load_frozen_tokenizer, tokenizer_identity
from .image_grid import grid_image, save_grid, save_image_grid, to_uint8
from .interfaces import Generator
from .optim import EMA, clip_gradients, warmup_schedule
from .registry import Registry
from .runfile import complete
from .sampling import token_cross_entropy
from .task import Batch, Runtime, Task, TensorState
from .token_layout import TokenLayout
from .token_shards import TokenFolderError
from .tokenizer import Tokenizer

__all__ = ["GeneratorTask", "token_accuracy"]


class GeneratorTask(Task):
    """Trains the generator a generator run file describes ([generator], [tokenizer], [data], [train], [eval],
    [sample]). Everything that can fail on bad input fails in the constructor, before the run folder is touched.
    ``hooks`` and ``resuming`` mirror ``TokenizerTask``'s signature; ``xqgan_model_built`` (a tokenizer hook) is not
    called for generators.

    ``registry`` (after construction) is the run file with ``tokenizer.sha256`` filled in: the engine writes it as the
    run's resolved run.toml, so the run records exactly which tokenizer weights its tokens came from.
    """

    progress_keys = ("loss", "acc")

    def __init__(self, registry: Registry, runtime: Runtime, hooks: pluggy.PluginManager, *, resuming: bool) -> None:
        cfg = complete(registry.config)  # [sample] filled in when built without Registry.from_dict
        t = cfg.train
        self.cfg = cfg
        self.runtime = runtime
        dev = runtime.torch_device
        self.data = cfg.data.build()
        self.train_items, self.eval_items = self.data.train_set(), self.data.eval_set()
        if len(self.train_items) == 0:
            raise ConfigError(["data: the training split is empty"], source=registry.source)

        self.tokenizer: Tokenizer = load_frozen_tokenizer(cfg.tokenizer, runtime.device)
        self.tokenizer_id = tokenizer_identity(cfg.tokenizer, self.tokenizer)
        self.from_tokens = hasattr(self.data, "check_tokenizer")  # a token source (`tokens`), else images
        self.layout = self._token_layout(registry)
        self.class_names = tuple(str(c) for c in self.data.class_names())
        self.num_classes = len(self.class_names)
        pinned = attrs.evolve(cfg.tokenizer, sha256=self.tokenizer_id["sha256"])
        self.registry = Registry(attrs.evolve(cfg, tokenizer=pinned), registry.source)

        generator: Generator = cfg.generator.build()
        try:
            generator.bind(self.layout, self.tokenizer.model.quantizer, self.num_classes)
        except ValueError as exc:
            raise ConfigError([f"generator ({cfg.generator.use}): {exc}"], source=registry.source) from exc
        generator.to(dev)
        self.generator = generator
        self.train_generator = wrap_ddp(generator, dev)
        self.params = [p for p in generator.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(decay_groups(generator, t.weight_decay), lr=t.lr, betas=t.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_hold)
        )
        self.ema = EMA(generator, t.ema_decay) if t.ema_decay > 0 else None

    def _token_layout(self, registry: Registry) -> TokenLayout:
        """The layout the generator models: the token folder's (checked against the frozen tokenizer), or the
        tokenizer's layout at the image source's resolution."""
        if self.from_tokens:
            try:
                self.data.check_tokenizer(self.tokenizer)
            except TokenFolderError as exc:  # (TokenFolderMismatch too) names the folder and what differs
                raise ConfigError([f"data.path: {exc} ([tokenizer] run = {self.cfg.tokenizer.run!r})"],
                                  source=registry.source) from exc
            return self.data.layout
        resolution = getattr(self.cfg.data.config, "resolution", None) or self.tokenizer.resolution
        if not isinstance(resolution, int):
            raise ConfigError(["data.resolution: the image source does not say its resolution and the tokenizer run "
                               "has none: set data.resolution"], source=registry.source)
        try:
            return self.tokenizer.layout_for(resolution, resolution)
        except ValueError as exc:
            problem = f"data.resolution: {exc} (the frozen tokenizer's encoder)"
            raise ConfigError([problem], source=registry.source) from exc

    # -- what is checkpointed ----------------------------------------------------------------------------------
    def train_set(self) -> torch.utils.data.Dataset:
        return self.train_items

    def modules(self) -> dict[str, nn.Module | TensorState]:
        parts: dict[str, nn.Module | TensorState] = {GENERATOR: self.generator}
        if self.ema is not None:
            parts[GENERATOR_EMA] = self.ema
        return parts

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {GENERATOR: self.opt}

    def schedulers(self) -> dict[str, Any]:
        return {GENERATOR: self.sched}

    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer_sha256": self.tokenizer_id["sha256"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("tokenizer_sha256")
        if saved and saved != self.tokenizer_id["sha256"]:
            raise CheckpointError(
                f"tokenizer.run: this run was trained on tokenizer weights with sha256 {saved}, but "
                f"{self.tokenizer_id['weights']} has sha256 {self.tokenizer_id['sha256']}: resuming would train on "
                "other tokens. Point [tokenizer] run at the original tokenizer, or start a new run (another "
                "run.out_dir)"
            )

    def checkpoint_meta(self) -> dict[str, Any]:
        return generator_meta(self.layout, self.class_names, self.tokenizer_id)

    # -- one step ----------------------------------------------------------------------------------------------
    def tokens_and_condition(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """A batch's ``(B, L, K)`` tokens (from the token source, or the frozen tokenizer on its images) and class
        ids (None for an unconditional generator), on the device."""
        dev = self.runtime.torch_device
        if self.from_tokens:
            tokens = batch["tokens"].to(dev, torch.long, non_blocking=True)
        else:
            tokens = self.tokenizer.encode(batch["image"].to(dev, non_blocking=True), as_sequence=True)
        condition = batch["label"].to(dev, torch.long, non_blocking=True) if self.num_classes else None
        return tokens, condition

    def training_step(self, micro: list[Batch], step: int) -> dict[str, Tensor]:
        accum = len(micro)
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for i, batch in enumerate(micro):
            tokens, condition = self.tokens_and_condition(batch)
            # DDP all-reduces gradients in backward: only the last micro-batch of an accumulated step needs it
            sync = i == accum - 1 or not hasattr(self.train_generator, "no_sync")
            with contextlib.nullcontext() if sync else self.train_generator.no_sync():
                with self.runtime.precision.autocast():
                    out = self.train_generator(tokens, condition)
                ce = token_cross_entropy(out.logits, tokens)
                terms = {"ce": ce, **{f"gen/{k}": v.float() for k, v in out.losses.items()}}
                loss = sum(terms.values())
                self.runtime.precision.backward(loss / accum)
            for name, value in {"loss": loss, **terms, "acc": token_accuracy(out.logits, tokens)}.items():
                _accumulate(sums, name, value.detach().float() / accum)
        self.runtime.precision.unscale_(self.opt)
        sums["grad_norm"] = clip_gradients(self.params, self.cfg.train.grad_clip)  # equal on every rank after DDP
        return sums

    def apply_step(self, values: dict[str, float], step: int) -> dict[str, float] | None:
        precision = self.runtime.precision
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self.opt.zero_grad(set_to_none=True)
            precision.update()
            return None
        precision.step(self.opt)
        precision.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        return {**values, "lr": self.sched.get_last_lr()[0]}

    # -- evaluation and reports --------------------------------------------------------------------------------
    def evaluate(self, step: int, log: Any) -> dict[str, float]:
        ev = self.cfg.eval
        model = self.eval_model()
        with forked_rng(self.runtime.device):  # the training run's random stream stays as it was
            metrics = self.held_out_metrics(model, ev.batch_size, ev.max_images)
            if ev.grid_images > 0:
                path = self.write_sample_grid(model, ev.grid_images, self.runtime.out_dir / "grids" /
                                              f"samples-{step:08d}.png")
                with atomic_path(self.runtime.out_dir / "samples.png", durable=False) as latest:
                    shutil.copyfile(path, latest)
                log.image(step, "eval/samples", path)
        return metrics

    def write_sample_grid(self, model: Generator, n: int, path: Path) -> Path:
        """About ``n`` samples as a picture: with classes, one labelled row per class (every class when there are
        at most ``n``: ``n // num_classes`` samples each; else the first ``isqrt(n)`` classes), else ``n`` in rows of
        8."""
        if not self.num_classes:
            return save_image_grid(self.sample_images(model, n), path)
        rows = self.num_classes if self.num_classes <= n else max(1, math.isqrt(n))
        per_row = n // rows
        classes = torch.arange(rows).repeat_interleave(per_row)
        pixels = to_uint8(self.sample_images(model, len(classes), classes))
        labels = [f"{c}: {self.class_names[c]}" for c in range(rows)]
        return save_grid(grid_image(pixels.reshape(rows, per_row, *pixels.shape[1:]), labels), path)

    @torch.no_grad()
    def held_out_metrics(self, model: Generator, batch_size: int, max_items: int) -> dict[str, float]:
        """Token cross entropy and accuracy of ``model`` on the first ``max_items`` held-out items (0 = all)."""
        dataset = self.eval_items
        n = len(dataset) if max_items <= 0 else min(max_items, len(dataset))
        if n == 0:
            return {}
        # its own generator: creating the iterator would otherwise draw a seed from the global RNG
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                             generator=torch.Generator().manual_seed(0))
        ce = acc = 0.0
        for batch in loader:
            tokens, condition = self.tokens_and_condition(batch)
            with self.runtime.precision.autocast():
                out = model(tokens, condition)
            share = tokens.shape[0] / n
            ce += float(token_cross_entropy(out.logits, tokens)) * share
            acc += float(token_accuracy(out.logits, tokens)) * share
        return {"ce": ce, "acc": acc, "items": float(n)}

    @torch.no_grad()
    def sample_images(self, model: Generator, n: int, classes: Tensor | None = None) -> Tensor:
        """``n`` samples with the run's [sample] settings, decoded (CPU): of ``classes`` (``(n,)`` ids; default:
        cycling through the class ids; unconditional without classes)."""
        s, dev = self.cfg.sample, self.runtime.torch_device
        if not self.num_classes:
            condition = None
        else:
            condition = (torch.arange(n) % self.num_classes if classes is None else classes).to(dev)
        generator = torch.Generator(dev).manual_seed(s.seed)
        with self.runtime.precision.autocast():
            tokens = model.sample(n, condition, cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k,
                                  top_p=s.top_p, generator=generator)
        return self.tokenizer.decode(tokens, layout=self.layout).cpu()

    def eval_model(self) -> Generator:
        """A copy of the generator for evaluation, with the EMA weights when there is an EMA: never the live model."""
        shadow = copy.deepcopy(self.generator)
        if self.ema is not None:
            self.ema.copy_to(shadow)
        return shadow.eval()

    def header_lines(self) -> list[str]:
        n_params = sum(p.numel() for p in self.generator.parameters())
        source = f"token folder {getattr(self.cfg.data.config, 'path', '')}" if self.from_tokens else \
            "images tokenized on the fly"
        classes = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        return [
            f"generator {self.cfg.generator.use}: {n_params:,} params, {classes}",
            f"tokens: {self.layout.describe()}",
            f"frozen tokenizer {self.tokenizer_id['weights']} (sha256 {self.tokenizer_id['sha256'][:12]}...)",
            f"data: {source}, {len(self.train_items)} training / {len(self.eval_items)} held-out items",
        ]

    def summary_rows(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        rows = []
        for key, label in [("ce", "held-out token cross entropy"), ("acc", "held-out token accuracy")]:
            if key in metrics:
                rows.append((label, f"{metrics[key]:.4f}"))
        if self.cfg.eval.grid_images > 0:
            rows.append(("samples", str(self.runtime.out_dir / "samples.png")))
        return rows

    def problems(self) -> list[str]:
        return list(self.data.problems())


def token_accuracy(logits: list[Tensor], tokens: Tensor) -> Tensor:
    """Fraction of tokens whose most likely logit is the target, averaged over the columns (a 0-d tensor)."""
    hits = [(lg.argmax(-1) == tokens[..., k]).float().mean() for k, lg in enumerate(logits)]
    return torch.stack(hits).mean()


def decay_groups(module: Generator, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and embedding tables (dim >= 2), none on biases and norm gains nor on
    what the generator lists in ``no_weight_decay()`` (a name it does not have is a bug in the plugin: refused)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    exempt = module.no_weight_decay()
    unknown = exempt - {n for n, _ in module.named_parameters()}
    if unknown:
        raise TypeError(f"{type(module).__name__}.no_weight_decay() names parameters it does not have: "
                        f"{sorted(unknown)[:5]}")  # fmt: skip
    decayed = [p for n, p in named if p.dim() >= 2 and n not in exempt]
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": [p for n, p in named if p.dim() < 2 or n in exempt], "weight_decay": 0.0}]


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


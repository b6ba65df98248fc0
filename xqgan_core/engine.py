"""``Engine(registry).fit()``: trains what a run file describes. ``xqgan-run RUN.toml`` calls exactly this.

The engine only wires things up: the device and the process group, seeds, hooks, the checkpoint to resume from,
the Task the run file asks for (``RunConfig.kind``: ``TokenizerTask`` for a tokenizer run, ``GeneratorTask`` for a run
file with a [generator] table), and the ``Trainer`` that runs the loop. Where to look: the loop is in ``trainer.py``,
the recipes in ``tokenizer_task.py`` and ``generator_task.py``, what a checkpoint holds in ``run_state.py``;
``docs/training-loop.md`` shows how a Task plugs into the Trainer, ``docs/generators.md`` generator runs.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from .devices import auto_device
from .distributed import DistEnv, process_group
from .generator_task import GeneratorTask
from .errors import ConfigError, TrainingError  # noqa: F401  (TrainingError: re-exported for callers)
from .hooks import make_plugin_manager
from .precision import Precision
from .registry import Registry
from .run_state import find_resume_checkpoint, seed_everything
from .task import Runtime
from .tokenizer_task import TokenizerTask
from .trainer import Trainer


class Engine:
    """Trains the run described by a validated ``Registry``."""

    def __init__(self, registry: Registry) -> None:
        cfg = registry.config
        problems = []
        if cfg.kind == "tokenizer" and cfg.encoder is None:
            problems.append("nothing to train: select [encoder], [quantizer] and [decoder] (a tokenizer run), or "
                            "[generator] and [tokenizer] (a generator run)")
        if cfg.data is None:
            problems.append('data: select an image source, e.g. [data] use = "sample" (built in) or use = "folder"'
                            + (', or use = "tokens" (a token folder)' if cfg.kind == "generator" else ""))
        if problems:
            raise ConfigError(problems, source=registry.source)
        self.registry = registry
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir.replace("{name}", cfg.run.name))
        self.dist = DistEnv.from_environ()

    def fit(self) -> dict[str, float]:
        """Train (or resume) to ``train.steps``; returns the final evaluation metrics (on rank 0)."""
        cfg = self.cfg
        device = cfg.device.build() if cfg.device else auto_device()
        with process_group(device, self.dist, cfg.train.dist_timeout_s):
            seed_everything(cfg.run.seed + self.dist.rank)
            # everything that can fail on bad input happens before the output folder is touched
            if not cfg.run.resume:
                ckpt.refuse_existing_run(self.out_dir)
            resume = find_resume_checkpoint(self.out_dir, self.dist) if cfg.run.resume else None
            hooks = make_plugin_manager([(f"{spec.use}#{i}", spec.build()) for i, spec in enumerate(cfg.hooks)])
            hooks.hook.xqgan_configure(registry=self.registry)
            runtime = Runtime(device, Precision(device, cfg.train.precision), self.dist, self.out_dir, cfg.run.seed)
            task_class = GeneratorTask if cfg.kind == "generator" else TokenizerTask
            task = task_class(self.registry, runtime, hooks, resuming=resume is not None)
            registry = getattr(task, "registry", self.registry)  # GeneratorTask: + the tokenizer's sha256
            trainer = Trainer(
                task, runtime, cfg.train, name=cfg.run.name, run_toml=registry.to_toml(with_provenance=True),
                meta={"provenance": registry.provenance(), **task.checkpoint_meta()}, hooks=hooks, registry=registry,
                resume=resume,
            )
            return trainer.fit()

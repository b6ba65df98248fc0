"""The training loop. It knows nothing about what is trained: a ``Task`` (``task.py``) supplies modules, optimizers,
losses and evaluation; the Trainer supplies the data order, micro-batches, the step's single host sync, the agreed
skip of non-finite steps, stop signals (SIGTERM / Ctrl-C), the log / checkpoint / evaluation cadence, the progress
bar and the run summary. Checkpoints and resuming go through ``RunState`` (``run_state.py``)."""

from __future__ import annotations

import json
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .distributed import StepSampler, read_back
from .errors import RunInterrupted, TrainingError
from .hooks import chain_step_wrappers
from .run_log import RunLog
from .run_state import LoadedCheckpoint, RunState
from .runfile import TrainSection
from .stopping import StopSignals
from .task import Batch, Runtime, Task


class Trainer:
    """Trains ``task`` for ``train.steps`` optimizer steps, resuming from ``resume`` when given.

    ``run_toml`` (the resolved run file) and ``meta`` (provenance) are stored with every checkpoint; ``registry``
    is what hooks receive in ``xqgan_report_header``.
    """

    def __init__(
        self,
        task: Task,
        runtime: Runtime,
        train: TrainSection,
        *,
        name: str,
        run_toml: str,
        meta: dict[str, Any],
        hooks: pluggy.PluginManager,
        registry: Any = None,
        resume: LoadedCheckpoint | None = None,
    ) -> None:
        self.task = task
        self.runtime = runtime
        self.train = train
        self.name = name
        self.run_toml = run_toml
        self.meta = meta
        self.hooks = hooks
        self.registry = registry
        self.resume = resume  # released once restored: it holds a copy of every weight
        self.resumed_from = resume.folder if resume is not None else None
        self.out_dir = runtime.out_dir
        self.dist = runtime.dist
        self.state = RunState(task, runtime, hooks=hooks)
        self.samples_per_step = train.batch_size * train.grad_accum * runtime.dist.world
        self.consecutive_bad = 0
        self.last_saved_step = -1

    # ------------------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train (or resume) to ``train.steps``; returns the final evaluation metrics (main process; {} elsewhere)."""
        t, st = self.train, self.state
        if self.resume is not None:
            st.restore(self.resume)
            self.resume = None
            self.last_saved_step = st.step
        if st.samples < 0:  # a checkpoint written before the data order was recorded
            st.samples = st.step * self.samples_per_step
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "run.toml").write_text(self.run_toml, encoding="utf-8")
        log = RunLog(self.out_dir, enabled=self.dist.is_main)
        self._header()
        batches = self._batches()
        step_fn = chain_step_wrappers(self.hooks, self._step)
        final_metrics: dict[str, float] = {}
        bar = tqdm(total=t.steps, initial=st.step, desc=self.name, disable=not self.dist.is_main, dynamic_ncols=True)
        started_at = st.step
        dev = self.runtime.torch_device
        with StopSignals() as stop:
            try:
                while st.step < t.steps:
                    if (signum := stop.agreed(self.dist.world, dev)) is not None:
                        self._stop_on_signal(signum, log)
                    micro = [next(batches) for _ in range(t.grad_accum)]
                    start = time.perf_counter()
                    metrics = step_fn(micro)
                    self.runtime.device.step_end()
                    elapsed = time.perf_counter() - start
                    st.step += 1
                    st.samples += self.samples_per_step
                    last = st.step == t.steps
                    if metrics is not None:
                        self.consecutive_bad = 0
                        st.train_seconds += elapsed
                        metrics["images_per_s"] = self.samples_per_step / max(elapsed, 1e-9)
                        self.hooks.hook.xqgan_step_end(step=st.step, metrics=metrics)
                        bar.update(1)
                        shown = {k: f"{metrics[k]:.4f}" for k in self.task.progress_keys if k in metrics}
                        bar.set_postfix(**shown, img_s=f"{metrics['images_per_s']:.1f}", refresh=False)
                        if st.step % t.log_every == 0 or last:
                            log.scalars(st.step, "train", metrics)
                    else:
                        self._skipped(bar)
                        continue
                    if st.step % t.checkpoint_every == 0 or last:
                        self._save(log)
                    if st.step % t.eval_every == 0 or last:
                        final_metrics = self._evaluate(log, bar)
                if started_at >= t.steps:
                    bar.write(f"run already complete at step {st.step} (train.steps = {t.steps}): nothing left to "
                              "train; raise train.steps to continue it")
                if not final_metrics:  # complete before this call, or the last step was skipped or its evaluation lost
                    final_metrics = self._completed_metrics() or self._evaluate(log, bar)
            finally:
                bar.close()
                log.close()
        if self.dist.is_main:
            self._summary(final_metrics)
        return final_metrics

    # ------------------------------------------------------------------------------------------------------------
    def _step(self, micro: list[Batch]) -> dict[str, float] | None:
        """One optimizer step: the task's gradients, one read-back of all its values, the task's optimizer steps.
        None when the step was skipped (a non-finite value, agreed by every rank)."""
        step = self.state.step
        values = read_back(self.task.training_step(micro, step))
        extra = self.task.apply_step(values, step)
        if extra is None:
            return None
        values.update(extra)
        return values

    def _batches(self) -> Iterator[list[Batch]]:
        """Micro-batches from where the run stands, on this rank. The DataLoader has its own generator, so neither
        creating it nor its worker seeds draw from the training RNG (which the checkpoint restores)."""
        t, st = self.train, self.state
        per_micro = t.batch_size * self.dist.world
        if st.samples % per_micro:
            warnings.warn(f"{st.samples} samples consumed is not a whole number of micro-batches of {t.batch_size} x "
                          f"{self.dist.world} rank(s) (batch size or world size changed since the checkpoint?): "
                          "continuing at the next whole micro-batch", stacklevel=2)
        train_set = self.task.train_set()
        sampler = StepSampler(len(train_set), t.batch_size, self.runtime.seed, start=-(-st.samples // per_micro),
                              rank=self.dist.rank, world=self.dist.world)
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=sampler, num_workers=t.num_workers,
            pin_memory=self.runtime.torch_device.type == "cuda", persistent_workers=t.num_workers > 0,
            generator=torch.Generator().manual_seed(self.runtime.seed),
        )
        return iter(loader)

    def _skipped(self, bar: Any) -> None:
        self.consecutive_bad += 1
        self.state.bad_steps_total += 1
        bar.write(f"step {self.state.step}: non-finite loss, step skipped ({self.consecutive_bad} in a row)")
        if self.consecutive_bad >= self.train.max_bad_steps:
            raise TrainingError(
                f"{self.consecutive_bad} consecutive steps had a NaN/inf loss (train.max_bad_steps = "
                f"{self.train.max_bad_steps}); stopping. The last good checkpoint in "
                f"{ckpt.checkpoint_root(self.out_dir)} is intact: lower train.lr, check the data, or raise "
                "train.grad_clip's strictness."
            )

    def _save(self, log: RunLog) -> None:
        """A checkpoint of the current step (a collective: every rank calls it at the same step)."""
        path = self.state.save(self.out_dir, self.run_toml, self.meta, keep=self.train.keep_checkpoints)
        self.last_saved_step = self.state.step
        if path is not None:
            log.event(self.state.step, "checkpoint", str(path))

    def _evaluate(self, log: RunLog, bar: Any) -> dict[str, float]:
        if not self.dist.is_main:
            return {}
        metrics = self.task.evaluate(self.state.step, log)
        if metrics:
            log.scalars(self.state.step, "eval", metrics)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "images")
            bar.write(f"eval @ step {self.state.step}: {shown}")
        return metrics

    def _stop_on_signal(self, signum: int, log: RunLog) -> None:
        """Save a checkpoint at the current step (unless the last step just wrote one) and stop the run."""
        step = self.state.step
        if self.last_saved_step != step:
            self._save(log)
        if self.dist.distributed:  # no rank reports "checkpoint holds this step" before rank 0 has written it
            torch.distributed.barrier()
        name = signal.Signals(signum).name
        where = f" (rank {self.dist.rank} of {self.dist.world})" if self.dist.distributed else ""
        message = (f"stopped by {name} at step {step}{where}; checkpoint {ckpt.latest_checkpoint(self.out_dir)} "
                   "holds this step: rerun the same command to resume")
        raise RunInterrupted(message, signum)

    def _completed_metrics(self) -> dict[str, float]:
        """The held-out metrics ``summary.json`` recorded for the current step, if a finished run left them."""
        try:
            saved = json.loads((self.out_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("step") != self.state.step:
            return {}
        return {k: float(v) for k, v in saved.items() if k != "step" and isinstance(v, (int, float))}

    # ------------------------------------------------------------------------------------------------------------
    def _header(self) -> None:
        if not self.dist.is_main:
            return
        t, rt = self.train, self.runtime
        resumed = self.resumed_from
        lines = [
            f"xqgan run '{self.name}' -> {self.out_dir}",
            f"  device {rt.torch_device} x{self.dist.world}, precision {rt.precision.describe()}; {t.steps} steps "
            f"of {t.batch_size}x{t.grad_accum}x{self.dist.world} samples",
            *(f"  {line}" for line in self.task.header_lines()),
            f"  {f'resumed from {resumed} (step {self.state.step})' if resumed else 'starting from step 0'}",
        ]
        for extra in self.hooks.hook.xqgan_report_header(registry=self.registry):
            if extra:
                lines += [f"  {x}" for x in ([extra] if isinstance(extra, str) else extra)]
        tqdm.write("\n".join(lines))

    def _summary(self, metrics: dict[str, float]) -> None:
        st = self.state
        problems = self.task.problems()
        rows = [("steps", f"{st.step}"), ("train time", f"{st.train_seconds:.0f} s"),
                ("skipped (non-finite) steps", f"{st.bad_steps_total}")]
        rows += self.task.summary_rows(metrics)
        rows += [("checkpoint", str(ckpt.latest_checkpoint(self.out_dir))),
                 ("metrics", str(self.out_dir / "metrics.jsonl"))]
        if problems:
            rows.append(("unreadable images skipped", f"{len(problems)} (listed above)"))
        width = max(len(r[0]) for r in rows)
        out = ["", "=" * (width + 40), f"{'run summary':^{width + 40}}", "=" * (width + 40)]
        out += [f"{k:<{width}}  {v}" for k, v in rows]
        if problems:
            out += ["", "unreadable images (skipped):"] + [f"  {p}" for p in problems]
        tqdm.write("\n".join(out))
        if metrics and self.out_dir.is_dir():
            (self.out_dir / "summary.json").write_text(json.dumps({"step": st.step, **metrics}, indent=2))

"""The Trainer with a task that is not a tokenizer: the minimal Task of docs/training-loop.md, run, checkpointed
and resumed exactly through the generic module / optimizer state."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.devices import CPUDevice
from xqgan_core.distributed import DistEnv
from xqgan_core.hooks import make_plugin_manager
from xqgan_core.precision import Precision
from xqgan_core.run_state import find_resume_checkpoint
from xqgan_core.runfile import TrainSection
from xqgan_core.task import Runtime
from xqgan_core.trainer import Trainer

DOC = Path(__file__).resolve().parents[1] / "docs" / "training-loop.md"


def doc_task() -> type:
    """The LinearTask class as the page shows it (its first python block), so the page cannot go stale."""
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["LinearTask"]


def fit(out_dir: Path, steps: int, resume: bool = True) -> dict[str, float]:
    device = CPUDevice(CPUDevice.Config())
    runtime = Runtime(device, Precision(device, "fp32"), DistEnv(), out_dir, seed=0)
    torch.manual_seed(0)
    task = doc_task()(runtime)
    train = TrainSection(steps=steps, batch_size=8, grad_accum=2, eval_every=100, checkpoint_every=10, log_every=5)
    loaded = find_resume_checkpoint(out_dir, runtime.dist) if resume else None
    return Trainer(task, runtime, train, name="linear", run_toml="", meta={}, hooks=make_plugin_manager(),
                   resume=loaded).fit()


def test_a_task_that_is_not_a_tokenizer_trains_and_resumes_exactly(tmp_path):
    metrics = fit(tmp_path / "once", steps=30)
    assert metrics["weight_error"] < 0.2  # it learned y = sum(x)
    once = load_tensors(latest_checkpoint(tmp_path / "once") / "net.safetensors")

    fit(tmp_path / "twice", steps=20)
    fit(tmp_path / "twice", steps=30)  # resumes at step 20
    ck = latest_checkpoint(tmp_path / "twice")
    assert ck.name == "step-00000030"
    twice = load_tensors(ck / "net.safetensors")
    assert set(twice) == {"weight", "bias"}
    assert all(torch.equal(once[k], twice[k]) for k in once)
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["trainable"] == {"net": ["net.weight", "net.bias"]} and state["data"]["samples"] == 30 * 16

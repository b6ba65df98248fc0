"""Exact resume: a run killed (SIGKILL, SIGTERM) and resumed ends with bitwise the same weights as an
uninterrupted one, with DataLoader workers too; what a checkpoint holds and the faults around resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import make_images, tiny_run

from xqgan_core import CheckpointError, Registry
from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.devices import CPUDevice
from xqgan_core.engine import Engine
from xqgan_core.trainer import Trainer

STEPS = 8
# the quantizer restarts dead codes from random tokens: training itself draws from the global RNG, so a resume
# that does not restore it exactly (or an evaluation that draws from it) changes the weights
RESTARTS = "codebook_size = 32\ndead_code_threshold = 1.0"

# Runs `xqgan-run RUN` and sends itself SIGNAL just before step AT + 1 (AT steps done).
DRIVER = """
import os, signal, sys
from xqgan_core.cli import main
from xqgan_core.trainer import Trainer

run, sig, at = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
original = Trainer._step


def step(self, micro):
    if self.state.step == at:
        os.kill(os.getpid(), sig)
    return original(self, micro)


Trainer._step = step
sys.exit(main([run]))
"""


def run_file(tmp_path: Path, data: Path, out: Path, name: str = "run", **train) -> Path:
    settings = {"steps": STEPS, "checkpoint_every": 3, "eval_every": 4, **train}
    text = tiny_run(data, out, **settings).replace("codebook_size = 32", RESTARTS)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == f"step-{STEPS:08d}"
    return {stem: load_tensors(ck / f"{stem}.safetensors") for stem in ("model", "ema", "discriminators")}


def assert_bitwise_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert set(a) == set(b)
    for stem in a:
        assert set(a[stem]) == set(b[stem]), stem
        different = [k for k in a[stem] if not torch.equal(a[stem][k], b[stem][k])]
        assert not different, f"{stem}: {different[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The data folder and the final weights of an uninterrupted run (random crops and flips on)."""
    root = tmp_path_factory.mktemp("reference")
    make_images(root / "data", n=12)
    Engine(Registry.from_toml(run_file(root, root / "data", root / "out"))).fit()
    return root / "data", final_weights(root / "out")


def _killed_then_resumed(tmp_path: Path, data: Path, sig: signal.Signals, at: int, **train) -> Path:
    out = tmp_path / "out"
    run = run_file(tmp_path, data, out, **train)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    res = subprocess.run([sys.executable, str(driver), str(run), sig.name, str(at)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode in (-sig, 128 + sig), res.stderr  # SIGKILL kills; SIGTERM stops with 128 + 15
    stopped = latest_checkpoint(out)
    assert stopped is not None and int(stopped.name.split("-")[1]) < STEPS
    Engine(Registry.from_toml(run)).fit()  # the same command again
    return out


@pytest.mark.parametrize("sig, at, resumes_at", [(signal.SIGKILL, 5, 3), (signal.SIGTERM, 4, 5)])
def test_killed_and_resumed_run_ends_with_the_same_weights(reference, tmp_path, capsys, sig, at, resumes_at):
    data, expected = reference
    out = _killed_then_resumed(tmp_path, data, sig, at)
    assert f"(step {resumes_at})" in "".join(capsys.readouterr())
    assert_bitwise_equal(final_weights(out), expected)


def test_exact_resume_with_dataloader_workers(reference, tmp_path):
    """Items depend on their (index, seed) key only: worker processes, their seeds and a resume change nothing."""
    data, expected = reference
    out = _killed_then_resumed(tmp_path, data, signal.SIGKILL, 5, num_workers=2)
    assert_bitwise_equal(final_weights(out), expected)


def test_evaluation_does_not_change_the_training_run(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "out"
    Engine(Registry.from_toml(run_file(tmp_path, data, out, eval_every=1))).fit()  # evaluates after every step
    assert_bitwise_equal(final_weights(out), expected)


def test_resume_false_on_a_folder_with_checkpoints_is_refused_before_anything_is_written(tmp_path):
    make_images(tmp_path / "data")
    out = tmp_path / "out"
    run = run_file(tmp_path, tmp_path / "data", out, steps=2)
    Engine(Registry.from_toml(run)).fit()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="run.resume = false"):
        Engine(Registry.from_toml(run, overrides=["run.resume=false", "train.steps=4"])).fit()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    make_images(tmp_path / "data")
    out = tmp_path / "out"
    run = run_file(tmp_path, tmp_path / "data", out, steps=4, checkpoint_every=2)
    Engine(Registry.from_toml(run)).fit()
    newest = latest_checkpoint(out)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step-00000004"):
        Engine(Registry.from_toml(run, overrides=["train.steps=5"])).fit()
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} (step 2)" in "".join(capsys.readouterr())


@pytest.mark.parametrize("adapter, change", [
    ('[[adapters]]\nuse = "frozen"\nparts = ["encoder"]', "no longer trained: model.encoder."),
    ('[[adapters]]\nuse = "lora"\nrank = 2\ntargets = ["decoder"]', "now trained: model.decoder."),
])
def test_changing_what_trains_between_a_run_and_its_resume_is_named(tmp_path, adapter, change):
    make_images(tmp_path / "data")
    out = tmp_path / "out"
    Engine(Registry.from_toml(run_file(tmp_path, tmp_path / "data", out, steps=2))).fit()
    changed = run_file(tmp_path, tmp_path / "data", out, name="changed", steps=3)
    changed.write_text(changed.read_text() + "\n" + adapter + "\n")
    with pytest.raises(CheckpointError, match="what trains changed") as err:
        Engine(Registry.from_toml(changed)).fit()
    assert change in str(err.value) and "optimizer 'tokenizer'" in str(err.value)


def test_checkpoint_records_run_id_data_order_rng_and_trainable_names(tmp_path):
    make_images(tmp_path / "data")
    out = tmp_path / "out"
    run = run_file(tmp_path, tmp_path / "data", out, steps=2, checkpoint_every=1)
    Engine(Registry.from_toml(run)).fit()
    Engine(Registry.from_toml(run, overrides=["train.steps=3"])).fit()
    folders = sorted((out / "checkpoints").glob("step-*"))
    metas = [json.loads((f / "meta.json").read_text()) for f in folders]
    assert len({m["run_id"] for m in metas}) == 1  # kept across the resume
    state = torch.load(folders[-1] / "state.pt", weights_only=True)
    assert state["run_id"] == metas[-1]["run_id"] and state["step"] == 3
    assert state["data"] == {"seed": 0, "samples": 3 * 4}
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1  # one entry per rank
    assert set(state["trainable"]) == {"tokenizer", "discriminators"}
    assert "model.decoder.conv_out.weight" in state["trainable"]["tokenizer"]
    assert set(metas[-1]["files"]) == {"model", "ema", "discriminators"}


class RecordingDevice(CPUDevice):
    """A CPU device whose ``wrap_for_eval`` (HPU graphs on a Gaudi) records what it was given."""

    wrapped: list[torch.nn.Module] = []

    def wrap_for_eval(self, module: torch.nn.Module) -> torch.nn.Module:
        self.wrapped.append(module)
        return module


def test_evaluation_never_wraps_the_live_training_model(tmp_path, monkeypatch):
    make_images(tmp_path / "data")
    monkeypatch.setattr("xqgan_core.engine.auto_device", lambda: RecordingDevice(CPUDevice.Config()))
    trainers: list[Trainer] = []
    original = Trainer.fit

    def fit(self):
        trainers.append(self)
        return original(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    run = run_file(tmp_path, tmp_path / "data", tmp_path / "out", steps=2, eval_every=1, ema_decay=0.0)
    Engine(Registry.from_toml(run)).fit()
    live = trainers[0].task.model
    live_storage = {p.data_ptr() for p in live.parameters()}
    assert len(RecordingDevice.wrapped) == 2
    for module in RecordingDevice.wrapped:
        assert module is not live and not live_storage & {p.data_ptr() for p in module.parameters()}


def _as_format_1(folder: Path) -> None:
    """Rewrite a checkpoint the way the single-file engine (before the Trainer/Task split) wrote it: its state.pt
    keys (gen_opt, gen_sched, disc_opt, scaler, lecam, one rng dict) and a meta.json without files / run_id."""
    state = torch.load(folder / "state.pt", weights_only=True)
    old = {
        "step": state["step"],
        "bad_steps_total": state["bad_steps_total"],
        "train_seconds": state["train_seconds"],
        "gen_opt": state["optimizers"]["tokenizer"],
        "disc_opt": state["optimizers"]["discriminators"],
        "gen_sched": state["schedulers"]["tokenizer"],
        "scaler": state["precision"],
        "lecam": state["task"]["lecam"],
        "rng": state["rng"][0],
        "hooks": {},
    }
    torch.save(old, folder / "state.pt")
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("files"), meta.pop("run_id")
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_of_the_single_file_engine_resumes(tmp_path, capsys):
    make_images(tmp_path / "data")
    out = tmp_path / "out"
    run = run_file(tmp_path, tmp_path / "data", out, steps=4, checkpoint_every=2)
    Engine(Registry.from_toml(run)).fit()
    _as_format_1(latest_checkpoint(out))
    Engine(Registry.from_toml(run, overrides=["train.steps=6"])).fit()
    assert "(step 4)" in "".join(capsys.readouterr())
    final = latest_checkpoint(out)
    assert final is not None and final.name == "step-00000006"
    state = torch.load(final / "state.pt", weights_only=True)
    # the optimizer continued from the converted state: Adam's step counter went on from 4, not from 0
    steps = {int(s["step"]) for s in state["optimizers"]["tokenizer"]["state"].values()}
    assert steps == {6}

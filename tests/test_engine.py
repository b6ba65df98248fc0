"""End-to-end training through Engine / xqgan-run: bad data, crashes, resume, untrusted checkpoints, NaN losses."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_fixtures import make_images, tiny_run

from xqgan_core import ConfigError, Registry
from xqgan_core.checkpoint import latest_checkpoint
from xqgan_core.engine import Engine, TrainingError
from xqgan_core.errors import CheckpointError
from xqgan_core.optim import warmup_cosine
from xqgan_core.tokenizer_task import TokenizerTask

CLI = [sys.executable, "-m", "xqgan_core.cli"]


def write_run(tmp_path: Path, data: Path, out: Path, **train) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(tiny_run(data, out, **train))
    return path


def records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_trains_end_to_end_with_bad_files_reported(tmp_path, capsys):
    data = tmp_path / "data"
    make_images(data)
    (data / "a" / "zero.png").write_bytes(b"")
    good = (data / "a" / "img01.png").read_bytes()
    jpeg = tmp_path / "tmp.jpg"
    from PIL import Image

    Image.open(data / "a" / "img01.png").convert("RGB").save(jpeg, quality=90)
    (data / "b" / "corrupt.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    assert good
    out = tmp_path / "out"
    metrics = Engine(Registry.from_toml(write_run(tmp_path, data, out))).fit()
    assert {"psnr", "ssim", "utilization", "perplexity"} <= set(metrics)
    # PSNR of clamped images is never negative; a few steps of a tiny model lie far from both ends: a NaN, inf
    # (images compared with themselves) or a thumbnail-grade value (>= 30 dB here) would mean a broken evaluation
    assert 0 < metrics["utilization"] <= 100 and 5 < metrics["psnr"] < 30
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "zero.png" in text and "corrupt.jpg" in text and "run summary" in text
    # the baseline next to the tokenizer's figures: a bicubic thumbnail at the token grid's size (16 px / 2)
    assert f"(bicubic 8x8 thumbnail: {metrics['thumbnail/psnr']:.4f})" in text
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == "step-00000006"
    assert (ck / "model.safetensors").is_file() and (ck / "ema.safetensors").is_file()
    assert (ck / "discriminators.safetensors").is_file()
    resolved = (ck / "run.toml").read_text()
    assert 'package = "xqgan-plugin-vq"' in resolved and 'package = "xqgan-plugin-cnn"' in resolved
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["provenance"]["quantizer"]["distribution"] == "xqgan-plugin-vq"
    assert (out / "reconstructions.png").is_file() and (out / "grids" / "step-00000006.png").is_file()
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert "d_loss" in train[-1] and "d_loss" not in train[1]  # discriminator switches on at disc_start = 3
    assert all(r["grad_norm"] >= 0 for r in train)
    assert len(records(out, "eval")) == 1
    # the checkpoint keeps 2 step folders (keep_checkpoints default)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]


def test_learning_rate_follows_warmup_cosine(tmp_path):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    Engine(Registry.from_toml(write_run(tmp_path, data, out, steps=5, warmup_steps=2))).fit()
    factor = warmup_cosine(2, 5, 0.1)
    lrs = [r["lr"] for r in records(out, "train")]
    # the lr logged at step s is the one the scheduler set for the next step
    assert lrs == pytest.approx([1e-3 * factor(s) for s in range(1, 6)])


def test_lazy_r1_penalty_runs_on_every_r1_every_th_discriminator_step(tmp_path):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    path = write_run(tmp_path, data, out, steps=8)
    path.write_text(path.read_text().replace("lecam = 0.001", "lecam = 0.001\nr1 = 1.0\nr1_every = 2"))
    Engine(Registry.from_toml(path)).fit()
    with_r1 = [r["step"] for r in records(out, "train") if "d_r1" in r]
    # discriminator steps from disc_start = 3 (0-based step counter 3..7, logged as 4..8); R1 where it is even
    assert with_r1 == [5, 7] and all(r["d_r1"] > 0 for r in records(out, "train") if "d_r1" in r)


def test_gradient_clipping_is_applied(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_images(data)
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        norm = real(params, max_norm, *a, **k)
        seen.append((float(norm), float(torch.stack([p.grad.norm() for p in params]).norm()), max_norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    Engine(Registry.from_toml(write_run(tmp_path, data, tmp_path / "out", steps=2, grad_clip=1e-3))).fit()
    assert seen and all(after <= max_norm * 1.01 for _, after, max_norm in seen)
    assert any(before > max_norm for before, _, max_norm in seen)


def test_empty_data_folder_fails_before_anything_is_written(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    out = tmp_path / "out"
    res = subprocess.run(CLI + [str(write_run(tmp_path, data, out))], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "data.root" in res.stderr and str(data) in res.stderr
    assert not out.exists()


def test_nan_loss_steps_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    make_images(data)
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def flaky(a, b, *args, **kw):
        calls["n"] += 1
        value = real(a, b, *args, **kw)
        return value * float("nan") if calls["n"] in (2, 3) else value

    monkeypatch.setattr("xqgan_core.tokenizer_task.F.mse_loss", flaky)
    out = tmp_path / "out"
    Engine(Registry.from_toml(write_run(tmp_path, data, out, steps=5))).fit()
    text = capsys.readouterr()
    assert "non-finite loss, step skipped" in text.out + text.err
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 4, 5]  # steps 2 and 3 were skipped
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)
    assert state["bad_steps_total"] == 2 and state["step"] == 5


def test_repeated_nan_stops_with_last_good_checkpoint_intact(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_images(data)
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def broken_after_3(a, b, *args, **kw):
        calls["n"] += 1
        value = real(a, b, *args, **kw)
        return value * float("nan") if calls["n"] > 2 else value

    monkeypatch.setattr("xqgan_core.tokenizer_task.F.mse_loss", broken_after_3)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="max_bad_steps"):
        Engine(Registry.from_toml(write_run(tmp_path, data, out, steps=20, max_bad_steps=3))).fit()
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == "step-00000002"
    assert torch.load(ck / "state.pt", weights_only=True)["step"] == 2


def test_kill_9_then_same_command_resumes(tmp_path):
    data = tmp_path / "data"
    make_images(data, n=16)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=400, checkpoint_every=3, eval_every=1000, log_every=1)
    proc = subprocess.Popen(CLI + [str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            ck = latest_checkpoint(out)
            if ck is not None and int(ck.name.split("-")[1]) >= 6:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = int(latest_checkpoint(out).name.split("-")[1])
    logged = max(r["step"] for r in records(out, "train"))
    assert logged - killed_at < 3 + 3  # at most one checkpoint interval (plus steps in flight) lost
    res = subprocess.run(CLI + [str(run), "--set", f"train.steps={killed_at + 3}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {latest_checkpoint(out).parent / f'step-{killed_at:08d}'} (step {killed_at})" in res.stdout + res.stderr
    steps_after = [r["step"] for r in records(out, "train")]
    assert steps_after[-3:] == [killed_at + 1, killed_at + 2, killed_at + 3]
    # the schedule continues where it was: the lr at the final step is the uninterrupted schedule's
    factor = warmup_cosine(2, killed_at + 3, 0.1)
    assert records(out, "train")[-1]["lr"] == pytest.approx(1e-3 * factor(killed_at + 3))


def _stop_with_signal(cmd: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a training command, send ``sig`` once a few steps are logged, return how it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(records(out, "train")) >= 3:
                break
            time.sleep(0.1)
        else:
            pytest.fail("training did not start")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_the_current_step_and_the_same_command_resumes(tmp_path, sig):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=400, checkpoint_every=1000, eval_every=1000, log_every=1)
    res = _stop_with_signal(CLI + [str(run)], out, sig)
    assert res.returncode == 128 + sig, res.stderr
    stopped_at = max(r["step"] for r in records(out, "train"))
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}" in res.stderr
    assert latest_checkpoint(out).name == f"step-{stopped_at:08d}"  # nothing lost despite checkpoint_every=1000
    res = subprocess.run(CLI + [str(run), "--set", f"train.steps={stopped_at + 2}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"(step {stopped_at})" in res.stdout + res.stderr
    assert [r["step"] for r in records(out, "train")][-2:] == [stopped_at + 1, stopped_at + 2]


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=400, checkpoint_every=1000, eval_every=1000, log_every=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "xqgan_core.cli", str(run), "--set", "device.use=cpu"]
    res = _stop_with_signal(cmd, out, signal.SIGTERM)  # torchrun passes it on to both ranks
    assert res.returncode != 0
    stopped_at = max(r["step"] for r in records(out, "train"))
    reports = re.findall(r"stopped by SIGTERM at step (\d+) \(rank (\d) of 2\)", res.stderr)
    assert sorted(reports) == [(str(stopped_at), "0"), (str(stopped_at), "1")], res.stderr  # every rank, same step
    ck = latest_checkpoint(out)
    assert ck.name == f"step-{stopped_at:08d}"
    assert torch.load(ck / "state.pt", weights_only=True)["step"] == stopped_at


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['XQGAN_TEST_MARKER']}",))


def test_rerunning_a_finished_run_reports_its_metrics_without_training(tmp_path, capsys):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=2)
    first = Engine(Registry.from_toml(run)).fit()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    again = Engine(Registry.from_toml(run)).fit()
    assert again == pytest.approx(first)  # from summary.json: no training, no new evaluation
    assert (out / "metrics.jsonl").read_text().splitlines() == lines
    text = "".join(capsys.readouterr())
    assert "run already complete at step 2" in text and "PSNR (dB)" in text
    # killed between the last checkpoint and its evaluation: the rerun evaluates instead
    (out / "summary.json").unlink()
    redone = Engine(Registry.from_toml(run)).fit()
    assert redone["psnr"] == pytest.approx(first["psnr"], rel=1e-5)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(lines) + 1


def test_crafted_checkpoint_is_refused_and_not_executed(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=2)
    Engine(Registry.from_toml(run)).fit()
    marker = tmp_path / "pwned"
    monkeypatch.setenv("XQGAN_TEST_MARKER", str(marker))
    ck = latest_checkpoint(out)
    with open(ck / "state.pt", "wb") as fh:
        pickle.dump({"step": _Payload()}, fh)
    res = subprocess.run(CLI + [str(run), "--set", "train.steps=4"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XQGAN_TEST_MARKER": str(marker)})
    assert res.returncode == 1
    assert "refusing to load" in res.stderr and "state.pt" in res.stderr
    assert not marker.exists()


def test_checkpoint_from_another_architecture_is_named(tmp_path):
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    Engine(Registry.from_toml(write_run(tmp_path, data, out, steps=2))).fit()
    changed = tiny_run(data, out, steps=4).replace("codebook_size = 32", "codebook_size = 48")
    (tmp_path / "changed.toml").write_text(changed)
    with pytest.raises(CheckpointError, match=r"quantizer.embedding.weight \(checkpoint \(32, 8\), run file \(48, 8\)\)"):
        Engine(Registry.from_toml(tmp_path / "changed.toml")).fit()


def test_required_perceptual_loss_without_its_weights_stops_before_the_run_folder_is_touched(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_images(data)
    monkeypatch.setenv("XQGAN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out)
    run.write_text(run.read_text().replace("perceptual = 0.0", "perceptual = 1.0\nrequire_perceptual = true"))
    with pytest.raises(CheckpointError, match="vgg16"):
        Engine(Registry.from_toml(run)).fit()
    assert not out.exists()


def test_run_without_data_is_a_config_error(tmp_path):
    text = tiny_run(tmp_path, tmp_path / "out")
    start = text.index("[data]")
    text = text[:start] + text[text.index("[encoder]"):]
    path = tmp_path / "nodata.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="data: select an image source"):
        Engine(Registry.from_toml(path))


def test_sampler_is_resumable_and_sharded():
    from itertools import islice

    from xqgan_core.distributed import StepSampler

    full = list(islice(iter(StepSampler(10, 3, seed=5)), 8))
    resumed = list(islice(iter(StepSampler(10, 3, seed=5, start=5)), 3))
    assert resumed == full[5:]  # the same (index, seed) keys: same images, same augmentations
    # every epoch is a permutation of the dataset; every sample of the run has its own augmentation seed
    flat = [i for batch in full for i, _ in batch][:20]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    seeds = [seed for batch in full for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
    assert [s for batch in islice(iter(StepSampler(10, 3, seed=6)), 8) for _, s in batch] != seeds
    r0 = list(islice(iter(StepSampler(10, 2, seed=1, rank=0, world=2)), 2))
    r1 = list(islice(iter(StepSampler(10, 2, seed=1, rank=1, world=2)), 2))
    assert {i for i, _ in r0[0]}.isdisjoint(i for i, _ in r1[0])
    assert r0[0] + r1[0] == list(islice(iter(StepSampler(10, 4, seed=1)), 1))[0]


def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with the gloo backend: the same code path a CUDA (NCCL) or HPU (HCCL) cluster takes."""
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=4)
    torchrun = Path(sys.executable).with_name("torchrun")
    # device cpu explicitly: on a GPU machine the automatic choice would be CUDA with NCCL
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "xqgan_core.cli", str(run), "--set", "device.use=cpu"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "device cpu x2" in res.stdout + res.stderr
    assert latest_checkpoint(out).name == "step-00000004"
    assert "d_loss" in records(out, "train")[-1]


HIERARCHIES = {
    "pq2-msrq-vq": ('use = "pq"\nbranches = 2\n[quantizer.branch]\nuse = "msrq"\nscales = [1, 2, 4, 8]\nphi_count = 2\n'
                    'dropout = { rate = 0.5, min_levels = 2 }\n[quantizer.branch.code]\nuse = "vq"\ncodebook_size = 32\ndim = 4'),
    "pq2-rq-lfq": ('use = "pq"\nbranches = 2\n[quantizer.branch]\nuse = "rq"\nlevels = 2\n[quantizer.branch.code]\n'
                   'use = "lfq"\nbits = 4'),
    "msrq-bsq": 'use = "msrq"\nscales = [1, 2, 4, 8]\nphi_count = 2\n[quantizer.code]\nuse = "bsq"\nbits = 8',
}


_NAN_ON_ONE_RANK = """
import sys
from xqgan_core import Registry
from xqgan_core.engine import Engine
from xqgan_core.tokenizer_task import TokenizerTask

original = TokenizerTask.training_step


def nan_on_rank_1(self, micro, step):
    sums = original(self, micro, step)
    if self.runtime.dist.rank == 1 and step == 1:  # the second step, on one rank only
        sums["loss"] = sums["loss"] * float("nan")
    return sums


TokenizerTask.training_step = nan_on_rank_1
Engine(Registry.from_toml(sys.argv[1], overrides=["device.use=cpu"])).fit()
"""


def test_ddp_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Without a shared skip decision, the NaN rank would skip its backward and leave the other one waiting forever
    in DDP's gradient all-reduce."""
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    run = write_run(tmp_path, data, out, steps=4)
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_ONE_RANK)
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(run)],
                         capture_output=True, text=True, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "step 2: non-finite loss, step skipped" in text  # reported by rank 0, whose own loss was finite
    assert latest_checkpoint(out).name == "step-00000004"
    assert [r["step"] for r in records(out, "train")][-1] == 4


def test_gradient_accumulation_all_reduces_only_on_the_last_micro_batch(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_images(data)
    entered = []

    class FakeDDP(torch.nn.Module):  # what DistributedDataParallel offers the engine: forward and no_sync()
        def __init__(self, model):
            super().__init__()
            self.module = model

        def forward(self, x):
            return self.module(x)

        def no_sync(self):
            entered.append(self.module)
            return contextlib.nullcontext()

    original = TokenizerTask.training_step

    def with_fake_ddp(self, micro, step):
        if not isinstance(self.train_model, FakeDDP):
            self.train_model = FakeDDP(self.model)
        return original(self, micro, step)

    monkeypatch.setattr(TokenizerTask, "training_step", with_fake_ddp)
    Engine(Registry.from_toml(write_run(tmp_path, data, tmp_path / "out", steps=2, grad_accum=3))).fit()
    assert len(entered) == 4  # per step, micro-batches 1 and 2 skip the all-reduce; the last one does it


@pytest.mark.parametrize("name", sorted(HIERARCHIES))
def test_cnn_pipeline_trains_with_quantizer_hierarchies(tmp_path, name):
    """The CNN tokenizer trains and evaluates with product / residual / multi-scale quantizers (P > 1 included)."""
    data = tmp_path / "data"
    make_images(data)
    out = tmp_path / "out"
    text = tiny_run(data, out, steps=3)
    start, end = text.index("[quantizer]"), text.index("[decoder]")
    text = text[:start] + "[quantizer]\n" + HIERARCHIES[name] + "\n\n" + text[end:]
    path = tmp_path / "run.toml"
    path.write_text(text)
    metrics = Engine(Registry.from_toml(path)).fit()
    assert 5 < metrics["psnr"] < 30 and 0 < metrics["utilization"] <= 100  # see test_trains_end_to_end_...
    per_codebook = {
        "pq2-msrq-vq": {"utilization/branch0", "utilization/branch1"},  # one codebook per branch, shared by scales
        "pq2-rq-lfq": {f"utilization/branch{b}/level{lv}" for b in (0, 1) for lv in (0, 1)},
        "msrq-bsq": set(),
    }[name]
    assert per_codebook <= set(metrics)

"""torchrun with two CPU processes (gloo): every rank ends with bitwise the same weights, ranks stop together on a
signal that reached only one of them, and a stopped DDP run resumes to exactly the uninterrupted run's weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import make_images, tiny_run

from xqgan_core.checkpoint import latest_checkpoint, load_tensors

STEPS = 6
PARTS = ("model", "ema", "discriminators")

# `xqgan-run RUN --set device.use=cpu` on every rank; afterwards each rank saves its task's modules to
# OUT/rank<r>-<name>.safetensors. With STOP_AT >= 0, rank 0 (only) sends itself SIGTERM after STOP_AT steps, and
# each rank records the step it stopped at in OUT/rank<r>.stopped.
DRIVER = """
import json, os, signal, sys
from safetensors.torch import save_file
from xqgan_core.cli import main
from xqgan_core.trainer import Trainer

run, out, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
fit, step, stop = Trainer.fit, Trainer._step, Trainer._stop_on_signal


def fit_and_save(self):
    result = fit(self)
    for name, part in self.task.modules().items():
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in part.state_dict().items()}
        save_file(tensors, f"{out}/rank{self.dist.rank}-{name}.safetensors")
    return result


def step_with_signal(self, micro):
    if self.state.step == stop_at and self.dist.rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, micro)


def recorded_stop(self, signum, log):
    with open(f"{out}/rank{self.dist.rank}.stopped", "w") as fh:
        fh.write(str(self.state.step))
    return stop(self, signum, log)


Trainer.fit, Trainer._step, Trainer._stop_on_signal = fit_and_save, step_with_signal, recorded_stop
sys.exit(main([run, "--set", "device.use=cpu"]))
"""


def torchrun(tmp_path: Path, run: Path, out: Path, stop_at: int = -1) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", str(driver),
           str(run), str(out), str(stop_at)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def run_file(tmp_path: Path, data: Path, out: Path) -> Path:
    path = tmp_path / "run.toml"
    # dead-code restarts: the quantizer draws random tokens during training (on rank 0, shared with the others)
    path.write_text(tiny_run(data, out, steps=STEPS, checkpoint_every=2, eval_every=100)
                    .replace("codebook_size = 32", "codebook_size = 32\ndead_code_threshold = 1.0"))
    return path


def rank_weights(out: Path, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_tensors(out / f"rank{rank}-{name}.safetensors") for name in PARTS}


def assert_bitwise_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    for name in PARTS:
        assert set(a[name]) == set(b[name]), name
        different = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not different, f"{name}: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The data folder and the per-rank weights folder of an uninterrupted 2-process run."""
    root = tmp_path_factory.mktemp("ddp")
    make_images(root / "data")
    res = torchrun(root, run_file(root, root / "data", root / "run"), root / "weights")
    assert res.returncode == 0, res.stdout + res.stderr
    return root / "data", root / "weights"


def test_every_rank_ends_with_bitwise_the_same_weights(uninterrupted):
    _, weights = uninterrupted
    rank0, rank1 = rank_weights(weights, 0), rank_weights(weights, 1)
    assert_bitwise_equal(rank0, rank1)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in rank0["discriminators"].values())


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes_exactly(uninterrupted, tmp_path):
    data, expected = uninterrupted
    out = tmp_path / "run"
    run = run_file(tmp_path, data, out)
    # after 4 steps: the discriminators (disc_start = 3) and LeCam's anchors are under way at the checkpoint
    stopped = torchrun(tmp_path, run, tmp_path / "weights", stop_at=3)
    assert stopped.returncode != 0
    steps = {int((tmp_path / "weights" / f"rank{r}.stopped").read_text()) for r in (0, 1)}
    assert steps == {4}, stopped.stderr  # rank 1 got no signal, and stopped with rank 0 after the same step
    ck = latest_checkpoint(out)
    state = torch.load(ck / "state.pt", weights_only=True)
    assert ck.name == "step-00000004" and state["step"] == 4
    assert len(state["rng"]) == 2  # each rank's RNG states
    assert bool(state["task"]["lecam"]["initialised"])

    resumed = torchrun(tmp_path, run, tmp_path / "weights")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ck} (step 4)" in resumed.stdout + resumed.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"][-2:] == [5, 6]
    for rank in (0, 1):
        assert_bitwise_equal(rank_weights(tmp_path / "weights", rank), rank_weights(expected, 0))


def test_the_process_group_is_created_with_the_configured_timeout(monkeypatch):
    import datetime

    from xqgan_core.devices import CPUDevice
    from xqgan_core.distributed import DistEnv, init_process_group

    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    init_process_group(CPUDevice(CPUDevice.Config()), DistEnv(rank=1, world=2), timeout_s=90)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=90)}

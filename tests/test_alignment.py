"""Semantic alignment (issue 10): the shared InfoNCE over the global batch (2 gloo ranks = one process on the
concatenated batch), samples truncated by quantizer dropout left out, run-file checks of [[aligners]] against the
quantizer, and a tiny aligned run through the Engine: the frozen teacher stays bit-identical and out of the
checkpoint, the heads train, are saved and resume exactly, and the tokenizer reloads without any teacher."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import alignment_ranks
import pytest
import torch
import torch.multiprocessing as mp
from engine_fixtures import make_images, tiny_run
from safetensors.torch import save_file

from xqgan_core import ConfigError, Engine, Registry, Tokenizer, alignment
from xqgan_core.alignment import annealed_scale, info_nce, patch_cosine, patch_info_nce
from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.trainer import Trainer

# ----------------------------------------------------------------------------------------------------------------
# the maths


def _features(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_info_nce_with_left_out_rows_equals_info_nce_of_the_kept_rows() -> None:
    a, b = _features()
    a.requires_grad_(True)
    valid = torch.tensor([True, False, True, True, False, True])
    masked = info_nce(a, b, 3.0, valid)
    expected = info_nce(a[valid].detach(), b[valid], 3.0)
    torch.testing.assert_close(masked, expected)
    masked.backward()
    assert a.grad[~valid].abs().sum() == 0 and a.grad[valid].abs().sum() > 0
    assert info_nce(a, b, 3.0, torch.zeros(6, dtype=torch.bool)) == 0  # nobody kept: no loss, no NaN


def test_info_nce_is_symmetric_cross_entropy() -> None:
    a, b = _features()
    logits = 2.0 * a @ b.t()
    labels = torch.arange(6)
    expected = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(info_nce(a, b, 2.0), expected)


def test_patch_losses_prefer_matching_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 3, generator=g)
    shuffled = x.flatten(2)[:, :, torch.randperm(9, generator=g)].view_as(x)
    assert patch_cosine(x, x) < 1e-6 < patch_cosine(x, shuffled)
    assert patch_info_nce(x, x, 10.0) < patch_info_nce(x, shuffled, 10.0)
    valid = torch.tensor([True, False])
    torch.testing.assert_close(patch_cosine(x, shuffled, valid), patch_cosine(x[:1], shuffled[:1]))


def test_a_teacher_shared_by_aligners_runs_once_per_batch() -> None:
    from xqgan_core.testing import TinyTeacher

    class Counting(TinyTeacher):
        calls = 0

        def extract(self, pixels: torch.Tensor) -> alignment.TeacherFeatures:
            self.calls += 1
            return super().extract(pixels)

    teacher = Counting()
    inputs = alignment.AlignmentInputs(torch.zeros(2, 3, 16, 16), torch.zeros(2, 4, 4, 4), None, None)  # type: ignore[arg-type]
    first, second = inputs.teacher_features(teacher), inputs.teacher_features(teacher)
    assert first is second and teacher.calls == 1


def test_code_views_of_product_and_multi_scale_quantizers() -> None:
    """pq hands out a branch's channel group; msrq's scale k is the codes accumulated over scales 0..k on scale k's
    grid, with the straight-through gradient to that branch's latents only."""
    from xqgan_core import build

    torch.manual_seed(0)
    q = build("quantizer", {"use": "pq", "branches": 2, "branch": {
        "use": "msrq", "scales": [1, 2, 4], "phi_count": 0, "code": {"use": "vq", "codebook_size": 16, "dim": 4}}})
    latents = torch.randn(3, 8, 4, 4, requires_grad=True)
    keep = torch.tensor([3, 3, 1])
    quant = q(latents, keep=keep)
    assert torch.equal(quant.keep, keep)
    inputs = alignment.AlignmentInputs(torch.zeros(3, 3, 16, 16), latents, quant, q)
    assert inputs.kept.tolist() == [True, True, False]
    torch.testing.assert_close(inputs.codes(-1), quant.z_q[:, 4:])
    view = inputs.codes(1, scale=1)  # branch 1, accumulated over scales 0 and 1, on the 2x2 grid
    branch = q.branches[1]
    own = [i[:, 1] for i in quant.indices]
    expected = torch.nn.functional.adaptive_avg_pool2d(branch.indices_to_codes(own, keep=torch.clamp(keep, max=2)), 2)
    torch.testing.assert_close(view, expected)
    view.sum().backward()
    assert latents.grad[:, :4].abs().sum() == 0  # branch 0 untouched
    torch.testing.assert_close(latents.grad[:, 4:], torch.full((3, 4, 4, 4), 0.25))  # area average's adjoint
    with pytest.raises(ValueError, match="scale 3 does not exist"):
        inputs.codes(0, scale=3)


def test_teacher_runs_in_bf16_when_asked_and_hands_out_fp32() -> None:
    from xqgan_core.testing import TinyTeacher

    class Recording(TinyTeacher):
        def extract(self, pixels: torch.Tensor) -> alignment.TeacherFeatures:
            out = super().extract(pixels)
            self.seen = out.patches.dtype
            return out

    teacher = Recording()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    exact = teacher.features(images)
    teacher.precision = "bf16"
    fast = teacher.features(images)
    assert teacher.seen == torch.bfloat16 and fast.patches.dtype == torch.float32
    torch.testing.assert_close(fast.patches, exact.patches, atol=0.05, rtol=0.05)
    teacher.precision = "auto"  # a CPU computes fp32 under "auto"
    teacher.features(images)
    assert teacher.seen == torch.float32


def test_a_bf16_teacher_runs_on_a_bf16_copy_of_its_frozen_weights() -> None:
    """The copy is made once (not at every call), the fp32 weights stay as they were, and it is not state."""
    from xqgan_core.testing import TinyTeacher

    class Recording(TinyTeacher):
        def extract(self, pixels: torch.Tensor) -> alignment.TeacherFeatures:
            self.weight_dtype = self.embed.weight.dtype  # what the forward really multiplies with
            return super().extract(pixels)

    teacher = Recording().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.precision = "bf16"
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    first = teacher.features(images)
    copy = teacher._weights_in(torch.bfloat16)
    assert teacher.weight_dtype == torch.bfloat16 and copy["embed.weight"].dtype == torch.bfloat16
    second = teacher.features(images)
    assert teacher._weights_in(torch.bfloat16) is copy and torch.equal(first.patches, second.patches)
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in teacher.state_dict().items())
    teacher.precision = "fp32"
    teacher.features(images)
    assert teacher.weight_dtype == torch.float32


def test_logit_scale_ramp() -> None:
    assert annealed_scale(0, 200, 1.0, 100.0) == 1.0
    assert annealed_scale(100, 200, 1.0, 100.0) == pytest.approx(50.5)
    assert annealed_scale(500, 200, 1.0, 100.0) == 100.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_info_nce_on_two_gloo_ranks_equals_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    mp.spawn(alignment_ranks.gathered_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = alignment_ranks.features()
    a.requires_grad_(True)
    b.requires_grad_(True)
    valid = torch.tensor(alignment_ranks.VALID)
    loss = info_nce(a, b, 2.5, valid)
    loss.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach())
        rows = slice(4 * rank, 4 * rank + 4)
        # each rank computed the global loss: its rows' gradient is summed over the 2 ranks (DDP's average of the
        # parameter gradients then equals the one-process gradient)
        torch.testing.assert_close(got["grad_a"], 2 * a.grad[rows])
        torch.testing.assert_close(got["grad_b"], 2 * b.grad[rows])


# ----------------------------------------------------------------------------------------------------------------
# run files


PQ_MSRQ = """
[quantizer]
use = "pq"
branches = 2
[quantizer.branch]
use = "msrq"
scales = [1, 2, 4, 8]
phi_count = 1
dropout = { rate = 0.5, min_levels = 1 }
[quantizer.branch.code]
use = "vq"
codebook_size = 16
dim = 4
"""


def _tiny_dinov2_file(folder: Path) -> Path:
    from xqgan_plugin_dinov2.tiny import save_tiny_weights

    return save_tiny_weights(folder / "tiny-dinov2.safetensors")


def aligned_run(tmp_path: Path, aligners: str, **train: object) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, n=8, size=16)
    text = tiny_run(data, tmp_path / "out", **{"steps": 4, "checkpoint_every": 2, "eval_every": 100, **train})
    start, end = text.index("[quantizer]"), text.index("[decoder]")
    text = text[:start] + PQ_MSRQ + "\n" + text[end:] + aligners
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def aligner_tables(weights: Path, **extra: object) -> str:
    from xqgan_plugin_dinov2.tiny import TINY_ARCH

    arch = "\n".join(f"{k} = {v}" for k, v in TINY_ARCH.items())
    global_table = f"""
[[aligners]]
use = "dinov2"
weights = "{weights}"
image_size = 16
patch_size = 4
{arch}
branch = -1
normalize = true
anneal_steps = 4
"""
    patch_table = global_table.replace("branch = -1", "branch = 0\nmode = \"patch\"\nloss = \"cosine\"\nscale = 2")
    extra_lines = "\n".join(f"{k} = {v}" for k, v in extra.items())
    return global_table + extra_lines + "\n" + patch_table


def test_aligners_are_checked_against_the_quantizer_when_validating(tmp_path: Path) -> None:
    weights = tmp_path / "never-read.safetensors"
    bad = aligner_tables(weights).replace("branch = -1", "branch = 2").replace("scale = 2", "scale = 9")
    with pytest.raises(ConfigError) as err:
        Registry.from_toml(aligned_run(tmp_path, bad))
    assert "aligners[0].branch: branch 2 does not exist" in str(err.value)
    assert "aligners[1].scale: scale 9 does not exist" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# through the Engine


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory):
    """A 4-step run with a global (last branch) and a patch (branch 0, scale 2) DINOv2 aligner, and its task after
    training."""
    root = tmp_path_factory.mktemp("aligned")
    weights = _tiny_dinov2_file(root)
    run = aligned_run(root, aligner_tables(weights))
    seen = {}
    fit = Trainer.fit

    def fit_and_keep(self):
        seen["task"] = self.task
        return fit(self)

    Trainer.fit = fit_and_keep
    try:
        Engine(Registry.from_toml(run)).fit()
    finally:
        Trainer.fit = fit
    return root, run, weights, seen["task"]


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def test_teacher_stays_frozen_and_out_of_the_checkpoint_while_heads_train(aligned) -> None:
    root, run, _, task = aligned
    ck = latest_checkpoint(root / "out")
    assert ck is not None
    heads = load_tensors(ck / "aligner_heads.safetensors")
    assert sorted(heads) == ["0.proj.bias", "0.proj.weight", "1.proj.bias", "1.proj.weight"]
    for path in ck.glob("*.safetensors"):  # no teacher tensor (blocks, patch embedding, ...) anywhere
        assert not any("blocks" in k or "patch_embed" in k or "teacher" in k for k in load_tensors(path)), path.name
    names = [n for group in task.tokenizer_opt.param_groups for p in group["params"] for n in [id(p)]]
    for aligner in task.aligners:
        teacher = aligner.teacher
        assert not any(id(p) in names for p in teacher.parameters())  # never in the optimizer
        assert all(p.grad is None for p in teacher.parameters())
    # both aligners have the same teacher options: one teacher, loaded once, run once per batch
    assert task.aligners[0].teacher is task.aligners[1].teacher
    # after training, the teacher equals a freshly loaded one bit for bit
    fresh = Registry.from_toml(run).config.aligners[0].build().teacher.state_dict()  # loaded anew from the file
    for aligner in task.aligners:
        trained = aligner.teacher.state_dict()
        assert sorted(trained) == sorted(fresh)
        assert all(torch.equal(trained[k], fresh[k]) for k in fresh)
    # the heads moved between the checkpoints of step 2 and step 4
    first, last = (load_tensors(c / "aligner_heads.safetensors") for c in _checkpoints(root / "out")[-2:])
    assert all(not torch.equal(first[k], last[k]) for k in ("0.proj.weight", "1.proj.weight"))


def test_alignment_terms_are_logged(aligned) -> None:
    root = aligned[0]
    text = next((root / "out").rglob("metrics.jsonl")).read_text()
    assert '"align/0/global"' in text and '"align/1/patch"' in text and '"align"' in text


def _resume_from_step_2(root: Path, run: Path, out: Path, nudge_heads: bool = False) -> dict[str, torch.Tensor]:
    shutil.copytree(root / "out", out)
    *_, middle, last = _checkpoints(out)
    shutil.rmtree(last)  # as if killed after the step-2 checkpoint
    if nudge_heads:  # proves the heads are read back from the checkpoint, not rebuilt
        heads = load_tensors(middle / "aligner_heads.safetensors")
        save_file({k: v + 1e-3 for k, v in heads.items()}, str(middle / "aligner_heads.safetensors"))
    Engine(Registry.from_toml(run, overrides=[f'run.out_dir="{out}"'])).fit()
    return load_tensors(latest_checkpoint(out) / "aligner_heads.safetensors")


def test_heads_resume_exactly(aligned, tmp_path: Path) -> None:
    root, run, _, _ = aligned
    uninterrupted = load_tensors(latest_checkpoint(root / "out") / "aligner_heads.safetensors")
    resumed = _resume_from_step_2(root, run, tmp_path / "resumed")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    nudged = _resume_from_step_2(root, run, tmp_path / "nudged", nudge_heads=True)
    assert not torch.equal(uninterrupted["0.proj.weight"], nudged["0.proj.weight"])


def test_tokenizer_from_checkpoint_needs_no_teacher(aligned, tmp_path: Path) -> None:
    root, _, weights, _ = aligned
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    hidden = weights.with_suffix(".hidden")
    weights.rename(hidden)
    try:
        tok = Tokenizer.from_checkpoint(out)
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        assert tok.decode(tok.encode(images)).shape == images.shape
    finally:
        hidden.rename(weights)


def test_two_rank_aligned_run_keeps_heads_and_tokenizer_equal_on_every_rank(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks: the gathered InfoNCE inside DDP's backward neither hangs nor lets ranks drift."""
    from test_ddp import torchrun

    weights = _tiny_dinov2_file(tmp_path)
    run = aligned_run(tmp_path, aligner_tables(weights), steps=2, checkpoint_every=2)
    res = torchrun(tmp_path, run, tmp_path / "ranks")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("aligner_heads", "model"):
        a, b = (load_tensors(tmp_path / "ranks" / f"rank{r}-{name}.safetensors") for r in (0, 1))
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]}"


@pytest.mark.parametrize("plugin", ["xqgan_plugin_dinov2.aligner:DINOv2Aligner", "xqgan_plugin_sam.aligner:SAMAligner"])
def test_patch_teachers_refuse_an_image_size_that_is_not_a_whole_patch_grid(plugin: str) -> None:
    import importlib

    module, name = plugin.split(":")
    aligner = getattr(importlib.import_module(module), name)
    assert aligner.Config(image_size=250, patch_size=16).check() == [
        "image_size: 250 is not a multiple of patch_size 16"]
    assert aligner.Config(image_size=256, patch_size=16).check() == []

"""Generator runs end to end on CPU: a tiny tokenizer run, then the kit's tiny generator trained on its tokens (made
on the fly from images), checkpointed, stopped by SIGTERM and resumed bit-exactly, and loaded for sampling; and the
validation of generator run files."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from engine_fixtures import make_images
from safetensors.torch import save_file

from xqgan_core import ConfigError, Registry
from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.engine import Engine
from xqgan_core.errors import CheckpointError, RunInterrupted
from xqgan_core.generator_run import load_generator, load_generator_run
from xqgan_core.sampling import token_cross_entropy
from xqgan_core.token_shards import sha256_file
from xqgan_core.trainer import Trainer

TOKENIZER_RUN = """
[run]
name = "tok"
out_dir = "{out}"

[data]
use = "folder"
root = "{data}"
resolution = 16
holdout = 0.25

[encoder]
use = "cnn"
channels = 8
channel_mult = [1, 1, 1]
num_res_blocks = 1
z_channels = 8
level_attention = false
out_dim = 4

[quantizer]
use = "vq"
codebook_size = 16
dim = 4

[decoder]
use = "cnn"
channels = 8
channel_mult = [1, 1, 1]
num_res_blocks = 1
z_channels = 8
level_attention = false
in_dim = 4

[train]
steps = 2
batch_size = 4
warmup_steps = 1
checkpoint_every = 2
eval_every = 2

[loss]
perceptual = 0.0

[eval]
lpips = false
grid_images = 0
"""

STEPS = 6


def generator_run(data: Path, tokenizer: Path, out: Path, **train: object) -> str:
    settings = {"steps": STEPS, "batch_size": 4, "checkpoint_every": 2, "eval_every": 3, "log_every": 1,
                "warmup_steps": 2, "lr": 3e-3, "weight_decay": 0.05, "lr_schedule": "linear", **train}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return f"""
[run]
name = "gen"
out_dir = "{out}"

[tokenizer]
run = "{tokenizer}"

[generator]
use = "kit-tiny-ar"
width = 16
depth = 1
heads = 2
class_dropout = 0.5

[data]
use = "folder"
root = "{data}"
resolution = 16
holdout = 0.25

[train]
{lines}

[eval]
batch_size = 4
grid_images = 4

[sample]
top_k = 4
"""


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> tuple[Path, Path]:
    """A data folder (two classes) and a 2-step tokenizer run on it (16 px images -> 4x4 tokens of 16 codes)."""
    root = tmp_path_factory.mktemp("generator-run")
    make_images(root / "data", n=12, size=16)
    (root / "tok.toml").write_text(TOKENIZER_RUN.format(out=root / "tok", data=root / "data"))
    Engine(Registry.from_toml(root / "tok.toml")).fit()
    return root / "data", root / "tok"


@pytest.fixture(scope="module")
def finished_run(tokenizer_run, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    data, tok = tokenizer_run
    root = tmp_path_factory.mktemp("finished")
    (root / "gen.toml").write_text(generator_run(data, tok, root / "out"))
    metrics = Engine(Registry.from_toml(root / "gen.toml")).fit()
    return root / "out", metrics


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == f"step-{STEPS:08d}"
    return {stem: load_tensors(ck / f"{stem}.safetensors") for stem in ("generator", "generator_ema")}


def test_generator_run_trains_evaluates_and_checkpoints_only_the_generator(finished_run, tokenizer_run):
    out, metrics = finished_run
    _, tok = tokenizer_run
    assert {"ce", "acc"} <= set(metrics) and 0 <= metrics["acc"] <= 1 and metrics["ce"] > 0
    assert (out / "samples.png").is_file() and len(list((out / "grids").glob("samples-*.png"))) == 2
    ck = latest_checkpoint(out)
    assert ck is not None
    assert sorted(p.name for p in ck.glob("*.safetensors")) == ["generator.safetensors", "generator_ema.safetensors"]
    # the run records which tokenizer weights its tokens came from, in run.toml and meta.json
    tok_weights = latest_checkpoint(tok) / "ema.safetensors"
    sha = sha256_file(tok_weights)
    assert f'sha256 = "{sha}"' in (out / "run.toml").read_text()
    record = json.loads((ck / "meta.json").read_text())["generator"]
    assert record["tokenizer"]["sha256"] == sha and record["tokenizer"]["weights"] == str(tok_weights.resolve())
    assert record["class_names"] == ["a", "b"] and record["layout"]["grid"] == [4, 4]
    # train.lr_schedule = "linear": peak 3e-3 after 2 warm-up steps, down to min_lr_ratio 0.1 at step 6
    lr = {h["step"]: h["lr"] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
          if h.get("split") == "train"}
    assert lr[2] == pytest.approx(3e-3) and lr[3] == pytest.approx(3e-3 * 0.775) and lr[6] == pytest.approx(3e-4)


def test_load_generator_gives_the_ema_generator_bound_to_the_tokenizer(finished_run):
    out, metrics = finished_run
    run = load_generator_run(out, device="cpu")
    ema = load_tensors(latest_checkpoint(out) / "generator_ema.safetensors")
    state = run.generator.state_dict()
    assert all(torch.equal(state[k], ema[k].to(state[k].dtype)) for k in ema)
    assert not run.generator.training and run.class_names == ("a", "b") and run.sample.top_k == 4
    with torch.no_grad():
        tokens = run.generator.sample(3, torch.tensor([0, 1, 0]), top_k=1)
        images = run.decode(tokens)
    assert tokens.shape == (3, 16, 1) and images.shape == (3, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    raw, _ = load_generator(out, device="cpu", use_ema=False)
    plain = load_tensors(latest_checkpoint(out) / "generator.safetensors")
    assert all(torch.equal(raw.state_dict()[k], plain[k]) for k in plain)


def test_sigterm_stop_and_resume_ends_with_the_same_weights(finished_run, tokenizer_run, tmp_path, monkeypatch, capsys):
    expected = _weights(finished_run[0])
    data, tok = tokenizer_run
    run = tmp_path / "gen.toml"
    run.write_text(generator_run(data, tok, tmp_path / "out"))
    original = Trainer._step

    def stop_before_step_4(self, micro):
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_step", stop_before_step_4)
    with pytest.raises(RunInterrupted):
        Engine(Registry.from_toml(run)).fit()
    monkeypatch.setattr(Trainer, "_step", original)
    Engine(Registry.from_toml(run)).fit()  # the same command again
    assert "(step 4)" in "".join(capsys.readouterr())
    got = _weights(tmp_path / "out")
    for stem in expected:
        different = [k for k in expected[stem] if not torch.equal(expected[stem][k], got[stem][k])]
        assert not different, f"{stem}: {different[:5]}"


def test_training_lowers_the_token_cross_entropy(tokenizer_run, tmp_path):
    """Many steps on the same 9 images: the generator must fit their tokens (the loss really trains it)."""
    data, tok = tokenizer_run
    run = tmp_path / "gen.toml"
    run.write_text(generator_run(data, tok, tmp_path / "out", steps=40, eval_every=40, checkpoint_every=40))
    reg = Registry.from_toml(run, overrides=["eval.grid_images=0", "train.ema_decay=0.0"])
    Engine(reg).fit()
    trained = load_generator_run(tmp_path / "out", device="cpu")
    images = torch.stack([trained.tokenizer.preprocess(p) for p in sorted(data.rglob("*.png"))])
    tokens = trained.tokenizer.encode(images, as_sequence=True)
    labels = torch.tensor([0 if p.parent.name == "a" else 1 for p in sorted(data.rglob("*.png"))])
    fresh = Registry.from_toml(run).config.generator.build()
    fresh.bind(trained.layout, None, 2)
    with torch.no_grad():
        before = token_cross_entropy(fresh.eval()(tokens, labels).logits, tokens)
        after = token_cross_entropy(trained.generator(tokens, labels).logits, tokens)
    assert after < before - 0.3, (before, after)


def test_resuming_with_other_tokenizer_weights_is_refused(finished_run, tokenizer_run, tmp_path):
    out, _ = finished_run
    data, tok = tokenizer_run
    changed = tmp_path / "tok"
    shutil.copytree(tok, changed)
    weights = latest_checkpoint(changed) / "ema.safetensors"
    tensors = load_tensors(weights)
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights))
    run = tmp_path / "gen.toml"
    run.write_text(generator_run(data, changed, out, steps=STEPS + 1))
    with pytest.raises(CheckpointError, match="sha256 .* resuming would train on other tokens"):
        Engine(Registry.from_toml(run)).fit()


# -- run-file validation -----------------------------------------------------------------------------------------
def _generator_dict(tokenizer: Path | str, **tables: object) -> dict:
    data = {"tokenizer": {"run": str(tokenizer)}, "generator": {"use": "kit-tiny-ar"},
            "data": {"use": "sample", "resolution": 32}}
    data.update(tables)
    return data


def test_generator_run_kind_and_defaults(tokenizer_run):
    reg = Registry.from_dict(_generator_dict(tokenizer_run[1]))
    assert reg.config.kind == "generator" and reg.config.sample is not None and reg.config.sample.cfg_scale == 1.0
    assert "[sample]" in reg.to_toml() and "[tokenizer]" in reg.to_toml()


def test_missing_tokenizer_run_is_refused_naming_key_and_path(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(_generator_dict(missing))
    assert "tokenizer.run: no tokenizer run at" in str(err.value) and str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="tokenizer.run: .* holds no tokenizer checkpoint"):
        Registry.from_dict(_generator_dict(empty))


def test_generator_run_needs_a_tokenizer_table_and_no_tokenizer_tables(tokenizer_run):
    with pytest.raises(ConfigError, match=r"tokenizer: a generator run needs its frozen tokenizer"):
        Registry.from_dict({"generator": {"use": "kit-tiny-ar"}, "data": "sample"})
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(_generator_dict(tokenizer_run[1], quantizer={"use": "vq", "dim": 4},
                                           discriminators=[{"use": "patchgan"}], loss={"perceptual": 0.0}))
    text = str(err.value)
    assert "loss: a generator run trains with the token cross entropy only" in text
    assert "quantizer: a generator run (it has a [generator] table) trains no tokenizer" in text
    assert "discriminators: a generator run" in text


def test_tokenizer_and_sample_tables_belong_to_generator_runs(tokenizer_run):
    data = {"data": {"use": "sample", "resolution": 32}, "encoder": {"use": "cnn", "out_dim": 8},
            "quantizer": {"use": "vq", "codebook_size": 16, "dim": 8}, "decoder": {"use": "cnn", "in_dim": 8},
            "tokenizer": {"run": str(tokenizer_run[1])}, "sample": {"top_k": 1}}
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(data)
    assert "tokenizer: only a generator run" in str(err.value) and "sample: only a generator run" in str(err.value)


def test_data_resolution_the_tokenizer_cannot_take_fails_before_the_run_folder(tokenizer_run, tmp_path):
    data, tok = tokenizer_run
    run = tmp_path / "gen.toml"
    run.write_text(generator_run(data, tok, tmp_path / "out").replace("resolution = 16", "resolution = 18"))
    with pytest.raises(ConfigError, match="data.resolution"):
        Engine(Registry.from_toml(run)).fit()
    assert not (tmp_path / "out").exists()


def test_generator_run_from_a_token_folder_checks_its_tokenizer(tokenizer_run, tmp_path):
    """[data] use = "tokens": the folder's layout and classes are used; tokens of another tokenizer are refused."""
    from xqgan_core.tokenize_dataset import tokenize

    data, tok = tokenizer_run
    tokenize(str(tok), tmp_path / "tokens", data=str(data), workers=0, device="cpu", progress=False, flip=True)
    text = generator_run(data, tok, tmp_path / "out", steps=2, eval_every=2).replace(
        f'use = "folder"\nroot = "{data}"\nresolution = 16\nholdout = 0.25',
        f'use = "tokens"\npath = "{tmp_path / "tokens"}"\nholdout = 0.25')
    assert 'use = "tokens"' in text
    (tmp_path / "gen.toml").write_text(text)
    metrics = Engine(Registry.from_toml(tmp_path / "gen.toml")).fit()
    assert metrics["items"] == 3 and 0 <= metrics["acc"] <= 1
    run = load_generator_run(tmp_path / "out", device="cpu")
    assert run.class_names == ("a", "b") and run.layout.length == 16

    other = tmp_path / "other-tok"  # same architecture, other weights: the token folder is not its tokens
    (tmp_path / "other.toml").write_text(TOKENIZER_RUN.format(out=other, data=data).replace("steps = 2", "steps = 1"))
    Engine(Registry.from_toml(tmp_path / "other.toml")).fit()
    (tmp_path / "gen2.toml").write_text(text.replace(f'run = "{tok}"', f'run = "{other}"').replace(
        str(tmp_path / "out"), str(tmp_path / "out2")))
    with pytest.raises(ConfigError, match="data.path"):
        Engine(Registry.from_toml(tmp_path / "gen2.toml")).fit()
    assert not (tmp_path / "out2").exists()


def test_two_rank_ddp_run_ends_with_the_same_generator_on_every_rank(tokenizer_run, tmp_path):
    from test_ddp import torchrun

    data, tok = tokenizer_run
    run = tmp_path / "gen.toml"
    run.write_text(generator_run(data, tok, tmp_path / "out", steps=3, eval_every=3, checkpoint_every=3))
    res = torchrun(tmp_path, run, tmp_path / "weights")
    assert res.returncode == 0, res.stdout + res.stderr
    for part in ("generator", "generator_ema"):
        rank0, rank1 = (load_tensors(tmp_path / "weights" / f"rank{r}-{part}.safetensors") for r in (0, 1))
        assert set(rank0) == set(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0), part
    assert "x2" in res.stdout + res.stderr  # the header: "device cpu x2"


def test_a_pinned_tokenizer_sha256_refuses_other_weights(tokenizer_run, tmp_path):
    data, tok = tokenizer_run
    run = tmp_path / "gen.toml"
    run.write_text(generator_run(data, tok, tmp_path / "out"))
    with pytest.raises(CheckpointError, match="tokenizer.sha256: the weights .* have sha256 .* but the run pins 0+"):
        Engine(Registry.from_toml(run, overrides=[f'tokenizer.sha256="{"0" * 64}"'])).fit()
    assert not (tmp_path / "out").exists()


def test_weight_decay_spares_what_the_generator_lists(tokenizer_run):
    """AdamW decays matrices and tables, except biases / norm gains and the generator's ``no_weight_decay()``
    (VAR: position and level embeddings, attention scales); a name the generator does not have is refused."""
    from xqgan_core.generator_task import decay_groups
    from xqgan_core.registry import build
    from xqgan_core.tokenizer import Tokenizer

    layout = Tokenizer.from_checkpoint(tokenizer_run[1], device="cpu").token_layout
    gen = build("generator", {"use": "kit-tiny-ar", "width": 16, "depth": 1, "heads": 2})
    gen.bind(layout, None, 2)
    names = {id(p): n for n, p in gen.named_parameters()}
    decayed = lambda groups: {names[id(p)] for p in groups[0]["params"]}  # noqa: E731
    default = decayed(decay_groups(gen, 0.05))
    assert "pos" in default and not any(n.endswith("bias") for n in default)
    gen.no_weight_decay = lambda: {"pos"}  # type: ignore[method-assign]
    groups = decay_groups(gen, 0.05)
    assert "pos" not in decayed(groups) and "class_embed.weight" in decayed(groups)
    assert {names[id(p)] for p in groups[1]["params"]} >= {"pos"} and groups[1]["weight_decay"] == 0.0
    gen.no_weight_decay = lambda: {"pos_embed"}  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="pos_embed"):
        decay_groups(gen, 0.05)

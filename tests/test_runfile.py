"""Run-file validation: strict types, every error at once with its key path, nothing written on failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from third_party_fixtures import env_with

from xqgan_core import ConfigError, Registry, build
from xqgan_core.registry import apply_overrides

GOOD = """
[run]
name = "t"
out_dir = "out/{name}"

[encoder]
use = "patch"
out_dim = 4

[quantizer]
use = "nested"
scale = 2
[quantizer.inner]
use = "tinyq"
codebook_size = 32
dim = 4

[decoder]
use = "patch"
in_dim = 4

[train]
steps = 10
betas = [0.9, 0.99]
"""


@pytest.fixture
def plugins(third_party_sites, on_path):
    on_path(third_party_sites["main"])
    return third_party_sites["main"]


def cli(args, site, cwd):
    return subprocess.run([sys.executable, "-m", "xqgan_core.cli", *args], env=env_with(site), cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_good_file_resolves_nested_components(plugins, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(GOOD)
    reg = Registry.from_toml(path)
    assert reg.config.quantizer.use == "nested"
    assert reg.config.quantizer.config.scale == 2.0 and isinstance(reg.config.quantizer.config.scale, float)
    assert reg.config.quantizer.config.inner.config.codebook_size == 32
    assert reg.config.train.betas == (0.9, 0.99)
    q = reg.build("quantizer")
    assert q.inner.codebook_size == 32
    paths = [p for p, _ in reg.components()]
    assert paths == ["encoder", "quantizer", "quantizer.inner", "decoder"]
    prov = reg.provenance()
    assert prov["quantizer.inner"] == {"use": "tinyq", "distribution": "xqgan-plugin-tinyq", "version": "0.0.1"}


def test_resolved_toml_round_trips(plugins, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(GOOD)
    reg = Registry.from_toml(path)
    again = tmp_path / "resolved.toml"
    again.write_text(reg.to_toml(with_provenance=True))
    assert Registry.from_toml(again).config == reg.config


def test_misspelt_key_wrong_type_and_unknown_component_reported_together(plugins, tmp_path):
    bad = GOOD.replace("scale = 2", "scael = 2").replace("steps = 10", 'steps = "10"').replace(
        'use = "patch"\nout_dim', 'use = "pacth"\nout_dim'
    )
    path = tmp_path / "run.toml"
    path.write_text(bad)
    before = sorted(os.listdir(tmp_path))
    res = cli([str(path)], plugins, tmp_path)  # the training command itself, not just `validate`
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert "quantizer.scael: unknown option. Did you mean 'scale'?" in err
    assert "train.steps: expected an integer, got str '10'" in err
    assert "encoder.use: no encoder named 'pacth'. Did you mean 'patch'?" in err
    assert "3 problem(s)" in err
    assert sorted(os.listdir(tmp_path)) == before, "nothing may be created when the run file is invalid"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.steps", "3.7", "expected an integer, got float 3.7"),
        ("train.steps", '"16"', "expected an integer, got str '16'"),
        ("train.channels_last", '"no"', "expected a boolean (true/false), got str 'no'"),
        ("train.channels_last", "1", "expected a boolean (true/false), got int 1"),
        ("train.steps", "true", "expected an integer, got bool True"),
        ("train.lr", '"1e-4"', "expected a number, got str '1e-4'"),
        ("train.precision", '"fp8"', "must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ("train.steps", "0", "must be > 0, got 0"),
        ("train.betas", '"0.9"', "expected an array"),
        ("quantizer.inner.codebook_size", "-1", "must be > 0, got -1"),
    ],
)
def test_strict_types(plugins, key, value, message):
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(_parse(GOOD), overrides=[f"{key}={value}"])
    assert f"{key}: {message}" in str(err.value)


def test_int_accepted_for_float(plugins):
    reg = Registry.from_dict(_parse(GOOD), overrides=["train.lr=1"])
    assert reg.config.train.lr == 1.0 and isinstance(reg.config.train.lr, float)


def test_unknown_section_and_missing_parts(plugins):
    data = _parse(GOOD)
    data["trian"] = {"steps": 3}
    del data["decoder"]
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(data)
    assert "trian: unknown option. Did you mean 'train'?" in str(err.value)
    data.pop("trian")
    with pytest.raises(ConfigError, match=r"missing \[decoder\]"):
        Registry.from_dict(data)


def test_component_table_must_name_use(plugins):
    with pytest.raises(ConfigError, match=r"quantizer.use: missing or not a string; pick a quantizer \(.*tinyq"):
        build("quantizer", {"codebook_size": 4})


def test_overrides_parse_toml_values_and_bare_words():
    data = apply_overrides({"quantizer": {"use": "a"}}, ["quantizer.use=vq", "quantizer.size=16", "train.betas=[0.9, 0.95]",
                                                         "x.flag=true", "x.name=\"s\""])
    assert data == {"quantizer": {"use": "vq", "size": 16}, "train": {"betas": [0.9, 0.95]}, "x": {"flag": True, "name": "s"}}
    data = apply_overrides({"discriminators": [{"use": "a"}]}, ["discriminators[0].ndf=32"])
    assert data["discriminators"][0]["ndf"] == 32
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ConfigError, match="has no element"):
        apply_overrides({}, ["discriminators[3].ndf=1"])


def test_set_on_command_line(plugins, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(GOOD)
    res = cli(["validate", str(path), "--set", "quantizer.inner.codebook_size=8192"], plugins, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "codebook_size = 8192" in res.stdout


def test_unreadable_and_malformed_run_files_exit_2(plugins, tmp_path):
    res = cli(["validate", str(tmp_path / "nope.toml")], plugins, tmp_path)
    assert res.returncode == 2 and "cannot read run file" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[quantizer\nuse = 1")
    res = cli([str(bad)], plugins, tmp_path)
    assert res.returncode == 2 and "not valid TOML" in res.stderr
    res = cli(["describe", "quantizer"], plugins, tmp_path)
    assert res.returncode == 2


def test_describe_shows_types_defaults_and_help(plugins, tmp_path):
    res = cli(["describe", "quantizer", "nested"], plugins, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "inner" in res.stdout and "quantizer table" in res.stdout
    assert "scale" in res.stdout and "float" in res.stdout and "Multiplier applied" in res.stdout


def test_list_plugins_imports_no_torch(tmp_path):
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "xqgan_core.cli", "--list-plugins"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    imported = [line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")]
    assert "xqgan_core.catalog" in imported  # the measurement itself works
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
    assert "xqgan-core" in res.stdout


def _parse(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


# ----------------------------------------------------------------------------------------------------------------
# checks made at validation time, with the first-party plugins (nothing is built)

_CNN = {"use": "cnn", "channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 8}  # 4x


def _tokenizer_run(**tables: object) -> dict:
    data = {
        "data": {"use": "sample", "resolution": 32},
        "encoder": {**_CNN, "out_dim": 8},
        "quantizer": {"use": "vq", "codebook_size": 16, "dim": 8},
        "decoder": {**_CNN, "in_dim": 8},
    }
    data.update(tables)
    return data


def test_first_party_tokenizer_run_validates() -> None:
    reg = Registry.from_dict(_tokenizer_run())  # the base of the tests below is itself valid
    assert reg.config.encoder.config.out_dim == 8


def test_latent_dims_must_match_the_quantizer() -> None:
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(_tokenizer_run(), overrides=["quantizer.dim=16"])
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "encoder.out_dim: the encoder produces 8-channel latents but quantizer 'vq' works on 16-dimensional codes; set encoder.out_dim = 16" in text
    assert "decoder.in_dim: the decoder reads 8-channel latents" in text and "set decoder.in_dim = 16" in text
    with pytest.raises(ConfigError, match=r"decoder.in_dim: the decoder reads 4-channel"):
        Registry.from_dict(_tokenizer_run(), overrides=["decoder.in_dim=4"])


def test_resolution_must_fit_the_encoder_and_ssim() -> None:
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(_tokenizer_run(), overrides=["data.resolution=30"])
    assert ("data.resolution: 30 is not divisible by 4, the downsampling factor of encoder 'cnn' "
            "(the token grid would not be whole); use a multiple of 4, e.g. 28 or 32") in str(err.value)
    with pytest.raises(ConfigError) as err:
        Registry.from_dict(_tokenizer_run(), overrides=["data.resolution=8"])
    assert "data.resolution: 8 px is smaller than 11 px, the smallest image evaluation's SSIM accepts" in str(err.value)
    assert "divisible" not in str(err.value)
    Registry.from_dict(_tokenizer_run(), overrides=["data.resolution=12"])  # 12 = 3 x 4 tokens, >= 11: fine


def test_set_reaches_inside_short_form_components() -> None:
    data = _tokenizer_run(discriminators=["patchgan"], quantizer="vq")
    data["encoder"]["out_dim"] = data["decoder"]["in_dim"] = 8  # vq's default dim
    reg = Registry.from_dict(data, overrides=["discriminators[0].ndf=32", "quantizer.codebook_size=64"])
    assert reg.config.discriminators[0].use == "patchgan" and reg.config.discriminators[0].config.ndf == 32
    assert reg.config.quantizer.use == "vq" and reg.config.quantizer.config.codebook_size == 64
    with pytest.raises(ConfigError, match=r"'discriminators\[0\]' is not a table"):
        apply_overrides({"discriminators": [3]}, ["discriminators[0].ndf=32"])


def test_run_file_that_is_not_utf8_names_file_and_byte(tmp_path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        Registry.from_toml(path)
    assert str(path) in str(err.value)
    assert "not UTF-8 text: byte 0xe9 at byte position 17" in str(err.value)
    res = subprocess.run([sys.executable, "-m", "xqgan_core.cli", "validate", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "byte position 17" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 10000 + "]" * 10000,  # nested arrays
        "a = " + "{b = " * 10000 + "1" + "}" * 10000,  # nested inline tables
        "[" + ".".join(["t"] * 10000) + "]\nx = 1",  # a 10000-level table header
        "a = " + "[" * 100 + "]" * 100,  # parses fine, still far deeper than any run file
    ],
)
def test_absurd_nesting_is_a_config_error(tmp_path, text) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested"):
        Registry.from_toml(path)


def test_absurd_nesting_from_python_and_overrides_is_a_config_error() -> None:
    deep: dict = {}
    node = deep
    for _ in range(10000):
        node["t"] = {}
        node = node["t"]
    with pytest.raises(ConfigError, match=r"t: tables / arrays nested more than 64 levels deep"):
        Registry.from_dict({"t": deep})
    with pytest.raises(ConfigError, match="nested"):
        Registry.from_dict(_tokenizer_run(), overrides=["x.y=" + "[" * 10000 + "]" * 10000])


@pytest.mark.parametrize("value", ["0", "-2"])
def test_eval_rejects_a_batch_size_below_one(tmp_path, value) -> None:
    res = subprocess.run([sys.executable, "-m", "xqgan_core.cli", "eval", str(tmp_path / "ckpt"), "--data",
                          str(tmp_path), "--batch-size", value], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    assert f"argument --batch-size: must be at least 1, got {value}" in res.stderr

"""A third-party plugin, built and pip-installed by the test, works exactly like a first-party one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from third_party_fixtures import env_with

from xqgan_core import build
from xqgan_core.errors import AmbiguousPluginError, ConfigError, PluginAPIError, PluginLoadError

CLI = [sys.executable, "-m", "xqgan_core.cli"]
TINY_RUN = '[encoder]\nuse = "patch"\n[quantizer]\nuse = "tinyq"\ncodebook_size = 32\n[decoder]\nuse = "patch"\n'


def run_cli(args: list[str], *sites: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, env=env_with(*sites), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_listed_with_distribution_and_version(third_party_sites):
    res = run_cli(["--list-plugins", "--json"], third_party_sites["main"])
    assert res.returncode == 0, res.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(res.stdout)}
    tiny = rows[("quantizer", "tinyq")]
    assert tiny["distribution"] == "xqgan-plugin-tinyq" and tiny["version"] == "0.0.1"
    assert tiny["target"] == "xqgan_plugin_tinyq.quantizer:TinyQuantizer"
    # listing does not import plugins: the broken one is listed without error
    assert ("quantizer", "broken") in rows


def test_check_marks_failures_and_exits_1(third_party_sites):
    res = run_cli(["--list-plugins", "--check", "--json"], third_party_sites["main"])
    assert res.returncode == 1
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["tinyq"]["status"] == "ok"
    assert "missing_dependency_xyz" in rows["broken"]["status"]
    assert "xqgan-plugin-broken 0.0.1" in rows["broken"]["status"]
    assert "upgrade xqgan-plugin-broken" in rows["oldapi"]["status"]


def test_build_and_validate(third_party_sites, on_path, tmp_path):
    on_path(third_party_sites["main"])
    q = build("quantizer", {"use": "tinyq", "codebook_size": 8, "dim": 3})
    assert q.codebook_size == 8 and q.codes.shape == (8, 3)
    run_file = tmp_path / "run.toml"
    run_file.write_text(TINY_RUN)
    res = run_cli(["validate", str(run_file)], third_party_sites["main"])
    assert res.returncode == 0, res.stderr
    assert "codebook_size = 32" in res.stdout and 'package = "xqgan-plugin-tinyq"' in res.stdout


def test_passes_the_contract_kit(third_party_sites, tmp_path):
    """What a plugin author writes: subclass the contract, run pytest."""
    test_file = tmp_path / "test_tinyq_contract.py"
    test_file.write_text(textwrap.dedent(
        """
        from xqgan_core.testing import DecoderContract, EncoderContract, QuantizerContract

        class TestTinyQ(QuantizerContract):
            name = "tinyq"
            options = {"codebook_size": 16, "dim": 4}

        class TestPatchEncoder(EncoderContract):
            name = "patch"

        class TestPatchDecoder(DecoderContract):
            name = "patch"
        """
    ))
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        env=env_with(third_party_sites["main"]), capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_same_name_from_two_distributions_is_ambiguous(third_party_sites, on_path):
    on_path(third_party_sites["main"], third_party_sites["dupe"])
    with pytest.raises(ConfigError) as err:
        build("quantizer", {"use": "tinyq"})
    msg = str(err.value)
    assert "xqgan-plugin-tinyq" in msg and "xqgan-plugin-tinyq-fork" in msg and 'package = "' in msg
    # pinning resolves it
    q = build("quantizer", {"use": "tinyq", "package": "xqgan-plugin-tinyq-fork", "dim": 2})
    assert type(q).__module__ == "xqgan_plugin_tinyq_fork.quantizer"


def test_ambiguity_error_type(third_party_sites, on_path):
    from xqgan_core.catalog import catalog

    on_path(third_party_sites["main"], third_party_sites["dupe"])
    with pytest.raises(AmbiguousPluginError):
        catalog().resolve("quantizer", "tinyq")


def test_broken_plugin_fails_only_when_selected(third_party_sites, on_path):
    from xqgan_core.catalog import catalog

    on_path(third_party_sites["main"])
    build("quantizer", {"use": "tinyq"})  # unaffected by its broken neighbour
    with pytest.raises(PluginLoadError) as err:
        catalog().resolve("quantizer", "broken").load()
    msg = str(err.value)
    assert "xqgan-plugin-broken" in msg and "0.0.1" in msg and "missing_dependency_xyz" in msg
    with pytest.raises(PluginAPIError, match="upgrade xqgan-plugin-broken"):
        catalog().resolve("quantizer", "oldapi").load()


def test_broken_plugin_selected_in_run_file_exits_2(third_party_sites, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text('[quantizer]\nuse = "broken"\n')
    res = run_cli(["validate", str(run_file)], third_party_sites["main"])
    assert res.returncode == 2
    assert "quantizer.use" in res.stderr and "missing_dependency_xyz" in res.stderr

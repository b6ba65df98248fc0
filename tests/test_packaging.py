"""Package metadata as a user installs it: safe torch, and every distribution a plugin's defaults need declared.

Read from the source tree's pyproject.toml files (what a wheel is built from), not from the installed metadata
of the editable installs, which is only refreshed when the environment is rebuilt.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from xqgan_core import catalog
from xqgan_core.config import KIND

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]


def _project(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))["project"]


def _requirement_names(project: dict[str, Any]) -> set[str]:
    return {_norm(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in project.get("dependencies", [])}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: p.parent.name)
def test_torch_is_at_least_2_6(path: Path) -> None:
    """torch.load(weights_only=True), which every checkpoint load relies on, is only safe from 2.6 (CVE-2025-32434)."""
    torch_reqs = [r for r in _project(path)["dependencies"] if _norm(re.split(r"[\s<>=!~;]", r, maxsplit=1)[0]) == "torch"]
    assert len(torch_reqs) == 1, torch_reqs
    match = re.search(r">=\s*(\d+)\.(\d+)", torch_reqs[0])
    assert match and (int(match[1]), int(match[2])) >= (2, 6), torch_reqs[0]


def _default_tables(config_cls: type) -> list[tuple[str, str]]:
    """(option path, component kind) -> name of every nested component a Config selects by default."""
    found = []
    for f in attrs.fields(config_cls):
        kind = f.metadata.get(KIND)
        default = f.default
        if kind and isinstance(default, dict) and "use" in default:
            found.append((kind, default["use"]))
        elif kind and hasattr(default, "use") and hasattr(default, "kind"):  # a validated spec as the default
            found.append((default.kind, default.use))
    return found


PLUGIN_PYPROJECTS = [p for p in PYPROJECTS if p.parent.parent.name == "plugins"]


@pytest.mark.parametrize("path", PLUGIN_PYPROJECTS, ids=lambda p: p.parent.name)
def test_defaults_need_only_declared_distributions(path: Path) -> None:
    """`pip install <plugin>` alone must give working defaults: a default inner `vq` needs xqgan-plugin-vq."""
    project = _project(path)
    own = _norm(project["name"])
    declared = _requirement_names(project) | {own}
    cat = catalog()
    needed: dict[str, str] = {}
    for group, entries in project.get("entry-points", {}).items():
        kind = group.removeprefix("xqgan.")
        for name in entries:
            cls = cat.resolve(kind, name, own).load()
            for inner_kind, inner in _default_tables(cls.Config):
                offering = {_norm(e.distribution) for e in cat.of_kind(inner_kind) if e.name == inner}
                needed[f"{kind} '{name}': default {inner_kind} '{inner}'"] = " or ".join(sorted(offering))
                assert offering & declared, (
                    f"{project['name']}: {kind} '{name}' defaults to {inner_kind} '{inner}' (offered by "
                    f"{', '.join(sorted(offering))}) but its dependencies are {sorted(declared - {own})}"
                )
    if own in {"xqgan-plugin-rq", "xqgan-plugin-msrq", "xqgan-plugin-pq"}:
        assert needed, "the wrappers default to an inner quantizer; none was found (the check would be vacuous)"

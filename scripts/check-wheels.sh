#!/usr/bin/env bash
# Checks the distributions as a user installs them, not as the editable dev install sees them (which hides missing
# package files and stale entry points):
#   1. builds a wheel of the core and of every plugin (pip wheel --no-deps --no-build-isolation);
#   2. checks that every tracked file of each package (.py or not) is inside its wheel;
#   3. installs the wheels (not editable) into a clean venv, next to the pinned torch and the runtime deps:
#      first one multi-level plugin alone, which must pull in the inner quantizer its default needs, then the rest;
#   4. from that venv, outside the source tree and offline: `xqgan-run --list-plugins --check` and 3 steps of the
#      default run (registry.toml).
# Usage: scripts/check-wheels.sh   (PYTHON=python3.x to pick the interpreter; KEEP=1 keeps the work folder)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d -t xqgan-wheels-XXXX)
if [ "${KEEP:-0}" = 1 ]; then echo "work folder: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
WHEELS=$WORK/wheels
VENV=$WORK/venv
say() { printf '== check-wheels: %s (%ds)\n' "$1" "$SECONDS"; }

say "clean venv with the pinned torch and the runtime dependencies"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first, pinned (never let a plugin's loose torch>=2.6 pull another build)
"${PIP[@]}" install -q -r requirements/torch.txt
"${PIP[@]}" install -q -r requirements/dev.txt

say "building wheels"
DISTS=(. plugins/*/)
"${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$WHEELS" "${DISTS[@]}"

say "every tracked package file is in its wheel"
"$VENV/bin/python" - "$WHEELS" "${DISTS[@]}" <<'EOF'
import subprocess, sys, zipfile
from pathlib import Path

wheels, dists = Path(sys.argv[1]), sys.argv[2:]
shipped = set()
for wheel in wheels.glob("*.whl"):
    shipped |= set(zipfile.ZipFile(wheel).namelist())
missing = []
for dist in dists:
    src = Path(dist) / "src" if (Path(dist) / "src").is_dir() else Path(dist)
    packages = ["xqgan_core"] if src == Path(".") else [p.name for p in src.iterdir() if p.is_dir() and not p.name.endswith(".egg-info")]
    for package in packages:
        tracked = subprocess.run(["git", "ls-files", "--", str(src / package)], capture_output=True, text=True, check=True)
        for name in tracked.stdout.split():
            inside = Path(name).relative_to(src).as_posix()
            if inside not in shipped:
                missing.append(name)
if missing:
    sys.exit("files missing from the wheels (add them as package data):\n  " + "\n  ".join(missing))
print(f"{len(list(wheels.glob('*.whl')))} wheels, all tracked package files shipped")
EOF

say "installing the wheels (not editable)"
# --no-index: the xqgan distributions come from the wheels just built, their dependencies from what is installed
# (or the local wheel folders of pip's configuration); a missing declared dependency fails here.
"${PIP[@]}" install -q --no-index --find-links "$WHEELS" xqgan-plugin-msrq
RUN=$WORK/run
mkdir -p "$RUN/torch_home"
export HF_HUB_OFFLINE=1 XQGAN_OFFLINE=1 TORCH_HOME=$RUN/torch_home
# the default of msrq (inner vq) must work with nothing but msrq and what it declares
(cd "$RUN" && "$VENV/bin/python" -c "
from xqgan_core import build
q = build('quantizer', {'use': 'msrq'})
print('msrq alone builds its default inner quantizer:', type(q.code).__name__)
")
"${PIP[@]}" install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl

say "the installed wheels, outside the source tree"
cd "$RUN"
"$VENV/bin/python" -c "
import xqgan_core, sys
assert '/site-packages/' in xqgan_core.__file__, f'xqgan_core imported from {xqgan_core.__file__}, not the installed wheel'
"
"$VENV/bin/xqgan-run" --list-plugins --check
"$VENV/bin/xqgan-run" "$ROOT/registry.toml" --set run.out_dir="$RUN/out" --set train.steps=3 \
  --set train.checkpoint_every=3 --set train.eval_every=3 --set train.log_every=1 --set train.warmup_steps=1 \
  --set eval.max_images=4 --set eval.batch_size=4 --set eval.grid_images=4
test -f "$RUN/out/checkpoints/step-00000003/meta.json" || { echo "check-wheels: no checkpoint of step 3" >&2; exit 1; }
say "ok"

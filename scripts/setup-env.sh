#!/usr/bin/env bash
# Creates (or updates) .venv with the pinned CPU/CUDA torch build, the core and every first-party plugin.
# Idempotent: a stamp keyed on the requirement files skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp_src=$(cat requirements/*.txt pyproject.toml plugins/*/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.xqgan-stamp" ] && [ "$(cat "$VENV/.xqgan-stamp")" = "$stamp_src" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first, pinned: these builds lie on local disk here; never install torch-family packages unpinned.
"${PIP[@]}" -r requirements/torch.txt
"${PIP[@]}" -r requirements/dev.txt
# the core and each plugin, editable; --no-deps so nothing can pull another torch build
"${PIP[@]}" --no-build-isolation --no-deps -e .
for p in plugins/*/; do
  "${PIP[@]}" --no-build-isolation --no-deps -e "$p"
done
echo "$stamp_src" > "$VENV/.xqgan-stamp"

#!/usr/bin/env bash
# Runs the whole test suite (core + every plugin) offline, with a throw-away TORCH_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
TORCH_HOME=$(mktemp -d -t xqgan-torch-home-XXXX)
export TORCH_HOME
trap 'rm -rf "$TORCH_HOME"' EXIT
.venv/bin/xqgan-run --list-plugins --check
exec .venv/bin/python -m pytest -q "$@"

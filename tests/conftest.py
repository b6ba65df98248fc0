"""Core test setup: an offline hub and a throw-away TORCH_HOME for every test, as CI runs them."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="xqgan-torch-home-"))

pytest_plugins = ["xqgan_core.testing.fixtures", "third_party_fixtures"]

"""xqgan core: interfaces, plugin catalog, run files, engine and CLI for discrete image tokenizers.

Names are imported lazily so that ``import xqgan_core`` (and ``xqgan-run --list-plugins``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .catalog import KINDS, PLUGIN_API, catalog
from .config import ComponentSpec, at_least, between, component, config, each, non_empty, option, positive, section
from .errors import (
    AmbiguousPluginError,
    CheckpointError,
    ConfigError,
    ImageReadError,
    NoReadableImageError,
    PluginAPIError,
    PluginError,
    PluginLoadError,
    PluginNotFoundError,
    RunInterrupted,
    TrainingError,
    XQGanError,
)
from .registry import Registry, build

_LAZY = {
    # torch-dependent names, resolved on first access
    "Engine": "xqgan_core.engine",
    "Tokenizer": "xqgan_core.tokenizer",
    "QuantOut": "xqgan_core.interfaces",
    "Encoder": "xqgan_core.interfaces",
    "Decoder": "xqgan_core.interfaces",
    "Quantizer": "xqgan_core.interfaces",
    "Discriminator": "xqgan_core.interfaces",
    "Aligner": "xqgan_core.interfaces",
    "Generator": "xqgan_core.interfaces",
    "GeneratorOut": "xqgan_core.interfaces",
    "Adapter": "xqgan_core.interfaces",
    "Device": "xqgan_core.interfaces",
    "DataSource": "xqgan_core.interfaces",
    "MultiLevelQuantizer": "xqgan_core.multilevel",
    "TokenLayout": "xqgan_core.token_layout",
    "Task": "xqgan_core.task",
    "Runtime": "xqgan_core.task",
    "Trainer": "xqgan_core.trainer",
    "TokenizerTask": "xqgan_core.tokenizer_task",
    "GeneratorTask": "xqgan_core.generator_task",
    "hookimpl": "xqgan_core.hooks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xqgan_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "KINDS",
    "PLUGIN_API",
    "AmbiguousPluginError",
    "CheckpointError",
    "ComponentSpec",
    "ConfigError",
    "ImageReadError",
    "NoReadableImageError",
    "PluginAPIError",
    "PluginError",
    "PluginLoadError",
    "PluginNotFoundError",
    "Registry",
    "RunInterrupted",
    "TrainingError",
    "XQGanError",
    "at_least",
    "between",
    "build",
    "catalog",
    "component",
    "config",
    "each",
    "non_empty",
    "option",
    "positive",
    "section",
    *_LAZY,
]

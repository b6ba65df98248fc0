"""The plugin test kit: contract tests a component author subclasses (an opt-in pytest plugin).

In a plugin's ``tests/test_contract.py``::

    from xqgan_core.testing import QuantizerContract

    class TestMyQuantizer(QuantizerContract):
        name = "myq"                       # the entry-point name
        options = {"codebook_size": 64, "dim": 8}

Every ``test_*`` method below then runs against the installed entry point: discovery, option validation,
and the behaviour every engine and generator relies on. Override ``example_input`` for unusual shapes.
Enable the kit's fixtures with ``pytest_plugins = ["xqgan_core.testing"]`` in a ``conftest.py`` (optional:
the contract classes work without it).
"""

from __future__ import annotations

from .aligners import AlignerContract, TinyTeacher
from .contracts import (
    ComponentContract,
    DecoderContract,
    DiscriminatorContract,
    EncoderContract,
    FrozenPartsContract,
    ModuleContract,
    QuantizerContract,
    TINY_VQ,
    tiny_quantizer,
)
from .fixtures import offline_env, tmp_torch_home
from .generator_contract import GeneratorContract
from .tiny_generator import TinyARGenerator

__all__ = [
    "AlignerContract",
    "TinyTeacher",
    "ComponentContract",
    "DecoderContract",
    "DiscriminatorContract",
    "EncoderContract",
    "FrozenPartsContract",
    "GeneratorContract",
    "TinyARGenerator",
    "ModuleContract",
    "QuantizerContract",
    "TINY_VQ",
    "tiny_quantizer",
    "offline_env",
    "tmp_torch_home",
]

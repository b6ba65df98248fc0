"""load_into: keys a component declares optional may be absent from older checkpoints; nothing else may."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from xqgan_core import CheckpointError, build
from xqgan_core.checkpoint import load_into, optional_state_keys


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"quantizer": build("quantizer", {"use": "vq", "codebook_size": 16, "dim": 4})})


def test_optional_keys_are_collected_with_their_module_path():
    assert optional_state_keys(model()) == {"quantizer.last_hit", "quantizer.train_batches"}


def test_checkpoint_without_optional_buffers_loads_and_keeps_fresh_values():
    saved = {k: v.clone() for k, v in model().state_dict().items()}
    saved["quantizer.embedding.weight"] += 1.0  # distinguishable from a fresh model
    del saved["quantizer.last_hit"], saved["quantizer.train_batches"]
    target = model()
    load_into(target, saved, "model", Path("old-ckpt"))
    assert torch.equal(target.quantizer.embedding.weight, saved["quantizer.embedding.weight"])
    assert torch.equal(target.quantizer.last_hit, torch.full((16,), -1, dtype=torch.long))
    assert int(target.quantizer.train_batches) == 0


def test_missing_weights_are_still_an_error_naming_them():
    saved = dict(model().state_dict())
    del saved["quantizer.embedding.weight"], saved["quantizer.last_hit"]
    with pytest.raises(CheckpointError, match=r"missing in checkpoint: quantizer\.embedding") as exc:
        load_into(model(), saved, "model", Path("ckpt"))
    assert "last_hit" not in str(exc.value)


def test_an_optional_key_with_the_wrong_shape_is_an_error():
    saved = dict(model().state_dict())
    saved["quantizer.last_hit"] = torch.zeros(8, dtype=torch.long)
    with pytest.raises(CheckpointError, match=r"quantizer\.last_hit \(checkpoint \(8,\), run file \(16,\)\)"):
        load_into(model(), saved, "model", Path("ckpt"))

"""frozen and lora adapters on a tiny CNN + VQ tokenizer: what trains, what cannot change, merge, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from xqgan_core import build
from xqgan_core.model import TokenizerModel
from xqgan_core.testing import ComponentContract
from xqgan_plugin_finetune.lora import branch_parameter_names

CNN = {"use": "cnn", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16,
       "level_attention": False}


def tokenizer(seed: int = 0) -> TokenizerModel:
    torch.manual_seed(seed)
    # dead-code restarts on: a quantizer left in training mode would rewrite its codebook every step
    vq = {"use": "vq", "codebook_size": 32, "dim": 8, "dead_code_threshold": 1.0}
    return TokenizerModel(build("encoder", {**CNN, "out_dim": 8}), build("quantizer", vq),
                          build("decoder", {**CNN, "in_dim": 8}))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(steps):
        x = images(seed=10 + i)
        recon, quant = model(x)
        (torch.nn.functional.mse_loss(recon, x) + quant.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def reconstruct(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images())[0]


class TestFrozenContract(ComponentContract):
    kind = "adapter"
    name = "frozen"


class TestLoRAContract(ComponentContract):
    kind = "adapter"
    name = "lora"


# ---- lora ---------------------------------------------------------------------------------------------------


def test_lora_starts_exactly_at_the_trained_model():
    base = tokenizer()
    adapted = build("adapter", {"use": "lora", "rank": 4}).apply(copy.deepcopy(base))
    assert torch.equal(reconstruct(adapted), reconstruct(base))


def test_lora_trains_only_its_branches_and_the_rest_cannot_change():
    base = tokenizer()
    adapted = build("adapter", {"use": "lora", "rank": 4}).apply(copy.deepcopy(base))
    branches = branch_parameter_names(adapted)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable == branches and len(branches) > 0
    assert all(n.startswith(("encoder.", "decoder.")) for n in branches)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    train_steps(adapted)
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the branches really learn (the reference code's LoRA never did) ...
    assert {k for k in changed if ".lora_up." in k}, "no LoRA up-projection moved"
    # ... and nothing else moves: base weights, the codebook, the quantizer's usage buffers
    assert changed <= {k for k in before if ".lora_" in k}, sorted(changed - {k for k in before if ".lora_" in k})


def test_lora_merge_gives_the_same_outputs_with_the_plain_layout():
    base = tokenizer()
    adapter = build("adapter", {"use": "lora", "rank": 4, "alpha": 8.0, "targets": ["decoder"]})
    adapted = adapter.apply(copy.deepcopy(base))
    train_steps(adapted)
    expected = reconstruct(adapted)
    merged = adapter.merge(adapted)
    assert branch_parameter_names(merged) == []
    assert set(merged.state_dict()) == set(base.state_dict())  # loadable as a plain tokenizer
    torch.testing.assert_close(reconstruct(merged), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(reconstruct(merged), reconstruct(base))  # the update is in the weights now


def test_lora_also_train_keeps_named_parameters_trainable():
    adapted = build("adapter", {"use": "lora", "targets": ["decoder"], "also_train": ["decoder.conv_out"]}).apply(
        tokenizer())
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert {"decoder.conv_out.weight", "decoder.conv_out.bias"} <= trainable
    assert not any(n.startswith("encoder.") for n in trainable)


def test_lora_target_matching_nothing_names_the_pattern():
    with pytest.raises(ValueError, match=r"targets: 'decoder\.nowhere' match\(es\) no Conv2d/Linear layer"):
        build("adapter", {"use": "lora", "targets": ["decoder.nowhere"]}).apply(tokenizer())


# ---- frozen -------------------------------------------------------------------------------------------------


def test_frozen_parts_do_not_change_and_the_rest_trains():
    model = build("adapter", {"use": "frozen", "parts": ["encoder", "quantizer"]}).apply(tokenizer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed), sorted(changed)


def test_frozen_everything_is_an_error():
    with pytest.raises(ValueError, match="freeze every parameter"):
        build("adapter", {"use": "frozen", "parts": ["encoder", "quantizer", "decoder"]}).apply(tokenizer())


def test_frozen_part_matching_nothing_lists_the_top_level_parts():
    with pytest.raises(ValueError, match=r"parts: 'encoderr'.*top-level parts: encoder, quantizer, decoder"):
        build("adapter", {"use": "frozen", "parts": ["encoderr"]}).apply(tokenizer())

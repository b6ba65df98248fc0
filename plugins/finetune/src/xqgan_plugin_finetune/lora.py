"""``lora``: low-rank adaptation of a trained tokenizer's conv and linear layers (Hu et al., 2021).

Each targeted layer ``W`` keeps its weights frozen and gains a trainable branch ``scale * up(down(x))``:

* Conv2d ``W`` (out, in, k, k): ``down`` is a (rank, in, k, k) conv with W's stride, padding and dilation, ``up`` a
  1x1 conv (out, rank); Linear: ``down`` (rank, in), ``up`` (out, rank). ``scale = alpha / rank``.
* ``up`` starts at zero, so the adapted model starts exactly at the trained one.
* The branch is added by a forward hook and its modules are registered on the layer itself
  (``decoder.conv_out.lora_down.weight``), so the layer's own parameter names, and therefore checkpoints of the
  base model, are unchanged.
* ``merge`` folds the branch into ``W`` (``W += scale * up @ down``) and removes it: inference runs the plain
  architecture at its usual speed.

Everything else is frozen except parameters named in ``also_train``; parts left without any trainable parameter
(by default the quantizer) run as at inference, so the codebook cannot drift and the token vocabulary stays.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xqgan_core import between, config, each, non_empty, option, positive
from xqgan_core.interfaces import Adapter

from .selection import pin_untrainable_to_eval, select

ADAPTABLE = (nn.Conv2d, nn.Linear)


def _lora_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    x = module.lora_dropout(args[0])
    return output + module.lora_up(module.lora_down(x)).to(output.dtype) * module.lora_scale


def add_branch(layer: nn.Module, rank: int, alpha: float, dropout: float) -> None:
    """Give ``layer`` (Conv2d or Linear) a zero-initialised low-rank branch."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"lora supports ungrouped convolutions only, got groups={layer.groups}")
        down: nn.Module = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                    layer.dilation, bias=False, padding_mode=layer.padding_mode)
        up: nn.Module = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
    else:
        down, up = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=5**0.5)
    nn.init.zeros_(up.weight)
    layer.lora_down = down.to(device=w.device, dtype=w.dtype)
    layer.lora_up = up.to(device=w.device, dtype=w.dtype)
    layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    layer.lora_scale = alpha / rank
    layer.register_forward_hook(_lora_hook)


@torch.no_grad()
def merge_branch(layer: nn.Module) -> None:
    """``W += scale * up @ down``, then remove the branch and its hook."""
    up, down = layer.lora_up.weight, layer.lora_down.weight
    if isinstance(layer, nn.Conv2d):
        delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0].float(), down.float())
    else:
        delta = up.float() @ down.float()
    layer.weight += (delta * layer.lora_scale).to(layer.weight.dtype)
    for key, hook in list(layer._forward_hooks.items()):
        if hook is _lora_hook:
            del layer._forward_hooks[key]
    del layer.lora_down, layer.lora_up, layer.lora_dropout, layer.lora_scale


class LoRA(Adapter):
    """Low-rank updates of the conv/linear layers under ``targets``; all other weights frozen."""

    plugin_api = 1

    @config
    class Config:
        targets: tuple[str, ...] = option(
            ("encoder", "decoder"),
            help="modules whose Conv2d/Linear layers get a low-rank branch: dotted names or globs "
            "(e.g. 'decoder', 'decoder.up.*')",
            validator=[non_empty(), each(non_empty())],
        )
        rank: int = option(8, help="rank of each update (trainable parameters grow linearly with it)",
                           validator=positive())
        alpha: float = option(8.0, help="the update is scaled by alpha / rank", validator=positive())
        dropout: float = option(0.0, help="dropout on the branch's input", validator=between(0.0, 1.0))
        also_train: tuple[str, ...] = option(
            (),
            help="parameters that keep training in full besides the branches: dotted names or globs (e.g. "
            "'decoder.conv_out' or 'quantizer' to let the codebook move, which changes what the tokens mean)",
            validator=each(non_empty()),
        )
    def apply(self, module: nn.Module) -> nn.Module:
        c = self.config
        layers = {n: m for n, m in module.named_modules() if isinstance(m, ADAPTABLE)}
        chosen = select(layers, c.targets, "Conv2d/Linear layer", "targets", module)
        keep = select((n for n, _ in module.named_parameters()), c.also_train, "parameter", "also_train", module)
        module.requires_grad_(False)
        for name, p in module.named_parameters():
            if name in keep:
                p.requires_grad_(True)
        for name in chosen:
            add_branch(layers[name], c.rank, c.alpha, c.dropout)
        pin_untrainable_to_eval(module)
        return module

    def merge(self, module: nn.Module) -> nn.Module:
        for layer in module.modules():
            if isinstance(layer, ADAPTABLE) and hasattr(layer, "lora_up"):
                merge_branch(layer)
        return module


def branch_parameter_names(module: nn.Module) -> list[str]:
    """Names of the LoRA branch parameters in ``module``."""
    return [n for n, _ in module.named_parameters() if ".lora_down." in n or ".lora_up." in n]

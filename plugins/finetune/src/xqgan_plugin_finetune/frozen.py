"""``frozen``: freeze chosen parts of the tokenizer (e.g. the encoder and quantizer, to adapt only the decoder)."""

from __future__ import annotations

from torch import nn

from xqgan_core import config, each, non_empty, option
from xqgan_core.interfaces import Adapter

from .selection import pin_untrainable_to_eval, select


class Frozen(Adapter):
    """Parts named in ``parts`` get no gradient and run as at inference (no codebook updates, no dropout draws);
    everything else trains as usual. Keeping the encoder and quantizer frozen keeps the token vocabulary, so an AR
    model trained on the old tokens still reads the new ones."""

    plugin_api = 1

    @config
    class Config:
        parts: tuple[str, ...] = option(
            ("encoder", "quantizer"),
            help="modules to freeze: dotted names or globs over the model's modules (top level: encoder, quantizer, "
            "decoder; e.g. 'decoder.up.0.*')",
            validator=[non_empty(), each(non_empty())],
        )

    def apply(self, module: nn.Module) -> nn.Module:
        chosen = select((n for n, _ in module.named_modules() if n), self.config.parts, "module", "parts", module)
        modules = dict(module.named_modules())
        for name in chosen:
            modules[name].requires_grad_(False)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"parts {list(self.config.parts)} freeze every parameter: nothing would train")
        pin_untrainable_to_eval(module)
        return module

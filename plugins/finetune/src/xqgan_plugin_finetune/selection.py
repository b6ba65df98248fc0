"""Choosing parts of a model by name, and keeping parts that do not train from changing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn


def matches(name: str, pattern: str) -> bool:
    """``pattern`` is a dotted module/parameter name or a glob of one (``decoder.up.*``); a name also matches every
    name below it (``decoder`` matches ``decoder.conv_out.weight``)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def select(names: Iterable[str], patterns: Sequence[str], what: str, option: str, model: nn.Module) -> list[str]:
    """Names matched by any pattern; a pattern that matches nothing is an error naming it and the top-level parts."""
    names = list(names)
    unmatched = [p for p in patterns if not any(matches(n, p) for n in names)]
    if unmatched:
        parts = ", ".join(name for name, _ in model.named_children())
        # a pattern written as a suffix (peft style: 'mlp.fc*') matches full names once it starts with '*.'
        hints = [f"'*.{p}'" for p in unmatched if any(fnmatchcase(n, f"*.{p}") for n in names)]
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        raise ValueError(
            f"{option}: {', '.join(repr(p) for p in unmatched)} match(es) no {what} of the model "
            f"(top-level parts: {parts}; patterns are dotted names or globs such as 'decoder.up.*'){hint}"
        )
    return [n for n in names if any(matches(n, p) for p in patterns)]


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.train(False)


def pin_untrainable_to_eval(model: nn.Module) -> list[str]:
    """Keep every part without a trainable parameter in eval mode, even while the engine trains the model.

    A frozen quantizer must not change its codebook through training-mode side effects (k-means init, dead-code
    restarts, EMA updates) or drop levels: "frozen" means it behaves as at inference. Returns the pinned names.
    """
    pinned: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        has_state = bool(params) or any(True for _ in module.buffers())
        if has_state and not any(p.requires_grad for p in params):
            if _stay_in_eval not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_stay_in_eval)
            pinned.append(prefix or "(model)")
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return pinned

"""What AdamW decays in a VAR generator run: VAR's own choice (matrices and the class table, not the start / position /
level embeddings nor the attention log-scales), through the generator task's parameter groups."""

from __future__ import annotations

from xqgan_core.generator_task import decay_groups
from xqgan_core.registry import build


def _bound(attn_l2_norm: bool = True):
    q = build("quantizer", {"use": "msrq", "scales": [1, 2, 4], "phi_count": 1,
                            "code": {"use": "vq", "codebook_size": 16, "dim": 4}})  # fmt: skip
    g = build("generator", {"use": "var", "depth": 2, "width": 32, "heads": 2, "attn_l2_norm": attn_l2_norm})
    g.bind(q.token_layout(4, 4), q, 3)
    return g


def test_var_exempts_position_level_embeddings_and_attention_scales() -> None:
    g = _bound()
    names = {id(p): n for n, p in g.named_parameters()}
    decayed, spared = ({names[id(p)] for p in group["params"]} for group in decay_groups(g, 0.05))
    assert {"pos_start", "pos_embed", "level_embed.weight", "blocks.0.attn.l2_scale", "blocks.1.attn.l2_scale"} <= spared
    assert {"class_embedding.weight", "word_embed.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= decayed
    assert not decayed & spared and decayed | spared == set(names.values())


def test_without_l2_attention_there_is_no_scale_to_exempt() -> None:
    g = _bound(attn_l2_norm=False)
    assert g.no_weight_decay() == {"pos_start", "pos_embed", "level_embed.weight"}
    decay_groups(g, 0.05)  # every listed name exists

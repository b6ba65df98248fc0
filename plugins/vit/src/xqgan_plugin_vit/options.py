"""Options shared by the ViT encoder and decoder (each declares its own ``Config`` on top of these)."""

from __future__ import annotations

from typing import Literal

from xqgan_core.config import at_least, between, config, option, positive


@config
class TrunkOptions:
    image_size: int = option(256, help="image side in pixels; the trunk runs at this fixed size", validator=positive())
    patch_size: int = option(16, help="ViT patch side in pixels (image_size must be a multiple)", validator=positive())
    embed_dim: int = option(
        768, help="token width. Presets: S = 384 / depth 12 / 6 heads, B = 768 / 12 / 12, L = 1024 / 24 / 16",
        validator=positive())
    depth: int = option(12, help="number of transformer blocks (S/B: 12, L: 24)", validator=positive())
    num_heads: int = option(12, help="attention heads (S: 6, B: 12, L: 16); must divide embed_dim",
                            validator=positive())
    mlp_ratio: float = option(4.0, help="MLP hidden width / embed_dim", validator=positive())
    layer_scale: float = option(
        1e-5, help="initial LayerScale of each block's residual branches (DINOv2 uses 1e-5; 0 = no LayerScale, "
        "the plain ViT layout). Must match the weights loaded by `init`", validator=at_least(0.0))
    drop_path: float = option(0.0, help="stochastic depth rate (the reference trains with 0.1)",
                              validator=between(0.0, 1.0))
    checkpointing: bool = option(
        False, help="activation checkpointing per transformer block (recompute in backward; training only): less "
        "memory, about one extra forward of compute")
    attention: Literal["auto", "fused", "math"] = option(
        "auto", help="attention kernel: 'fused' = torch's scaled_dot_product_attention (flash attention; no "
        "attention matrix kept for backward), 'math' = softmax(q k^T) v as two matrix products (keeps the "
        "attention matrices), 'auto' = fused, except under bf16 autocast on the CPU, where torch's CPU flash kernel "
        "is slower than two bf16 matrix products (benchmarks/README.md, ViT tokenizer step)")
    positional_init: bool = option(
        False, help="random init that starts every attention head routing by position (needs init = '' and an even "
        "embed_dim): position embeddings (std 1) in the first half of the channels, content in the second; each "
        "head's queries/keys read positions, its values content; the read-in and read-out maps use content only. "
        "Latent queries then copy the image patch at their position and mask tokens the latent token at theirs "
        "(exact when latent_size = image_size / patch_size), which random init has to learn slowly")
    init: str = option(
        "",
        help="initial trunk weights: '' = random; a local .safetensors / .pt / .pth file of timm ViT weights; or a "
        "timm model name with pretrained weights (e.g. 'vit_base_patch14_dinov2.lvd142m'; 'dinov2' = the DINOv2 "
        "model of embed_dim's size S/B/L), read from the Hugging Face cache (downloaded only when online). Patch and "
        "position embeddings are resampled to patch_size and the image_size / patch_size grid when the weights' "
        "differ (DINOv2: 14 px, 37x37 -> 16 px, 16x16)",
    )

"""Named model sizes: the one table of name -> dimensions for ViT, MAE decoders and DiT.

Torch-free on purpose: the config loader checks ``mae.encoder_size``, ``clip.vision_size`` and
``dit.model`` against these tables before any work starts, without importing torch; the model
modules (``vit.py``, ``mae.py``, ``dit.py``) build from the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ViTSize", "VIT_SIZES", "MAE_DECODER_SIZES", "DIT_SIZES", "parse_dit_name"]


@dataclass(frozen=True)
class ViTSize:
    """Width, depth and heads of a named ViT; the patch and image size are chosen per dataset."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_SIZES: dict[str, ViTSize] = {
    # Small encoders for 28-64 px images on CPU; head width 16-64 keeps attention meaningful.
    "nano": ViTSize(embed_dim=64, depth=4, num_heads=4),
    "micro": ViTSize(embed_dim=128, depth=6, num_heads=4),
    "mini": ViTSize(embed_dim=192, depth=8, num_heads=3),
    # The published sizes (DeiT-Ti/S, ViT-B/L/H).
    "tiny": ViTSize(embed_dim=192, depth=12, num_heads=3),
    "small": ViTSize(embed_dim=384, depth=12, num_heads=6),
    "base": ViTSize(embed_dim=768, depth=12, num_heads=12),
    "large": ViTSize(embed_dim=1024, depth=24, num_heads=16),
    "huge": ViTSize(embed_dim=1280, depth=32, num_heads=16),
}

# Decoders per encoder size. The paper's 512-wide, 8-deep decoder for ViT-B/L/H; smaller ones scale
# down with the encoder so the decoder stays a fraction of the pretraining cost.
MAE_DECODER_SIZES: dict[str, ViTSize] = {
    "nano": ViTSize(embed_dim=64, depth=2, num_heads=4),
    "micro": ViTSize(embed_dim=128, depth=2, num_heads=4),
    "mini": ViTSize(embed_dim=128, depth=4, num_heads=4),
    "tiny": ViTSize(embed_dim=256, depth=4, num_heads=8),
    "small": ViTSize(embed_dim=256, depth=4, num_heads=8),
    "base": ViTSize(embed_dim=512, depth=8, num_heads=16),
    "large": ViTSize(embed_dim=512, depth=8, num_heads=16),
    "huge": ViTSize(embed_dim=512, depth=8, num_heads=16),
}

#: size letter -> (hidden_size, depth, num_heads). S/B/L/XL are the paper's; T and N are CPU-sized.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (1152, 28, 16),
    "L": (1024, 24, 16),
    "B": (768, 12, 12),
    "S": (384, 12, 6),
    "T": (128, 4, 4),
    "N": (64, 2, 2),
}


def parse_dit_name(name: str) -> tuple[str, int]:
    """``"DiT-XL/2"`` -> ``("XL", 2)``; raises ``ValueError`` listing the valid sizes otherwise."""
    prefix, _, rest = name.partition("-")
    size, _, patch = rest.partition("/")
    if prefix != "DiT" or size not in DIT_SIZES or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"unknown DiT name {name!r}; expected 'DiT-<size>/<patch>' with size in {sorted(DIT_SIZES)} "
                         f"and patch a positive integer, e.g. 'DiT-S/2'")
    return size, int(patch)

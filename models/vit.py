"""Vision Transformer (ViT) encoder, after Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021),
laid out like the encoder of facebookresearch/mae ``models_mae.py`` (written from scratch here).

An image (N, C, H, W) is cut into non-overlapping p x p patches, each patch becomes a token, a class
token is prepended, fixed 2-D sin-cos positions are added, and pre-LN transformer blocks mix the
tokens. The same module serves as the MAE encoder (which feeds it only the visible patches, see
``models/mae.py``) and as the evaluated classifier, so an MAE encoder's ``state_dict`` loads here as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ViTSize",
    "VIT_SIZES",
    "PatchEmbed",
    "sincos_position_embedding_2d",
    "Attention",
    "Mlp",
    "DropPath",
    "Block",
    "VisionTransformer",
    "vit_from_name",
    "param_count",
]

LAYER_NORM_EPS = 1e-6


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


#################################################################################
#                         Patch and position embeddings                         #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens; a conv with kernel = stride = p is flatten + linear."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if patch_size <= 0 or img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} must be a positive multiple of patch_size {patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}"
            )
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, L, D), row-major over the patch grid


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin(pos * w_i), cos(pos * w_i)], w_i from 1 to 1/10000."""
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # (D/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, D)


def sincos_position_embedding_2d(embed_dim: int, grid_size: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for a square patch grid, as MAE uses.

    Half the channels encode the column, half the row (column first, matching MAE's layout, so MAE
    checkpoints line up). The class token, which has no position, gets a zero row.

    Args:
        embed_dim: token width; must be divisible by 4 (sin and cos for each of two axes).
        grid_size: patches per side.
        cls_token: prepend a zero row for the class token.

    Returns:
        float32 tensor of shape (1 + L, D) with ``cls_token``, else (L, D), with L = grid_size**2,
        rows in the same row-major order as ``PatchEmbed``'s tokens.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb_col = _sincos_1d(embed_dim // 2, cols.reshape(-1))  # (L, D/2)
    emb_row = _sincos_1d(embed_dim // 2, rows.reshape(-1))  # (L, D/2)
    emb = torch.cat([emb_col, emb_row], dim=1)  # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)  # (1 + L, D)
    return emb.float()


#################################################################################
#                              Transformer blocks                               #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (fused kernels where available)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network applied to each token."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for whole samples with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One draw per sample, broadcast over its tokens; rescale so the expected output is unchanged.
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (N, 1, 1)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each branch under DropPath."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (N, T, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # (N, T, D)
        return x


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear weights, zero biases, unit LayerNorms (use with ``Module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


#################################################################################
#                              Vision Transformer                               #
#################################################################################


class VisionTransformer(nn.Module):
    """ViT encoder with a class token, fixed sin-cos positions and an optional linear head."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: Literal["token", "avg"] = "token",
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.global_pool = global_pool

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A frozen Parameter rather than a buffer: it travels in state_dict and counts in parameters()
        # the way MAE/timm checkpoints and published parameter counts expect.
        pos = sincos_position_embedding_2d(embed_dim, self.patch_embed.grid_size, cls_token=True)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)  # (1, 1 + L, D)

        # Stochastic depth grows linearly with depth: early blocks carry features every later block needs.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The patch projection is a linear map on flattened patches, so init it like one.
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_transformer_weights)

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> patch tokens with positions added (N, L, D), no class token yet."""
        x = self.patch_embed(imgs)  # (N, L, D)
        return x + self.pos_embed[:, 1:, :]  # (N, L, D)

    def _normed_block_outputs(self, patch_tokens: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Prepend the class token, run every block, and return the last ``count`` outputs, each
        through the final LayerNorm: (N, K, D) -> count x (N, 1 + K, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(patch_tokens.shape[0], -1, -1)  # (N, 1, D)
        hidden = torch.cat([cls, patch_tokens], dim=1)  # (N, 1 + K, D)
        outputs = []
        for index, block in enumerate(self.blocks):
            hidden = block(hidden)  # (N, 1 + K, D)
            if index >= len(self.blocks) - count:
                outputs.append(self.norm(hidden))
        return outputs

    def forward_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Any subset of position-embedded patch tokens (N, K, D) -> final-normed (N, 1 + K, D).

        Positions are already in the tokens, so the blocks work on whichever patches the caller kept;
        this is what lets the MAE encoder run on visible patches only.
        """
        return self._normed_block_outputs(patch_tokens, 1)[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> final-normed tokens (N, 1 + L, D), class token first."""
        return self.forward_tokens(self.embed_patches(x))

    def forward_last_blocks(self, x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Images (N, C, H, W) -> the outputs of the last ``count`` blocks, each (N, 1 + L, D).

        Each output goes through the final LayerNorm, as DINO's linear evaluation does, so every
        block's tokens are on the scale of the last one's; the last entry equals ``forward_features``.
        A frozen-feature probe on several blocks sees what the last block has traded away for MAE's
        pixel reconstruction.
        """
        if not 1 <= count <= len(self.blocks):
            raise ValueError(f"count must be in [1, {len(self.blocks)}] (the encoder's depth), got {count}")
        return self._normed_block_outputs(self.embed_patches(x), count)

    def pool(self, tokens: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """Tokens (N, 1 + L, D) -> one vector per image (N, D).

        Args:
            tokens: output of ``forward_features``.
            how: "token" (the class token) or "avg" (mean of the patch tokens); default ``global_pool``.
        """
        how = how or self.global_pool
        if how == "token":
            return tokens[:, 0]  # (N, D)
        if how == "avg":
            return tokens[:, 1:].mean(dim=1)  # (N, D)
        raise ValueError(f"pool how must be 'token' or 'avg', got {how!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> logits (N, num_classes), or pooled features (N, D) when num_classes=0."""
        return self.head(self.pool(self.forward_features(x)))


def vit_from_name(size: str, **kwargs) -> VisionTransformer:
    """Build a ``VisionTransformer`` of a named size from ``VIT_SIZES``.

    Args:
        size: a key of ``VIT_SIZES`` ("nano", "micro", "mini", "tiny", "small", "base", "large", "huge").
        **kwargs: other ``VisionTransformer`` arguments (img_size, patch_size, in_chans, num_classes,
            drop_path_rate, global_pool); width/depth/heads given here override the named size.
    """
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; valid sizes: {', '.join(VIT_SIZES)}")
    spec = VIT_SIZES[size]
    arguments = dict(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio)
    arguments.update(kwargs)
    return VisionTransformer(**arguments)


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module``; frozen ones (the sin-cos positions) count unless ``trainable_only``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

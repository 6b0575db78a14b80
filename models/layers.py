"""Transformer parts shared by the ViT/MAE (``models/vit.py``, ``models/mae.py``) and DiT
(``models/dit.py``): patch embedding, fixed 2-D sin-cos positions, self-attention and the MLP.

One definition each, so a fix or a faster kernel reaches every model. Submodule names (``proj``,
``qkv``, ``fc1``, ``fc2``) are the ones MAE, DiT and timm use, so their checkpoints line up.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchEmbed", "sincos_position_embedding_2d", "Attention", "attend", "Mlp"]


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
                f"expected {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, L, D), row-major over the patch grid


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin(pos * w_i), cos(pos * w_i)], w_i from 1 to 1/10000."""
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # (D/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, D)


def sincos_position_embedding_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for a square patch grid, as MAE and DiT use.

    Half the channels encode the column, half the row (column first, matching the reference layout,
    so MAE and DiT checkpoints line up). The class token, which has no position, gets a zero row.

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
#                            Attention and MLP                                  #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, then ``attend`` (flash/memory-efficient
    kernels on CUDA). ``causal``: token t sees only tokens <= t (CLIP's text tower)."""

    def __init__(self, dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.causal = causal
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        x = attend(q, k, v, self.causal)  # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.proj(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for (N, H, Tq, Dh) queries and (N, H, Tk, Dh) keys and values;
    ``causal`` hides from query i the keys after i (top-left aligned, as ``is_causal``).

    ``scaled_dot_product_attention`` everywhere except bf16 on the CPU: there PyTorch's fused CPU kernel
    takes 4-7x longer forward and backward than in fp32 (9.0 against 1.4 ms for MAE-Tiny's encoder
    attention, 27 against 6.3 ms for its decoder's; ``benchmarks/bench_reference_steps.py``), which
    undid bf16's gain. Two bf16 batched matmuls around a softmax take 1.2 and 3.7 ms and use the CPU's
    bf16 matrix units. The scores are rounded to bf16 before the softmax, as in timm's non-fused path
    (PyTorch's math kernel keeps them in fp32); the CPU softmax of a bf16 tensor computes in fp32 and
    rounds once at the end, so it needs no casts around it.
    """
    if q.dtype != torch.bfloat16 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, Tq, Tk)
    if causal:
        later = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)  # (Tq, Tk), True above the diagonal
        scores = scores.masked_fill(later, float("-inf"))
    weights = scores.softmax(dim=-1)  # (N, H, Tq, Tk)
    return weights @ v  # (N, H, Tq, Dh)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network applied to each token.

    ``approximate="tanh"`` is DiT's GELU (its checkpoints were trained with it); ViT and MAE use the
    exact one.
    """

    def __init__(self, dim: int, hidden_dim: int, approximate: Literal["none", "tanh"] = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)

"""Independent implementations the step benchmarks race against (never used by the pipeline).

``TimmMAE`` follows facebookresearch/mae's ``models_mae.py`` with the blocks it imports from timm
(``timm.models.vision_transformer.Block`` and ``PatchEmbed``): masking by argsort of noise and
gathers, mask tokens appended then unshuffled, loss on the hidden patches with per-patch pixel
normalisation, trained with plain ``torch.optim.AdamW`` as its ``main_pretrain.py`` does.

``PlainDiT`` is a straightforward DiT (Peebles & Xie): patchify conv, fixed sin-cos positions,
timestep and label embeddings summed into one conditioning vector, adaLN-Zero blocks with timm's
``Attention`` and ``Mlp``, and the adaLN final layer; the noise-prediction MSE at random timesteps.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, Block

from models.layers import sincos_position_embedding_2d


class TimmMAE(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int, mask_ratio: float = 0.75):
        super().__init__()
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_position_embedding_2d(embed_dim, grid, cls_token=True)[None])
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_position_embedding_2d(decoder_embed_dim, grid, cls_token=True)[None])
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, 4.0, qkv_bias=True,
                                                  norm_layer=norm) for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        rest = torch.cat([x[:, 1:], mask_tokens], dim=1)
        rest = torch.gather(rest, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], rest], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = self.patchify(imgs)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None])
        return x + gate2[:, None] * self.mlp(self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None])


class PlainDiT(nn.Module):
    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden: int, depth: int, num_heads: int,
                 num_classes: int, learn_sigma: bool = True):
        super().__init__()
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden)
        self.register_buffer("pos_embed", sincos_position_embedding_2d(hidden, input_size // patch_size)[None])
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(_DiTBlock(hidden, num_heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_linear = nn.Linear(hidden, patch_size**2 * self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_mlp(timestep_embedding(t, 256)) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        tokens = self.final_norm(tokens) * (1 + scale[:, None]) + shift[:, None]
        return self.unpatchify(self.final_linear(tokens))


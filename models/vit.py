"""Vision Transformer (ViT) encoder, after Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021),
laid out like the encoder of facebookresearch/mae ``models_mae.py`` (written from scratch here).

An image (N, C, H, W) is cut into non-overlapping p x p patches, each patch becomes a token, a class
token is prepended, fixed 2-D sin-cos positions are added, and pre-LN transformer blocks mix the
tokens. The same module serves as the MAE encoder (which feeds it only the visible patches, see
``models/mae.py``) and as the evaluated classifier, so an MAE encoder's ``state_dict`` loads here as is
(an avg-pooling classifier has ``fc_norm`` in place of the final ``norm``, as MAE fine-tunes).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from models.layers import Attention, Mlp, PatchEmbed, sincos_position_embedding_2d
from models.sizes import VIT_SIZES, ViTSize

__all__ = [
    "ViTSize",
    "VIT_SIZES",
    "DropPath",
    "Block",
    "VisionTransformer",
    "vit_from_name",
    "param_count",
]

LAYER_NORM_EPS = 1e-6


#################################################################################
#                              Transformer blocks                               #
#################################################################################


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
    """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each branch under DropPath.
    ``causal`` makes the attention causal (CLIP's text tower)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, causal=causal)
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
    """ViT encoder with a class token, fixed sin-cos positions and an optional linear head.

    ``global_pool`` picks the image vector. "token": the class token after the final LayerNorm
    ``norm`` (the MAE encoder, and ViT's classifier). "avg": the mean of the patch tokens, then its
    own LayerNorm ``fc_norm``, with no final norm on the tokens, as MAE's fine-tuned classifier
    (``models_vit.py``, global_pool=True); that model has no ``norm`` parameters.
    """

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
        # With avg pooling the norm moves after the pooling: a mean of normalised tokens is not normalised.
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The patch projection is a linear map on flattened patches, so init it like one.
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_transformer_weights)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides norms and biases (read by ``tasks/engine.py``)."""
        return {"pos_embed", "cls_token"}

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> patch tokens with positions added (N, L, D), no class token yet."""
        x = self.patch_embed(imgs)  # (N, L, D)
        return x + self.pos_embed[:, 1:, :]  # (N, L, D)

    def _normed_block_outputs(self, patch_tokens: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Prepend the class token, run every block, and return the last ``count`` outputs, each
        through the final LayerNorm (none with avg pooling): (N, K, D) -> count x (N, 1 + K, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(patch_tokens.shape[0], -1, -1)  # (N, 1, D)
        hidden = torch.cat([cls, patch_tokens], dim=1)  # (N, 1 + K, D)
        outputs = []
        for index, block in enumerate(self.blocks):
            hidden = block(hidden)  # (N, 1 + K, D)
            if index >= len(self.blocks) - count:
                outputs.append(self.norm(hidden))
        return outputs

    def forward_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Any subset of position-embedded patch tokens (N, K, D) -> block outputs (N, 1 + K, D), after the
        final norm (which an avg-pool model does not have).

        Positions are already in the tokens, so the blocks work on whichever patches the caller kept;
        this is what lets the MAE encoder run on visible patches only.
        """
        return self._normed_block_outputs(patch_tokens, 1)[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> tokens (N, 1 + L, D), class token first (final-normed with token pooling)."""
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
                The result goes through ``fc_norm``, which is the identity unless ``global_pool`` is "avg".
        """
        how = how or self.global_pool
        if how == "token":
            pooled = tokens[:, 0]  # (N, D)
        elif how == "avg":
            pooled = tokens[:, 1:].mean(dim=1)  # (N, D)
        else:
            raise ValueError(f"pool how must be 'token' or 'avg', got {how!r}")
        return self.fc_norm(pooled)  # (N, D)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> pooled features (N, D), the head's input."""
        return self.pool(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> logits (N, num_classes), or pooled features (N, D) when num_classes=0."""
        return self.head(self.embed(x))


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


PATCH_WEIGHT = "patch_embed.proj.weight"


def with_input_channels(state_dict: dict[str, torch.Tensor], in_chans: int) -> dict[str, torch.Tensor]:
    """A ViT state dict whose patch projection takes ``in_chans`` channels: a grey encoder's weights
    spread evenly over RGB (a grey picture given as RGB embeds exactly as before, the usual way to start
    a colour model from a grey one), or an RGB encoder's summed to one channel (the same identity the
    other way round). Other channel counts are refused."""
    weight = state_dict[PATCH_WEIGHT]
    have = weight.shape[1]
    if have == in_chans:
        return state_dict
    if have == 1:
        converted = weight.repeat(1, in_chans, 1, 1) / in_chans
    elif in_chans == 1:
        converted = weight.sum(dim=1, keepdim=True)
    else:
        raise ValueError(f"cannot turn a {have}-channel patch projection into a {in_chans}-channel one")
    return {**state_dict, PATCH_WEIGHT: converted}


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module``; frozen ones (the sin-cos positions) count unless ``trainable_only``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

"""Diffusion Transformer (DiT) over VAE latents, after Peebles & Xie, "Scalable Diffusion Models with
Transformers" (2023) and the layout of facebookresearch/DiT ``models.py`` (written from scratch here).

A DiT patchifies a latent (N, C, H, W) into tokens, adds fixed 2-D sin-cos positions, runs
transformer blocks conditioned on (timestep + class) through adaLN-Zero, and maps each token back to
a patch of noise prediction (and, with ``learn_sigma``, of variance interpolation values).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.layers import Attention, Mlp, PatchEmbed
# DiT's own name for the shared table (its positions have no class token).
from models.layers import sincos_position_embedding_2d as get_2d_sincos_pos_embed
from models.sizes import DIT_SIZES, parse_dit_name

__all__ = [
    "TimestepEmbedder",
    "LabelEmbedder",
    "DiTBlock",
    "FinalLayer",
    "DiT",
    "DIT_SIZES",
    "dit_from_name",
    "get_2d_sincos_pos_embed",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine on tokens: x (N, T, D), shift/scale (N, D). ``1 + scale`` so zero init is identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------ Embedding layers for patches, timesteps and labels


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features followed by a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding (N,) -> (N, dim): [cos(t f_i), sin(t f_i)], f_i geometric from 1 to 1/max_period.

        Args:
            t: (N,) timesteps, integer or fractional.
            dim: output width.
            max_period: controls the lowest frequency.
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        # Match the MLP's dtype so half-precision weights do not meet fp32 features outside autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    When ``dropout_prob > 0`` the table has one extra row, index ``num_classes``: the learned
    "null" class that stands for "no label" both in training (dropped labels) and in guided sampling.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random (prob ``dropout_prob``) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# ------------------------------------------------ Core DiT model


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    The conditioning vector regresses shift, scale and a residual gate for each of the two sublayers.
    The regression layer starts at zero, so every gate is 0 and the block is the identity at init.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        # No affine in the norms: adaLN supplies the (conditional) shift and scale instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D) tokens, c: (N, D) conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its p x p x out_channels patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer on latents (N, in_channels, input_size, input_size).

    Output has ``out_channels = 2 * in_channels`` when ``learn_sigma`` (epsilon, then variance
    values), else ``in_channels`` (epsilon only).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (use 1 for unconditional), got {num_classes}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A Parameter, not a buffer, as in the official code (it is counted in the published sizes),
        # but frozen: positions stay the fixed sin-cos table.
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int | None:
        """Label index of the learned "no label" embedding, or None when trained without label dropout."""
        return self.num_classes if self.y_embedder.dropout_prob > 0 else None

    def initialize_weights(self) -> None:
        """Xavier for linears, sin-cos positions, N(0, 0.02) embeddings, and zeros for adaLN-Zero."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)  # (T, D)
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed.unsqueeze(0).to(self.pos_embed.device))

        # The patch conv is initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every residual branch is gated shut, so the network starts as the identity
        # on tokens and the zeroed final layer outputs exactly 0.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, p*p*C) -> images (N, C, H, W), inverting the row-major patch order."""
        c = self.out_channels
        p = self.patch_size
        h = w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict noise (and variance values).

        Args:
            x: (N, in_channels, H, W) noisy latents.
            t: (N,) diffusion timesteps.
            y: (N,) class labels; label dropout applies in training mode only.

        Returns:
            (N, out_channels, H, W).
        """
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Forward pass with classifier-free guidance, in the official calling convention.

        The batch is ``[conditional half; unconditional half]``: the first half of ``x`` is used for
        both halves, ``y`` holds the labels then the null class. Guidance
        ``eps_uncond + cfg_scale * (eps_cond - eps_uncond)`` is applied to all ``in_channels``
        epsilon channels (official DiT guides only the first 3, for bit-exact reproduction of its paper).

        Args:
            x: (2N, in_channels, H, W); only ``x[:N]`` is read.
            t: (2N,) timesteps.
            y: (2N,) labels, second half the null class.
            cfg_scale: guidance scale, >= 1.

        Returns:
            (2N, out_channels, H, W) with the guided epsilon repeated in both halves.
        """
        if cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1, got cfg_scale={cfg_scale}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (2N, C, H, W)
        model_out = self.forward(combined, t, y)  # (2N, C_out, H, W)
        eps, rest = model_out[:, : self.in_channels], model_out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N, C, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


# ------------------------------------------------ Named sizes


def dit_from_name(name: str, **kwargs) -> DiT:
    """Build a DiT from a name like ``"DiT-XL/2"`` (size letter, then patch size).

    Args:
        name: ``"DiT-{size}/{patch}"`` with size in :data:`DIT_SIZES` (S, B, L, XL, and CPU-sized T, N)
            and any positive patch size (the paper uses 2, 4, 8).
        **kwargs: the remaining :class:`DiT` arguments (``input_size``, ``in_channels``,
            ``num_classes``, ``learn_sigma``, ``class_dropout_prob``, ``mlp_ratio``).

    Returns:
        The freshly initialised model.
    """
    size, patch = parse_dit_name(name)
    for fixed in ("hidden_size", "depth", "num_heads", "patch_size"):
        if fixed in kwargs:
            raise ValueError(f"{fixed} is set by the name {name!r}; do not pass it to dit_from_name")
    hidden_size, depth, num_heads = DIT_SIZES[size]
    return DiT(patch_size=patch, hidden_size=hidden_size, depth=depth, num_heads=num_heads, **kwargs)

"""Masked autoencoder (MAE) pretraining of a ViT, after He et al., "Masked Autoencoders Are Scalable
Vision Learners" (2022) and the layout of facebookresearch/mae ``models_mae.py`` (written from scratch).

Most patches of each image are hidden; the encoder (a ``VisionTransformer`` from ``models/vit.py``) runs
on the visible ones only, which is what makes MAE cheap. A light decoder gets the encoded visible
tokens plus a shared learned mask token in every hidden slot and predicts the pixels of all patches;
the loss is the mean squared error over the hidden patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from models.vit import (
    LAYER_NORM_EPS,
    Block,
    VisionTransformer,
    init_transformer_weights,
    sincos_position_embedding_2d,
)
from models.sizes import MAE_DECODER_SIZES, VIT_SIZES

__all__ = [
    "patchify",
    "unpatchify",
    "random_masking",
    "MaskedAutoencoder",
    "MAE_DECODER_SIZES",
    "mae_from_name",
    "denormalize_pred",
    "reconstruction_tiles",
]

# Per-patch target normalisation (norm_pix_loss) divides by sqrt(var + eps); shared with denormalize_pred.
NORM_PIX_EPS = 1e-6


#################################################################################
#                          Patches and random masking                           #
#################################################################################


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (N, C, H, W) -> patches (N, L, p*p*C), row-major over the grid, channels last in a patch.

    Args:
        imgs: batch of images; H and W must be multiples of ``patch_size`` (they need not be equal).
        patch_size: side p of a square patch.
    """
    N, C, H, W = imgs.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size {patch_size}")
    h, w = H // patch_size, W // patch_size
    x = imgs.reshape(N, C, h, patch_size, w, patch_size)  # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
    return x.reshape(N, h * w, patch_size * patch_size * C)  # (N, L, p*p*C)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, grid_hw: tuple[int, int] | None = None
) -> torch.Tensor:
    """Inverse of ``patchify``: patches (N, L, p*p*C) -> images (N, C, h*p, w*p).

    Args:
        patches: per-patch pixel vectors in ``patchify``'s layout.
        patch_size: side p of a square patch.
        channels: C.
        grid_hw: patches per column and per row (h, w); default a square grid.
    """
    N, L, patch_dim = patches.shape
    if patch_dim != patch_size * patch_size * channels:
        raise ValueError(
            f"patch vectors of length {patch_dim} do not match patch_size {patch_size} and channels {channels}"
        )
    if grid_hw is None:
        side = int(round(L**0.5))
        if side * side != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid_hw")
        grid_hw = (side, side)
    h, w = grid_hw
    if h * w != L:
        raise ValueError(f"grid_hw {grid_hw} does not hold {L} patches")
    x = patches.reshape(N, h, w, patch_size, patch_size, channels)  # (N, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
    return x.reshape(N, channels, h * patch_size, w * patch_size)  # (N, C, H, W)


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample, by argsort of uniform noise.

    Args:
        x: tokens (N, L, D).
        mask_ratio: fraction to hide, in [0, 1); exactly ``int(L * (1 - mask_ratio))`` stay, truncated as
            in MAE (19 of 49 at 0.6), but at least one so the encoder has a patch to see.
        generator: optional RNG for reproducible masks; it must live on ``x.device``.

    Returns:
        x_visible (N, K, D): the kept tokens, in shuffled order;
        mask (N, L): float, 1 for hidden and 0 for visible, in the original token order;
        ids_restore (N, L): indices that undo the shuffle, so that gathering
            ``cat([x_visible, hidden])`` with them gives back the original order.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    N, L, D = x.shape
    len_keep = max(1, int(L * (1 - mask_ratio)))

    noise = torch.rand(N, L, generator=generator, device=x.device)  # (N, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # (N, L): the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L): the inverse permutation

    ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, K, D)

    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)  # (N, L) in shuffled order
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (N, L) in original order
    return x_visible, mask, ids_restore


#################################################################################
#                               Masked autoencoder                              #
#################################################################################


class MaskedAutoencoder(nn.Module):
    """MAE: a ViT encoder on the visible patches and a light transformer decoder predicting all pixels."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self._check_mask_ratio(mask_ratio)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

        # ---- encoder: a plain ViT (no head), so its state_dict is an evaluation model's ----
        self.encoder = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
        )
        grid_size = self.encoder.patch_embed.grid_size

        # ---- decoder: narrower and shallower; used only in pretraining ----
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_position_embedding_2d(decoder_embed_dim, grid_size, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)  # (1, 1 + L, Dd)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)

        # The encoder initialised itself; init only the decoder so both halves follow MAE's scheme.
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_transformer_weights)

    @staticmethod
    def _check_mask_ratio(mask_ratio: float) -> None:
        # 0 would leave nothing to reconstruct and 1 nothing to encode.
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides norms and biases: positions and the class/mask tokens."""
        return {"mask_token", "decoder_pos_embed"} | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode only the visible patches of each image.

        Args:
            imgs: (N, C, H, W) images.
            mask_ratio: fraction of patches to hide, in (0, 1).
            generator: optional RNG for the mask, on the images' device.

        Returns:
            latent (N, 1 + K, D) with the class token first, mask (N, L), ids_restore (N, L).
        """
        self._check_mask_ratio(mask_ratio)
        x = self.encoder.embed_patches(imgs)  # (N, L, D), positions added before the shuffle
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)  # (N, K, D)
        latent = self.encoder.forward_tokens(x)  # (N, 1 + K, D)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens (N, 1 + K, D) -> pixel predictions for every patch (N, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (N, 1 + K, Dd)
        N, visible_plus_cls, Dd = x.shape
        L = ids_restore.shape[1]

        # Fill the hidden slots with the mask token, then unshuffle so each token sits at its patch.
        mask_tokens = self.mask_token.expand(N, L + 1 - visible_plus_cls, -1)  # (N, L - K, Dd)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd) in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (N, L, Dd)
        x = torch.cat([x[:, :1], patches], dim=1)  # (N, 1 + L, Dd)
        x = x + self.decoder_pos_embed  # (N, 1 + L, Dd)

        for block in self.decoder_blocks:
            x = block(x)  # (N, 1 + L, Dd)
        x = self.decoder_norm(x)  # (N, 1 + L, Dd)
        return self.decoder_pred(x)[:, 1:]  # (N, L, p*p*C), class token dropped

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the hidden patches only.

        Args:
            imgs: (N, C, H, W) the input images.
            pred: (N, L, p*p*C) predictions (normalised per patch when ``norm_pix_loss``).
            mask: (N, L) 1 for hidden, 0 for visible.
        """
        target = patchify(imgs, self.patch_size)  # (N, L, p*p*C)
        if self.norm_pix_loss:
            # Predicting each patch's standardised pixels sharpens detail (MAE paper, Table 1d).
            mean, std = _patch_stats(target)  # (N, L, 1) each
            target = (target - mean) / std
        loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W) -> (loss scalar, pred (N, L, p*p*C), mask (N, L)).

        Args:
            imgs: input images, in the model's input normalisation.
            mask_ratio: override the ratio set at construction.
            generator: optional RNG for the mask.
        """
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def mae_from_name(
    encoder_size: str,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    decoder_embed_dim: int | None = None,
    decoder_depth: int | None = None,
    decoder_num_heads: int | None = None,
    **kwargs,
) -> MaskedAutoencoder:
    """Build an MAE whose encoder is the named ``VIT_SIZES`` entry.

    Args:
        encoder_size: a key of ``VIT_SIZES``.
        img_size, patch_size, in_chans: image geometry.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder shape; ``None`` takes the
            ``MAE_DECODER_SIZES`` default for the encoder size.
        **kwargs: mask_ratio, norm_pix_loss, drop_path_rate.
    """
    if encoder_size not in VIT_SIZES:
        raise ValueError(f"unknown encoder_size {encoder_size!r}; valid sizes: {', '.join(VIT_SIZES)}")
    encoder, decoder = VIT_SIZES[encoder_size], MAE_DECODER_SIZES[encoder_size]
    return MaskedAutoencoder(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=encoder.embed_dim,
        depth=encoder.depth,
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_ratio,
        decoder_embed_dim=decoder.embed_dim if decoder_embed_dim is None else decoder_embed_dim,
        decoder_depth=decoder.depth if decoder_depth is None else decoder_depth,
        decoder_num_heads=decoder.num_heads if decoder_num_heads is None else decoder_num_heads,
        **kwargs,
    )


#################################################################################
#                                 Visualisation                                 #
#################################################################################


def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and sqrt(var + eps) of (N, L, P) pixels, as norm_pix_loss uses (unbiased var, like MAE)."""
    mean = patches.mean(dim=-1, keepdim=True)  # (N, L, 1)
    var = patches.var(dim=-1, keepdim=True)  # (N, L, 1)
    return mean, (var + NORM_PIX_EPS) ** 0.5


def denormalize_pred(imgs: torch.Tensor, pred: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Map norm_pix_loss predictions back to pixels with each target patch's own mean and variance.

    Args:
        imgs: (N, C, H, W) the images the predictions are for.
        pred: (N, L, p*p*C) predictions in per-patch normalised units.
        patch_size: side p of a patch.

    Returns:
        (N, L, p*p*C) predictions in the images' units.
    """
    mean, std = _patch_stats(patchify(imgs, patch_size))  # (N, L, 1) each
    return pred * std + mean


@torch.no_grad()
def reconstruction_tiles(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """What MAE sees and rebuilds: per image the original, the masked input and the reconstruction.

    Hidden patches are grey in the masked image; the reconstruction shows predictions only where
    patches were hidden and the original pixels elsewhere, as the MAE paper's figures do.

    Args:
        imgs: (N, C, H, W) in the model's input normalisation.
        pred: (N, L, p*p*C) pixel predictions (pass ``denormalize_pred`` output after norm_pix_loss).
        mask: (N, L) 1 for hidden, 0 for visible.
        patch_size: side p of a patch.
        max_images: images to show at most.
        mean, std: per-channel input normalisation to undo; default none (images already in [0, 1]).

    Returns:
        (n, 3, C, H, W) float tensor in [0, 1] on the CPU: original, masked, reconstruction per image.
    """
    n = min(imgs.shape[0], max_images)
    imgs, pred, mask = (t[:n].detach().float().cpu() for t in (imgs, pred, mask))
    N, C, H, W = imgs.shape
    grid_hw = (H // patch_size, W // patch_size)

    recon = unpatchify(pred, patch_size, C, grid_hw)  # (n, C, H, W)
    patch_mask = mask.unsqueeze(-1).expand(-1, -1, patch_size * patch_size * C)  # (n, L, p*p*C)
    pixel_mask = unpatchify(patch_mask, patch_size, C, grid_hw)  # (n, C, H, W), 1 where hidden

    def to_display(x: torch.Tensor) -> torch.Tensor:
        if std is not None:
            x = x * torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        if mean is not None:
            x = x + torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        return x.clamp(0.0, 1.0)

    original = to_display(imgs)  # (n, C, H, W)
    recon = to_display(recon)  # (n, C, H, W)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask  # (n, C, H, W)
    pasted = original * (1 - pixel_mask) + recon * pixel_mask  # (n, C, H, W)
    return torch.stack([original, masked, pasted], dim=1)

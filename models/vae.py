"""Tiny autoencoder for latent diffusion: a from-scratch rebuild of TAEF2 (TAESD for the FLUX.2 latent space).

The module layout mirrors the upstream ``nn.Sequential`` indices exactly, so the published
``taef2_{encoder,decoder}.pth`` state dicts load with ``strict=True``. Upstream: madebyollin/taesd (MIT).
The architecture is described in ``shared/data/taesd/NOTES.md``; no upstream code was copied.

The same class, built narrower (e.g. ``width=32, latent_channels=8``), is the trainable fallback when
no pretrained weights are available; :func:`autoencoder_loss` trains it. It is a deterministic
autoencoder (no KL term, no sampling), like TAESD, not a variational one.
"""

from __future__ import annotations

import ctypes
import hashlib

import torch
import torch.nn as nn

__all__ = [
    "TinyAutoencoder",
    "load_pretrained_tiny_autoencoder",
    "freeze",
    "parameter_fingerprint",
    "autoencoder_loss",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """z -> 3 tanh(z / 3): keeps decoder inputs in (-3, 3) without a hard gradient cut-off."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(z / 3.0)


class ResBlock(nn.Module):
    """Three 3x3 convs on a residual path, ReLU after the sum; optional GroupNorm "midblock" branch.

    The ``pool`` branch (1x1 up-projection, GroupNorm, ReLU, 1x1 down-projection) is added to the
    input before the main path. GroupNorm pools statistics over the whole feature map, which gives
    the otherwise purely local conv stack some image-level context.
    """

    def __init__(self, channels: int, midblock_gn: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(channels, channels), nn.ReLU(),
            _conv3x3(channels, channels), nn.ReLU(),
            _conv3x3(channels, channels),
        )
        self.pool = None
        if midblock_gn:
            hidden = 4 * channels
            self.pool = nn.Sequential(
                nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
                nn.GroupNorm(4, hidden),
                nn.ReLU(),
                nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
            )
        # in == out channels everywhere in TAESD, so the skip never needs a projection (no state-dict key).
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)  # (N, C, H, W)
        return self.fuse(self.conv(x) + self.skip(x))  # (N, C, H, W)


class TinyAutoencoder(nn.Module):
    """TAESD-style conv autoencoder: RGB in [0, 1] <-> latents of shape (N, latent_channels, H/8, W/8).

    With the defaults (``latent_channels=32, width=64, midblock_gn=True``) this is exactly TAEF2.
    """

    downsample_factor = 8

    def __init__(self, latent_channels: int = 32, width: int = 64, midblock_gn: bool = True):
        super().__init__()
        self.latent_channels = latent_channels
        self.width = width
        self.midblock_gn = midblock_gn
        w = width

        def block(gn: bool = False) -> ResBlock:
            return ResBlock(w, midblock_gn=gn and midblock_gn)

        # Indices in the comments are the state-dict prefixes; bias-free strided convs match upstream.
        self.encoder = nn.Sequential(
            _conv3x3(3, w), block(),                                       # 0, 1      full res
            _conv3x3(w, w, stride=2, bias=False), block(), block(), block(),  # 2, 3-5    /2
            _conv3x3(w, w, stride=2, bias=False), block(), block(), block(),  # 6, 7-9    /4
            _conv3x3(w, w, stride=2, bias=False),                          # 10         /8
            block(gn=True), block(gn=True), block(gn=True),                # 11-13
            _conv3x3(w, latent_channels),                                  # 14  no output activation
        )
        self.decoder = nn.Sequential(
            SoftClamp(), _conv3x3(latent_channels, w), nn.ReLU(),          # 0, 1, 2
            block(gn=True), block(gn=True), block(gn=True),                # 3-5        /8
            nn.Upsample(scale_factor=2), _conv3x3(w, w, bias=False),       # 6, 7
            block(), block(), block(),                                     # 8-10       /4
            nn.Upsample(scale_factor=2), _conv3x3(w, w, bias=False),       # 11, 12
            block(), block(), block(),                                     # 13-15      /2
            nn.Upsample(scale_factor=2), _conv3x3(w, w, bias=False),       # 16, 17
            block(),                                                       # 18         full res
            _conv3x3(w, 3),                                                # 19  no output activation
        )

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x01: (N, 3, H, W) RGB in [0, 1] (not [-1, 1]); H and W divisible by 8.

        Returns:
            (N, latent_channels, H/8, W/8) latents, roughly in [-3, 3], scale factor 1.
        """
        return self.encoder(x01)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents (N, latent_channels, h, w) to images (N, 3, 8h, 8w) clamped to [0, 1]."""
        return self.decoder(z).clamp(0.0, 1.0)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x01``: decode(encode(x01))."""
        return self.decode(self.encode(x01))


def _shape_report(model: nn.Module, state: dict, part: str) -> list[str]:
    """Human-readable differences between a module's state dict and ``state`` (empty if they match)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    for key in sorted(expected.keys() - got.keys()):
        problems.append(f"{part} missing key '{key}' (expected shape {expected[key]})")
    for key in sorted(got.keys() - expected.keys()):
        problems.append(f"{part} unexpected key '{key}' (shape {got[key]})")
    for key in sorted(expected.keys() & got.keys()):
        if expected[key] != got[key]:
            problems.append(f"{part} key '{key}': expected shape {expected[key]}, got {got[key]}")
    return problems


def _last_conv_weight(state: dict, part: str) -> torch.Tensor:
    """The 4-D weight with the highest top-level Sequential index (the encoder's latent projection)."""
    candidates = []
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head.isdigit() and rest == "weight" and value.ndim == 4:
            candidates.append((int(head), key))
    if not candidates:
        raise ValueError(f"{part} state dict has no top-level conv weight like '14.weight'; keys: {list(state)[:5]}...")
    return state[max(candidates)[1]]


def load_pretrained_tiny_autoencoder(encoder_state: dict, decoder_state: dict) -> TinyAutoencoder:
    """Build a TinyAutoencoder matching already-loaded TAESD-family state dicts, load them, freeze it.

    Latent channels come from the encoder's final conv, the width from its first conv, and the
    GroupNorm midblock from the presence of ``pool.`` keys, so taesd/taef1-style files would fit too.

    Args:
        encoder_state: state dict of the encoder ``nn.Sequential`` (e.g. ``torch.load("taef2_encoder.pth")``).
        decoder_state: state dict of the decoder ``nn.Sequential``.

    Returns:
        The model in fp32, eval mode, with ``requires_grad=False`` on every parameter.

    Raises:
        ValueError: a key is missing, unexpected or has the wrong shape; the message lists each
            offending key with expected and actual shapes.
    """
    latent_channels = _last_conv_weight(encoder_state, "encoder").shape[0]
    width = encoder_state["0.weight"].shape[0] if "0.weight" in encoder_state else 64
    midblock_gn = any(".pool." in k for k in encoder_state) or any(".pool." in k for k in decoder_state)
    model = TinyAutoencoder(latent_channels=latent_channels, width=width, midblock_gn=midblock_gn)

    # Upstream ships fp16; CPU convs in fp16 are slow or unsupported, and fp32 costs only ~5 MB here.
    encoder_state = {k: v.float() if v.is_floating_point() else v for k, v in encoder_state.items()}
    decoder_state = {k: v.float() if v.is_floating_point() else v for k, v in decoder_state.items()}
    problems = _shape_report(model.encoder, encoder_state, "encoder")
    problems += _shape_report(model.decoder, decoder_state, "decoder")
    if problems:
        raise ValueError(
            f"TAESD state dict does not fit TinyAutoencoder(latent_channels={latent_channels}, width={width}, "
            f"midblock_gn={midblock_gn}):\n  " + "\n  ".join(problems)
        )
    model.encoder.load_state_dict(encoder_state, strict=True)
    model.decoder.load_state_dict(decoder_state, strict=True)
    return freeze(model)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and switch to eval mode; returns the same module for chaining.

    Note that a later ``parent.train()`` flips the mode back; TinyAutoencoder has no dropout or
    batch norm, so its mode does not change its outputs, but ``requires_grad`` stays off.
    """
    module.requires_grad_(False)
    module.eval()
    return module


def parameter_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and exact bytes of every parameter and buffer.

    Deterministic across calls and processes; any change of a single bit changes the digest. It
    copies every tensor to the CPU once, so call it on small models or rarely on large ones.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint '{name}': it is a meta tensor without data")
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        # Read the raw bytes directly: bytes(storage) iterates element by element (minutes for a few MB),
        # and models/ must not depend on numpy for .numpy().
        digest.update(ctypes.string_at(data.data_ptr(), data.numel() * data.element_size()))
    return digest.hexdigest()


def autoencoder_loss(
    model: TinyAutoencoder, x01: torch.Tensor, latent_weight: float = 1e-3
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction loss for training the small fallback autoencoder.

    Args:
        model: a trainable TinyAutoencoder.
        x01: (N, 3, H, W) images in [0, 1].
        latent_weight: weight of the mean squared latent; a small pull towards 0 keeps latents
            roughly inside the decoder's soft-clamp range [-3, 3], where diffusion expects them.

    Returns:
        ``(loss, metrics)``: the scalar loss (L1 + MSE + latent penalty) and detached 0-d tensors
        ``l1``, ``mse``, ``latent_l2``, ``psnr`` (call ``float()`` when logging).
    """
    z = model.encoder(x01)  # (N, C_lat, H/8, W/8)
    # The unclamped decoder output: clamping to [0, 1] would zero the gradient of overshooting pixels.
    recon = model.decoder(z)  # (N, 3, H, W)
    l1 = (recon - x01).abs().mean()
    mse = (recon - x01).pow(2).mean()
    latent_l2 = z.pow(2).mean()
    loss = l1 + mse + latent_weight * latent_l2
    with torch.no_grad():
        clamped_mse = (recon.clamp(0.0, 1.0) - x01).pow(2).mean()
        psnr = -10.0 * torch.log10(clamped_mse.clamp_min(1e-10))
    metrics = {"l1": l1.detach(), "mse": mse.detach(), "latent_l2": latent_l2.detach(), "psnr": psnr}
    return loss, metrics

"""TinyAutoencoder: strict loading of the real TAEF2 weights, reconstruction quality, freezing, fallback training."""

from __future__ import annotations

import copy
import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    from _shared_data import require_shared
except ImportError:  # tests/ imported as a package
    from tests._shared_data import require_shared

from models.vae import (
    TinyAutoencoder,
    autoencoder_loss,
    freeze,
    load_pretrained_tiny_autoencoder,
    parameter_fingerprint,
)


def load_taef2_states() -> tuple[dict, dict]:
    encoder_path = require_shared("taesd/taef2_encoder.pth")
    decoder_path = require_shared("taesd/taef2_decoder.pth")
    return (
        torch.load(encoder_path, map_location="cpu", weights_only=True),
        torch.load(decoder_path, map_location="cpu", weights_only=True),
    )


@pytest.fixture(scope="module")
def taef2() -> TinyAutoencoder:
    return load_pretrained_tiny_autoencoder(*load_taef2_states())


def fashion_mnist_rgb(count: int, size: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST test images as (count, 3, size, size) RGB in [0, 1]."""
    path = require_shared("fashion-mnist/t10k-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)[:count]  # skip idx header
    grey = torch.from_numpy(pixels.copy()).float() / 255.0  # (N, 1, 28, 28)
    rgb = grey.expand(-1, 3, -1, -1)  # (N, 3, 28, 28)
    return F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (-10.0 * torch.log10((a - b).pow(2).mean())).item()


def test_taef2_loads_strictly_and_is_taef2_sized(taef2):
    assert (taef2.latent_channels, taef2.width, taef2.midblock_gn) == (32, 64, True)
    encoder_params = sum(p.numel() for p in taef2.encoder.parameters())
    decoder_params = sum(p.numel() for p in taef2.decoder.parameters())
    assert (encoder_params, decoder_params) == (1_338_528, 1_338_499)  # NOTES.md
    assert all(p.dtype == torch.float32 for p in taef2.parameters())


def test_taef2_reconstructs_fashion_mnist_64px(taef2):
    images = fashion_mnist_rgb(32, 64)
    with torch.no_grad():
        latents = taef2.encode(images)
        recon = taef2.decode(latents)
    assert latents.shape == (32, 32, 8, 8)
    assert recon.shape == images.shape
    assert recon.min() >= 0.0 and recon.max() <= 1.0
    assert psnr(recon, images) > 25.0  # NOTES.md measured 29.8 dB on 256 images
    assert latents.abs().max() < 8.0  # roughly [-3, 3] with a few outliers (NOTES: about [-4.2, 4.5])


def test_taef2_is_frozen_and_stays_unchanged(taef2):
    assert not any(p.requires_grad for p in taef2.parameters())
    assert not taef2.training
    before = parameter_fingerprint(taef2)
    assert before == parameter_fingerprint(taef2)

    # The VAE's parameters are in the optimizer too (with weight decay): only frozen parameters getting
    # no gradient keeps SGD from moving them.
    head = torch.nn.Conv2d(32, 1, kernel_size=1)
    optimizer = torch.optim.SGD([*head.parameters(), *taef2.parameters()], lr=0.1, weight_decay=0.1)
    images = torch.rand(2, 3, 32, 32)
    loss = head(taef2.encode(images)).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in taef2.parameters())
    assert parameter_fingerprint(taef2) == before

    changed = copy.deepcopy(taef2)
    with torch.no_grad():
        changed.decoder[19].bias[0] += 1e-3  # a real change must change the fingerprint
    assert parameter_fingerprint(changed) != before


def test_wrong_shape_raises_value_error_naming_key():
    encoder_state, decoder_state = load_taef2_states()
    encoder_state = dict(encoder_state)
    encoder_state["3.conv.0.weight"] = torch.zeros(64, 64, 1, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"3\.conv\.0\.weight.*expected shape \(64, 64, 3, 3\), got \(64, 64, 1, 1\)"):
        load_pretrained_tiny_autoencoder(encoder_state, decoder_state)

    decoder_state = {k: v for k, v in decoder_state.items() if k != "19.bias"}
    with pytest.raises(ValueError, match=r"decoder missing key '19\.bias'"):
        load_pretrained_tiny_autoencoder(load_taef2_states()[0], decoder_state)


def test_small_variant_shapes_and_freeze():
    model = TinyAutoencoder(latent_channels=8, width=32, midblock_gn=True)
    x = torch.rand(2, 3, 32, 32)
    assert model.encode(x).shape == (2, 8, 4, 4)
    assert model(x).shape == (2, 3, 32, 32)
    assert model.downsample_factor == 8
    assert freeze(model) is model and not any(p.requires_grad for p in model.parameters())


def test_small_variant_trains_with_autoencoder_loss():
    torch.manual_seed(0)
    model = TinyAutoencoder(latent_channels=8, width=32)
    # Smooth synthetic images: low-resolution noise upsampled, so there is structure to learn.
    images = F.interpolate(torch.rand(4, 3, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first_loss, metrics = autoencoder_loss(model, images)
    assert set(metrics) == {"l1", "mse", "latent_l2", "psnr"}
    for _ in range(10):
        loss, metrics = autoencoder_loss(model, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final_loss, _ = autoencoder_loss(model, images)
    assert final_loss.item() < 0.7 * first_loss.item(), (first_loss.item(), final_loss.item())


def test_latent_statistics_use_a_random_subset_not_the_first_images(monkeypatch):
    from tasks import vae_train

    # Class-ordered shards: the first 512 images are black, the next 512 white.
    batches = [{"image": torch.full((64, 3, 8, 8), float(i >= 8)), "label": torch.full((64,), int(i >= 8))}
               for i in range(16)]
    monkeypatch.setattr(vae_train, "evaluation_batches", lambda spec: iter(batches))
    model = TinyAutoencoder(latent_channels=4, width=8, midblock_gn=False)
    model.encode = lambda x: x[:, :1, ::8, ::8]  # latent = the pixel value: the stats show which images were taken
    spec = vae_train.rgb01_spec(("unused.tar",), 8, batch_size=64)
    stats = vae_train.latent_statistics(model, spec, max_images=512, seed=0)
    assert 0.3 < stats["mean"][0] < 0.7 and stats["std"][0] > 0.4
    assert stats == vae_train.latent_statistics(model, spec, max_images=512, seed=0)

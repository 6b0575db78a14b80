"""Scoring generated images with a classifier: accuracy against the conditioning labels and a
Fréchet distance in the classifier's feature space, each beside the same number for real images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.devices import module_device


@dataclass
class ImageClassifier:
    """A classifier (``embed`` gives its penultimate features, ``head`` maps them to logits, as
    ``VisionTransformer`` and ``ConvNetClassifier`` do) plus how to turn RGB images in [0, 1] into its inputs."""

    model: nn.Module
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def prepare(self, rgb01: torch.Tensor) -> torch.Tensor:
        """Classifier inputs, on the device of ``rgb01``."""
        x = rgb01.mean(dim=1, keepdim=True) if self.channels == 1 else rgb01  # grey classifiers see luminance
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def logits_and_features(self, rgb01: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), penultimate features (N, D)) on the CPU for RGB images in [0, 1] on any device;
        the classifier runs where its weights live."""
        self.model.eval()
        device = module_device(self.model)
        logits, features = [], []
        for start in range(0, len(rgb01), batch_size):
            pooled = self.model.embed(self.prepare(rgb01[start:start + batch_size].to(device)))  # (n, D)
            features.append(pooled.float().cpu())
            logits.append(self.model.head(pooled).float().cpu())
        return torch.cat(logits), torch.cat(features)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa) + tr(Σb) − 2·tr((Σa^½ Σb Σa^½)^½), as FID computes it.

    The matrix square root comes from symmetric eigendecompositions in float64 (no scipy), and
    tiny negative eigenvalues from round-off are clipped to zero.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


def quality_scores(classifier: ImageClassifier, generated: torch.Tensor, generated_labels: torch.Tensor,
                   real: torch.Tensor, real_labels: torch.Tensor,
                   reconstructed: torch.Tensor | None = None) -> dict[str, float]:
    """Sample accuracy and Fréchet distance, with the real-image ceiling and floor beside them; with
    ``reconstructed`` (the real images through the VAE), also the accuracy on those: the ceiling for
    samples decoded by the same VAE, which tells a VAE's limit from the generator's."""
    accuracy = lambda logits, labels: float((logits.argmax(1) == labels.cpu()).float().mean())  # noqa: E731
    gen_logits, gen_features = classifier.logits_and_features(generated)
    real_logits, real_features = classifier.logits_and_features(real)
    half = len(real_features) // 2
    scores = {
        "sample_accuracy": accuracy(gen_logits, generated_labels),
        "real_accuracy": accuracy(real_logits, real_labels),
        "frechet_distance": frechet_distance(gen_features, real_features),
        "real_frechet_distance": frechet_distance(real_features[:half], real_features[half:2 * half]),
    }
    if reconstructed is not None:
        scores["reconstruction_accuracy"] = accuracy(classifier.logits_and_features(reconstructed)[0], real_labels)
    return scores

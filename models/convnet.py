"""A small VGG-style convolutional classifier: the DiT stage's judge of its samples.

A measuring instrument, not a model the pipeline studies: FID scores generators with a fixed CNN
(Inception) for the same reason. Convolutions with batch norm learn small grey images in a few hundred
steps, where a ViT of the same cost is still far from converged (on 32 px Fashion-MNIST, 300 steps × 64:
the nano ViT judge scored 77.5% of the real val images, this net 91%).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv_bn_relu(in_chans: int, out_chans: int) -> list[nn.Module]:
    return [nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False), nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True)]


class ConvNetClassifier(nn.Module):
    """Stages of two 3×3 conv-BN-ReLU layers, each stage but the last followed by 2×2 max pooling;
    global average pooling gives the feature vector (``embed``), a linear layer the logits.

    Args:
        in_chans: image channels.
        num_classes: logits per image.
        widths: channels of each stage; the image side halves between stages, so it must be divisible
            by 2 ** (len(widths) - 1).
    """

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        if not widths or num_classes < 1:
            raise ValueError(f"need at least one stage and one class, got widths={widths}, num_classes={num_classes}")
        layers: list[nn.Module] = []
        for index, width in enumerate(widths):
            previous = in_chans if index == 0 else widths[index - 1]
            layers += _conv_bn_relu(previous, width) + _conv_bn_relu(width, width)
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)
        self.downsample = 2 ** (len(widths) - 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> features (N, widths[-1]): the penultimate layer, as FID uses Inception's."""
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(f"image side {tuple(x.shape[-2:])} is not divisible by {self.downsample} "
                             f"(the net pools {self.downsample.bit_length() - 1} times)")
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> logits (N, num_classes)."""
        return self.head(self.embed(x))

"""End-to-end fine-tuning of a ViT classifier on the shared engine (MAE's recipe, scaled down):
layer-wise lr decay, drop path, label smoothing and crop/flip augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_shards.loader import LoaderSpec, evaluation_batches, training_batches
from models.vit import VisionTransformer
from tasks.config import TrainConfig
from tasks.engine import TrainJob, TrainSummary, no_weight_decay, seed_everything, train


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Parameter groups whose lr shrinks by ``layer_decay`` per layer below the head (BEiT/MAE)."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, plain = layer_id(name, depth), no_weight_decay(name, param)
        group = groups.setdefault((layer, plain), {
            "params": [], "weight_decay": 0.0 if plain else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def classification_loss(label_smoothing: float):
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["image"])
        return F.cross_entropy(logits, batch["label"], label_smoothing=label_smoothing), {}
    return loss_fn


def train_classifier(
    model: VisionTransformer, loader: LoaderSpec, train_config: TrainConfig, checkpoint_dir: Path,
    signature: dict[str, Any], layer_decay: float, label_smoothing: float, log_metrics=None,
    stop_after: int | None = None,
) -> TrainSummary:
    """Fine-tune (or, from random weights, train from scratch) ``model`` with the shared engine."""
    seed_everything(train_config.seed)
    job = TrainJob(
        model=model, loss_fn=classification_loss(label_smoothing),
        batches=lambda epoch, skip: training_batches(loader, epoch, skip), config=train_config,
        checkpoint_dir=checkpoint_dir, signature=signature, log_metrics=log_metrics,
        param_groups=lambda m, wd: layer_decay_groups(m, wd, layer_decay), stop_after=stop_after,
    )
    return train(job)


@torch.no_grad()
def predict(model: nn.Module, loader: LoaderSpec, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, true classes) over one ordered pass of the loader's split."""
    model.eval()
    predictions, labels = [], []
    for batch in evaluation_batches(loader):
        predictions.append(model(batch["image"].to(device)).argmax(dim=1).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(predictions), np.concatenate(labels)


def confusion_matrix(predicted: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def confusion_image(matrix: np.ndarray, cell: int = 24) -> np.ndarray:
    """A heat-map picture (H, W, 3 uint8) of a row-normalised confusion matrix, rows = true class."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    heat = (255 * (1 - rates)).astype(np.uint8)  # dark = frequent
    image = np.repeat(np.repeat(heat, cell, axis=0), cell, axis=1)
    rgb = np.stack([image, image, np.full_like(image, 255)], axis=-1)
    rgb[::cell, :, :] = rgb[:, ::cell, :] = 128  # grid lines
    return rgb

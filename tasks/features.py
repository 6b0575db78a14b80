"""Frozen-encoder features for evaluation: one pass of a ViT over a split, pooled per image.

The probes in ``tasks/probes.py`` train on these arrays, never on the encoder, so a split is encoded
once and every probe (kNN, logistic regression, BN + linear) reuses it. ``save_features`` /
``load_features`` keep them as an ``.npz`` next to the evaluation stage's outputs.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from data_shards.atomic import write_bytes_atomic
from data_shards.progress import progress
from models.vit import VisionTransformer

__all__ = ["POOLS", "extract_features", "random_subset", "save_features", "load_features"]

POOLS: tuple[str, ...] = ("token", "avg")
LABELS_KEY = "labels"
MISSING_LABEL = -1  # what the loader yields for a sample without a class


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch to eval for the block, then put back every submodule's own mode.

    ``module.train(was_training)`` alone would flatten a deliberately mixed state (say, a frozen
    BatchNorm kept in eval inside a training model), so each submodule's flag is restored.
    """
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


def _autocast(device: str) -> contextlib.AbstractContextManager:
    # bf16 only on CUDA: CPU bf16 matmuls are slow on most hosts and would change the features.
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch_labels(batch: dict, size: int) -> np.ndarray:
    labels = batch.get("label")
    if labels is None:
        return np.full(size, MISSING_LABEL, dtype=np.int64)
    return torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu().numpy()


@torch.no_grad()
def extract_features(
    encoder: VisionTransformer,
    batches: Iterable[dict],
    device: str = "cpu",
    pools: tuple[str, ...] = POOLS,
    blocks: int = 1,
) -> dict[str, np.ndarray]:
    """Encode every image of ``batches`` with a frozen encoder and pool each image to one vector.

    Args:
        encoder: the ViT to evaluate; it must already live on ``device`` (it is not moved, so the
            caller's model is left where it was). It runs in eval mode, and every submodule's
            training flag is restored afterwards, also on error.
        batches: dicts with "image" (N, C, H, W) float and "label" (N,) long, e.g.
            ``data_shards.loader.evaluation_batches(spec)``; a batch without "label" gets -1 labels.
        device: where the images go; on CUDA the forward runs under bf16 autocast.
        pools: which poolings to return, each "token" (class token) or "avg" (mean patch token).
        blocks: pool the outputs of this many last blocks (each through the final LayerNorm) and
            concatenate them, last block first; 1 is the usual final-layer feature.

    Returns:
        ``{pool: (N, blocks * D) float32 for each pool, "labels": (N,) int64}``, in the order of
        ``batches``.
    """
    unknown = [how for how in pools if how not in POOLS]
    if unknown or not pools:
        raise ValueError(f"pools must be a non-empty subset of {POOLS}, got {pools!r}")
    pooled: dict[str, list[np.ndarray]] = {how: [] for how in pools}
    labels: list[np.ndarray] = []
    with _eval_mode(encoder):
        for batch in progress(batches, "features: batches"):
            images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)  # (N, C, H, W)
            with _autocast(device):
                per_block = encoder.forward_last_blocks(images, blocks)[::-1]  # blocks x (N, 1 + L, D)
            for how in pools:
                vectors = torch.cat([encoder.pool(tokens, how) for tokens in per_block], dim=1)  # (N, blocks * D)
                pooled[how].append(vectors.float().cpu().numpy())
            labels.append(_batch_labels(batch, images.shape[0]))
    if not labels:
        raise ValueError("extract_features got no batches: the split is empty")
    features = {how: np.concatenate(chunks).astype(np.float32, copy=False) for how, chunks in pooled.items()}
    features[LABELS_KEY] = np.concatenate(labels)
    return features


def random_subset(batches: Iterable[dict[str, Any]], limit: int | None, seed: int,
                  batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """A seeded uniform random subset of ``limit`` samples of a batch stream, in stream order.

    Shards are often written class by class, so the first N samples are no sample of the split.
    Reservoir sampling takes the subset in one pass without knowing the split's size; it holds at
    most ``limit`` samples. ``limit`` None (or at least the stream's size) yields every sample.

    Args:
        batches: dicts of equal-length tensors (and lists) along the first dimension.
        limit: how many samples to keep; None keeps all (the batches pass through untouched).
        seed: the same seed and stream give the same subset.
        batch_size: size of the batches yielded.
    """
    if limit is None:
        yield from batches
        return
    rng = random.Random(seed)
    reservoir: list[tuple[int, dict[str, Any]]] = []
    seen = 0
    for batch in batches:
        for row in range(len(batch["image"])):
            slot = seen if seen < limit else rng.randrange(seen + 1)
            if slot < limit:
                # clone: a view would keep its whole batch alive
                sample = {k: v[row].clone() if torch.is_tensor(v) else v[row] for k, v in batch.items()}
                if slot == len(reservoir):
                    reservoir.append((seen, sample))
                else:
                    reservoir[slot] = (seen, sample)
            seen += 1
    reservoir.sort(key=lambda item: item[0])
    for start in range(0, len(reservoir), batch_size):
        rows = [sample for _, sample in reservoir[start:start + batch_size]]
        yield {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(rows[0][k]) else [r[k] for r in rows]
               for k in rows[0]}


def save_features(path: Path, features: dict[str, np.ndarray]) -> None:
    """Write ``features`` as an uncompressed ``.npz``; a reader never sees a half-written file.

    Args:
        path: destination file (parents are created); it is written to a temporary sibling and
            renamed over ``path`` in one step.
        features: arrays by name, e.g. the output of ``extract_features``.
    """
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(array) for name, array in features.items()})
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_features(path: Path) -> dict[str, np.ndarray]:
    """Read arrays written by ``save_features``.

    Args:
        path: an ``.npz`` file written by ``save_features``.

    Returns:
        arrays by name, fully loaded (the file is closed on return); pickled objects are refused.
    """
    with np.load(Path(path), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}

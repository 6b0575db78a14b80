"""The sample record every source yields, and the errors sources raise."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_shards.errors import BadInputError


class SourceError(BadInputError, ValueError):
    """A source that cannot be read; the message names the file, row or key at fault."""

    default_hint = ("point the source at readable data: --set shard.source.path=PATH and shard.source.kind=KIND "
                    "(pairs.source.* for the caption pairs); `patchflow config` shows the current values")


@dataclass
class RawSample:
    """One image with its optional label and caption, before encoding.

    Exactly one of ``pixels`` (an HxW or HxWxC uint8 array) and ``image_bytes`` (an encoded file
    whose format is ``image_ext``) is set. ``origin`` says where it came from for error messages.
    """

    key: str
    origin: str
    pixels: np.ndarray | None = None
    image_bytes: bytes | None = None
    image_ext: str = "png"
    label: int | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(*parts: object) -> str:
    """A WebDataset key: the key ends at the first dot of a member name, so no dots, no slashes."""
    return "_".join(_UNSAFE_KEY_CHARS.sub("-", str(part)).strip("-") for part in parts)


def split_off_validation(
    count: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_indices, val_indices) from a seeded permutation."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = int(round(count * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def take_subset(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``indices``, chosen by a seeded permutation, kept in source order."""
    if limit is None or limit >= len(indices):
        return indices
    chosen = np.random.default_rng(seed + 1).permutation(len(indices))[:limit]
    return np.sort(indices[chosen])

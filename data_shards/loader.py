"""Streaming loader over the shards, for training (infinite, shuffled) and evaluation (one pass).

Every (rank, worker) pair is a *slot*. Each epoch the shard list is permuted with a seed derived
from (seed, epoch); with at least as many shards as slots, shards are dealt to slots round-robin,
otherwise every slot reads all shards and keeps every n-th sample. Either way the slots see
disjoint samples whose union is the split, and the same seed gives the same batches.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("patchflow.loader")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class ShardError(RuntimeError):
    """A shard that cannot be read: the message names the shard and, where known, the key."""


@dataclass(frozen=True)
class LoaderSpec:
    """What to stream and how; every field is picklable so workers can rebuild the stream."""

    shard_paths: tuple[str, ...]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    image_size: int | None = None
    channels: int = 1
    augment: Literal["none", "flip", "crop_flip"] = "none"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    on_error: Literal["raise", "skip"] = "raise"
    drop_last: bool = True
    epoch: int = 0


def split_shards(manifest_path: str | Path, split: str) -> tuple[str, ...]:
    """Paths of a split's shards, as listed (and checksummed) in a shard stage's manifest."""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    splits = manifest["outputs"]["splits"]
    if split not in splits:
        raise KeyError(f"{manifest_path}: no split {split!r} (has {sorted(splits)})")
    return tuple(str(manifest_path.parent / shard["name"]) for shard in splits[split]["shards"])


def iterate_tar(path: str) -> Iterator[dict[str, Any]]:
    """Group a tar's members into samples by key (the member name up to its first dot)."""
    current: dict[str, Any] = {}
    try:
        with tarfile.open(path, mode="r|") as stream:
            for member in stream:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and key != current["__key__"]:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current[ext] = stream.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"shard {path}: corrupt or truncated tar after key {current.get('__key__')!r}: {exc}") from None
    if current:
        yield current


def decode_image(sample: dict[str, Any], channels: int) -> torch.Tensor:
    """(C, H, W) uint8 tensor from the sample's image member."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member (has {sorted(k for k in sample if k != '__key__')})")
    image = Image.open(io.BytesIO(sample[ext]))
    image = image.convert("L" if channels == 1 else "RGB")
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, channels).permute(2, 0, 1)


def _augment(image: torch.Tensor, spec: LoaderSpec, rng: random.Random) -> torch.Tensor:
    if spec.augment == "crop_flip":
        # Random-resized-crop lite: scale 0.35–1 of the area, as MAE's pretraining recipe.
        _, height, width = image.shape
        area = height * width * rng.uniform(0.35, 1.0)
        side_h = min(height, max(1, int(round(area ** 0.5))))
        side_w = min(width, max(1, int(round(area / side_h))))
        top, left = rng.randint(0, height - side_h), rng.randint(0, width - side_w)
        image = image[:, top:top + side_h, left:left + side_w]
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if spec.augment in ("flip", "crop_flip") and rng.random() < 0.5:
        image = image.flip(-1)
    return image


def to_model_input(image: torch.Tensor, spec: LoaderSpec, rng: random.Random | None = None) -> torch.Tensor:
    """uint8 (C, H, W) → float, resized, augmented (training only), normalised."""
    image = image.float().div_(255.0)
    if spec.image_size is not None and tuple(image.shape[-2:]) != (spec.image_size, spec.image_size):
        image = F.interpolate(image[None], size=(spec.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)[0]
    if rng is not None:
        image = _augment(image, spec, rng)
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (image - mean) / std


class ShardStream(IterableDataset):
    """One pass over this slot's share of the shards for ``spec.epoch``, decoded and transformed."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        if not spec.shard_paths:
            raise ValueError("no shards to read")
        self.spec = spec
        self.skipped = 0

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = info.id if info else 0
        return self.spec.rank * workers + worker, self.spec.world_size * workers

    def _raw_samples(self, slot: int, slots: int) -> Iterator[tuple[str, dict[str, Any]]]:
        shards = list(self.spec.shard_paths)
        if self.spec.shuffle:
            random.Random(self.spec.seed * 1_000_003 + self.spec.epoch).shuffle(shards)
        if len(shards) >= slots:
            for path in shards[slot::slots]:
                for sample in iterate_tar(path):
                    yield path, sample
            return
        index = 0
        for path in shards:
            for sample in iterate_tar(path):
                if index % slots == slot:
                    yield path, sample
                index += 1

    def _shuffled(self, samples: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        if not self.spec.shuffle or self.spec.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[Any] = []
        for item in samples:
            buffer.append(item)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, path: str, sample: dict[str, Any], rng: random.Random | None) -> dict[str, Any] | None:
        try:
            image = decode_image(sample, self.spec.channels)
        except (OSError, ValueError, SyntaxError) as exc:
            message = f"shard {path} key {sample['__key__']!r}: cannot decode image ({exc})"
            if self.spec.on_error == "raise":
                raise ShardError(message) from None
            self.skipped += 1
            log.warning("skipping sample (%d skipped so far in this worker): %s", self.skipped, message)
            return None
        return {
            "image": to_model_input(image, self.spec, rng),
            "label": int(sample["cls"]) if "cls" in sample else -1,
            "caption": sample["txt"].decode("utf-8") if "txt" in sample else "",
            "key": sample["__key__"],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        rng = random.Random(f"{self.spec.seed}/{self.spec.epoch}/{slot}")
        augment_rng = rng if self.spec.shuffle and self.spec.augment != "none" else None
        for path, sample in self._shuffled(self._raw_samples(slot, slots), rng):
            decoded = self._decode(path, sample, augment_rng)
            if decoded is not None:
                yield decoded


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def worker_context() -> multiprocessing.context.BaseContext:
    """Start loader workers from a fork server rather than by forking this process.

    Forking a process that runs Prefect (its API client threads and fork hooks) kills the
    workers with exit code 1; the fork server is a clean single-threaded process that has
    imported this module once, so each worker still starts in milliseconds.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_shards.loader"])
    return context


def epoch_loader(spec: LoaderSpec, epoch: int) -> DataLoader:
    """A DataLoader over one epoch of this rank's share."""
    # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG, so where an
    # epoch starts would shift the model's random stream (masks, dropout) and break exact resume.
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
    return DataLoader(
        ShardStream(replace(spec, epoch=epoch)), batch_size=spec.batch_size, num_workers=spec.num_workers,
        collate_fn=collate, drop_last=spec.drop_last, persistent_workers=False, generator=generator,
        multiprocessing_context=worker_context() if spec.num_workers > 0 else None,
    )


def training_batches(spec: LoaderSpec, start_epoch: int = 0, skip_batches: int = 0) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless ``(epoch, batch_index, batch)``; resume by passing the position a checkpoint saved.

    The stream never ends, so every DDP rank runs exactly the configured number of steps even when
    shards give ranks unequal sample counts (the cause of end-of-epoch hangs).
    """
    epoch = start_epoch
    while True:
        produced = 0
        for index, batch in enumerate(epoch_loader(spec, epoch)):
            produced += 1
            if epoch == start_epoch and index < skip_batches:
                continue
            yield epoch, index, batch
        if produced == 0:
            raise ShardError(f"epoch {epoch} produced no batch of {spec.batch_size} from {len(spec.shard_paths)} shard(s) on rank {spec.rank}")
        epoch += 1


def evaluation_batches(spec: LoaderSpec) -> Iterator[dict[str, Any]]:
    """One ordered pass over the whole split (no shuffle, no augmentation, keeps the last batch)."""
    yield from epoch_loader(replace(spec, shuffle=False, augment="none", drop_last=False), 0)

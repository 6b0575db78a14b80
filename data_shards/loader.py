"""Streaming loader over the shards, for training (infinite, shuffled) and evaluation (one pass).

Every (rank, worker) pair is a *slot*. Each epoch the shard list is permuted with a seed derived
from (seed, epoch) and laid end to end; slot i reads the i-th contiguous run of samples of that
sequence, sized by the manifest's per-shard sample counts. So every slot gets the same number of
samples (training drops the few left over, a different few each epoch; evaluation keeps them all),
ranks never drift apart at epoch ends, and the same seed gives the same batches.

Every shard is checked against the manifest beside it: a shard that yields fewer (or more) samples
than the manifest lists raises :class:`ShardError` naming it. A tar cut at a member boundary or with
a damaged header mid-file otherwise reads as a valid, shorter archive.
"""

from __future__ import annotations

import functools
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
from torchvision.transforms import v2

from data_shards.errors import BadInputError

log = logging.getLogger("patchflow.loader")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class ShardError(BadInputError, RuntimeError):
    """A shard that cannot be read: the message names the shard and, where known, the key."""


def _rebuild_hint(shard_path: str) -> str:
    # A finished shard stage is reused as long as its manifest exists: only deleting its folder rebuilds it.
    return f"delete the shard stage folder {Path(shard_path).parent} and run `patchflow run` again to rebuild it"


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
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (MAE's pretraining crop)
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


@functools.lru_cache(maxsize=64)
def _manifest_counts(manifest_path: str, mtime_ns: int) -> dict[str, int]:
    splits = json.loads(Path(manifest_path).read_text())["outputs"]["splits"]
    return {shard["name"]: int(shard["samples"]) for split in splits.values() for shard in split["shards"]}


def shard_sample_counts(shard_paths: tuple[str, ...]) -> tuple[int, ...]:
    """Each shard's sample count, as listed in the ``manifest.json`` written beside it.

    Raises:
        ShardError: a shard has no manifest beside it, or its manifest does not list it.
    """
    counts = []
    for path in shard_paths:
        manifest = Path(path).parent / "manifest.json"
        try:
            listed = _manifest_counts(str(manifest), manifest.stat().st_mtime_ns)
        except (OSError, ValueError, KeyError) as exc:
            raise ShardError(f"shard {path}: no readable manifest beside it ({manifest}: {exc}); "
                             f"the loader needs its sample count to detect truncation", hint=_rebuild_hint(path)) from None
        if Path(path).name not in listed:
            raise ShardError(f"shard {path}: not listed in {manifest}", hint=_rebuild_hint(path))
        counts.append(listed[Path(path).name])
    return tuple(counts)


def iterate_tar(path: str) -> Iterator[dict[str, Any]]:
    """Group a tar's members into samples by key (the member name up to its first dot).

    No count check: :func:`read_shard` is the reader that verifies against the manifest.
    """
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
        raise ShardError(f"shard {path}: corrupt or truncated tar after key {current.get('__key__')!r}: {exc}",
                         hint=_rebuild_hint(path)) from None
    if current:
        yield current


def read_shard(path: str, expected: int | None = None, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples ``start`` to ``stop`` of a shard that its manifest says holds ``expected`` samples
    (looked up in the manifest beside the shard when not given).

    Raises:
        ShardError: the tar ends before ``stop`` (or, read to its end, holds another count than
            ``expected``): a truncated shard or a damaged header, never a silently shorter epoch.
    """
    if expected is None:
        (expected,) = shard_sample_counts((path,))
    stop = expected if stop is None else stop
    index = 0
    for sample in iterate_tar(path):
        if index >= stop and stop < expected:
            return
        if index >= expected:
            raise ShardError(f"shard {path}: holds more than the {expected} samples its manifest lists "
                             f"(key {sample['__key__']!r}); the shard was replaced after it was written", hint=_rebuild_hint(path))
        if index >= start:
            yield sample
        index += 1
    if index < stop:
        raise ShardError(f"shard {path}: the manifest lists {expected} samples but the tar ends after {index} "
                         f"(truncated, or a damaged header mid-file)", hint=_rebuild_hint(path))


def slot_pieces(counts: list[int], order: list[int], slot: int, slots: int, equal: bool) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` runs making up one slot's share of the shards laid end to end in ``order``.

    ``equal`` gives every slot ``total // slots`` samples (the remainder is dropped), so ranks run the
    same number of batches; otherwise the shares cover every sample and differ by at most one.
    """
    total = sum(counts)
    if equal:
        share = total // slots
        first, last = slot * share, (slot + 1) * share
    else:
        first, last = slot * total // slots, (slot + 1) * total // slots
    pieces, offset = [], 0
    for shard in order:
        low, high = max(first, offset), min(last, offset + counts[shard])
        if low < high:
            pieces.append((shard, low - offset, high - offset))
        offset += counts[shard]
    return pieces


def decode_image(sample: dict[str, Any], channels: int) -> torch.Tensor:
    """(C, H, W) uint8 tensor from the sample's image member."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member (has {sorted(k for k in sample if k != '__key__')})")
    image = Image.open(io.BytesIO(sample[ext]))
    image = image.convert("L" if channels == 1 else "RGB")
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, channels).permute(2, 0, 1)


@functools.lru_cache(maxsize=8)
def _augmenter(augment: str, size: tuple[int, int], crop_scale: tuple[float, float]) -> v2.Transform:
    flip = v2.RandomHorizontalFlip(p=0.5)
    if augment == "flip":
        return flip
    # MAE's pretraining crop: RandomResizedCrop(scale=(0.2, 1)) with the default 3/4–4/3 aspect jitter.
    return v2.Compose([v2.RandomResizedCrop(size, scale=crop_scale, antialias=True), flip])


def _augment(image: torch.Tensor, spec: LoaderSpec, rng: random.Random) -> torch.Tensor:
    """torchvision's v2 transforms draw from torch's global RNG; seeding a forked copy of it from the
    slot's own stream keeps augmentation reproducible (exact resume) without touching the model's RNG."""
    transform = _augmenter(spec.augment, tuple(image.shape[-2:]), tuple(spec.crop_scale))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
        return transform(image)


def to_model_input(image: torch.Tensor, spec: LoaderSpec, rng: random.Random | None = None) -> torch.Tensor:
    """uint8 (C, H, W) → float, resized, augmented (training only), normalised."""
    image = image.float().div_(255.0)
    if spec.image_size is not None and tuple(image.shape[-2:]) != (spec.image_size, spec.image_size):
        image = F.interpolate(image[None], size=(spec.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)[0]
    if rng is not None and spec.augment != "none":
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
        self.counts = shard_sample_counts(spec.shard_paths)  # fails here, before any worker starts
        self.skipped = 0

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = info.id if info else 0
        return self.spec.rank * workers + worker, self.spec.world_size * workers

    def _raw_samples(self, slot: int, slots: int) -> Iterator[tuple[str, dict[str, Any]]]:
        order = list(range(len(self.spec.shard_paths)))
        if self.spec.shuffle:
            random.Random(self.spec.seed * 1_000_003 + self.spec.epoch).shuffle(order)
        for shard, start, stop in slot_pieces(list(self.counts), order, slot, slots, equal=self.spec.drop_last):
            path = self.spec.shard_paths[shard]
            for sample in read_shard(path, self.counts[shard], start, stop):
                yield path, sample

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
                raise ShardError(message, hint=_rebuild_hint(path)) from None
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
            raise ShardError(f"epoch {epoch} produced no batch of {spec.batch_size} from {len(spec.shard_paths)} shard(s) "
                             f"on rank {spec.rank}",
                             hint="lower the stage's train.batch_size, or raise the dataset's shard.source.max_* limits")
        epoch += 1


def evaluation_batches(spec: LoaderSpec) -> Iterator[dict[str, Any]]:
    """One ordered pass over the whole split (no shuffle, no augmentation, keeps the last batch)."""
    yield from epoch_loader(replace(spec, shuffle=False, augment="none", drop_last=False), 0)

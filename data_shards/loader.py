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
import http.client
import io
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards import remote
from data_shards.errors import BadInputError

log = logging.getLogger("patchflow.loader")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class ShardError(BadInputError, RuntimeError):
    """A shard that cannot be read: the message names the shard and, where known, the key."""


def _rebuild_hint(shard_path: str) -> str:
    if remote.is_remote(shard_path):
        return (f"check that {shard_path} is reachable and complete, and that the manifest.json beside it "
                f"({remote.sibling(shard_path, 'manifest.json')}) lists it")
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
    """Paths of a split's shards, as listed (and checksummed) in a shard stage's manifest: beside it,
    or at its ``location`` when the stage uploaded them (``shard.output``)."""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    splits = manifest["outputs"]["splits"]
    if split not in splits:
        raise KeyError(f"{manifest_path}: no split {split!r} (has {sorted(splits)})")
    location = manifest["outputs"].get("location")
    return tuple(f"{location}/{shard['name']}" if location else str(manifest_path.parent / shard["name"])
                 for shard in splits[split]["shards"])


@functools.lru_cache(maxsize=64)
def _manifest_shards(manifest_path: str, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """Each listed shard's ``(samples, largest image area in its split)``; ``mtime_ns`` keys the cache
    (0 for a remote manifest, read once per process)."""
    splits = json.loads(remote.read_bytes(manifest_path))["outputs"]["splits"]
    listed = {}
    for split in splits.values():
        sizes = [h * w for h, w in (map(int, size.split("x")) for size in split.get("image_sizes", {}))]
        for shard in split["shards"]:
            listed[shard["name"]] = (int(shard["samples"]), max(sizes, default=0))
    return listed


def _manifest_entries(shard_paths: tuple[str, ...]) -> list[tuple[int, int]]:
    entries = []
    for path in shard_paths:
        far = remote.is_remote(path)
        manifest = remote.sibling(path, "manifest.json") if far else str(Path(path).parent / "manifest.json")
        try:
            listed = _manifest_shards(manifest, 0 if far else Path(manifest).stat().st_mtime_ns)
        except Exception as exc:  # noqa: BLE001 - whatever the store or the file says, named with the manifest
            raise ShardError(f"shard {path}: no readable manifest beside it ({manifest}: {exc}); "
                             f"the loader needs its sample count to detect truncation", hint=_rebuild_hint(path)) from None
        name = remote.file_name(path)
        if name not in listed:
            raise ShardError(f"shard {path}: not listed in {manifest}", hint=_rebuild_hint(path))
        entries.append(listed[name])
    return entries


def shard_sample_counts(shard_paths: tuple[str, ...]) -> tuple[int, ...]:
    """Each shard's sample count, as listed in the ``manifest.json`` written beside it.

    Raises:
        ShardError: a shard has no manifest beside it, or its manifest does not list it.
    """
    return tuple(samples for samples, _ in _manifest_entries(shard_paths))


def decoded_bytes(shard_paths: tuple[str, ...], channels: int) -> int:
    """What holding every image of these shards decoded (uint8) would take, from their manifests."""
    return sum(samples * area * channels for samples, area in _manifest_entries(shard_paths))


def iterate_tar(path: str) -> Iterator[dict[str, Any]]:
    """Group a tar's members into samples by key (the member name up to its first dot).

    No count check: :func:`read_shard` is the reader that verifies against the manifest.
    """
    current: dict[str, Any] = {}
    try:
        with remote.open_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|") as stream:
            for member in stream:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and key != current["__key__"]:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current[ext] = stream.extractfile(member).read()
            raw.read()  # past the end-of-archive blocks to the end: a pipe: command's failure shows only there
    except (tarfile.TarError, OSError, EOFError, http.client.HTTPException) as exc:
        if remote.is_permanent(exc):  # an object store may say so only at the first read
            reason = exc if isinstance(exc, remote.PermanentReadError) else remote.PermanentReadError(f"{path}: {exc}")
            raise ShardError(f"shard {path}: cannot be read: {exc}", hint=_rebuild_hint(path)) from reason
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
    if not remote.is_remote(path):
        yield from _read_counted(path, expected, start, stop)
        return
    # A remote read that fails (a dropped connection reads as a truncated tar) is tried again from the
    # shard's start, skipping the samples already delivered: the same samples in the same order.
    for attempt in range(1, remote.ATTEMPTS + 1):
        try:
            for sample in _read_counted(path, expected, start, stop):
                yield sample
                start += 1
            return
        except ShardError as exc:
            if isinstance(exc.__cause__, remote.PermanentReadError):
                raise
            if attempt == remote.ATTEMPTS:
                raise ShardError(f"{exc} (gave up after {attempt} attempts)", hint=exc.hint) from None
            remote.pause_before_retry(path, attempt, exc)


def _read_counted(path: str, expected: int, start: int, stop: int) -> Iterator[dict[str, Any]]:
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


@dataclass(frozen=True)
class Decoded:
    """One sample with its image decoded to uint8 (C, H, W), or the reason it could not be."""

    path: str
    key: str
    image: torch.Tensor | None
    label: int
    caption: str
    error: str | None = None


def decode_sample(path: str, sample: dict[str, Any], channels: int) -> Decoded:
    label = int(sample["cls"]) if "cls" in sample else -1
    caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
    try:
        return Decoded(path, sample["__key__"], decode_image(sample, channels), label, caption)
    except (OSError, ValueError, SyntaxError) as exc:
        return Decoded(path, sample["__key__"], None, label, caption, error=f"cannot decode image ({exc})")


class DecodedShards:
    """Shards decoded once and kept in this process, least recently used out first, within a byte budget.

    Small datasets (Fashion-MNIST, CIFAR-10, the emoji pairs) then cost one decode per process instead
    of a tar read and a PNG decode per sample per epoch, and need no loader worker competing with the
    training threads for the cores.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[tuple, tuple[list[Decoded], int]] = OrderedDict()  # key → (records, bytes)
        self.bytes = 0

    def get(self, path: str, expected: int, channels: int) -> list[Decoded]:
        stat = None if remote.is_remote(path) else Path(path).stat()  # a remote shard is not rewritten in place
        key = (path, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0, channels)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        records = [decode_sample(path, sample, channels) for sample in read_shard(path, expected)]
        size = sum(r.image.numel() for r in records if r.image is not None)
        while self.entries and self.bytes + size > self.budget_bytes:
            self.bytes -= self.entries.popitem(last=False)[1][1]
        self.entries[key] = (records, size)
        self.bytes += size
        return records


DECODED_CACHE = DecodedShards(int(os.environ.get("PATCHFLOW_DECODED_CACHE_MB", "1024")) * 2**20)


def in_memory(spec: LoaderSpec) -> bool:
    """Whether the spec's shards, decoded, fit this process's cache (then no worker processes are used)."""
    return decoded_bytes(spec.shard_paths, spec.channels) <= DECODED_CACHE.budget_bytes


def random_resized_crop_boxes(count: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float] = (3 / 4, 4 / 3),
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """(count, 4) integer boxes (top, left, height, width), drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws one: up to ten tries of an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, else the centre crop at the nearest allowed ratio. Vectorised."""
    tries = 10
    area = torch.empty(count, tries).uniform_(scale[0], scale[1], generator=generator) * (height * width)
    aspect = torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp_()
    box_w, box_h = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits, as get_params stops there
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    source_ratio = width / height
    if source_ratio < min(ratio):
        centre_w, centre_h = width, round(width / min(ratio))
    elif source_ratio > max(ratio):
        centre_w, centre_h = round(height * max(ratio)), height
    else:
        centre_w, centre_h = width, height
    found = fits.any(dim=1)
    box_h = torch.where(found, box_h, torch.tensor(float(centre_h)))
    box_w = torch.where(found, box_w, torch.tensor(float(centre_w)))
    top = (torch.rand(count, generator=generator) * (height - box_h + 1)).floor_()
    left = (torch.rand(count, generator=generator) * (width - box_w + 1)).floor_()
    top = torch.where(found, top, ((height - box_h) / 2).floor())
    left = torch.where(found, left, ((width - box_w) / 2).floor())
    return torch.stack([top, left, box_h, box_w], dim=1).long()


def _sample_points(start: torch.Tensor, extent: torch.Tensor, out: int, full: int) -> torch.Tensor:
    """(N, out) coordinates in [-1, 1] (``align_corners=True``) where bilinear resizing of the span
    [start, start + extent) to ``out`` pixels samples: F.interpolate's half-pixel rule, clamped to the span."""
    centres = (torch.arange(out, dtype=torch.float32) + 0.5) / out
    points = start[:, None] + centres[None] * extent[:, None] - 0.5
    points = torch.minimum(torch.maximum(points, start[:, None]), (start + extent - 1)[:, None])
    return points / max(full - 1, 1) * 2 - 1


def resized_crop_batch(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                       flips: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box resized (bilinear) to ``size`` and mirrored where ``flips``: per sample what
    ``v2.functional.resized_crop`` gives for an enlarging crop, for the whole batch in one ``grid_sample``."""
    top, left, box_h, box_w = boxes.to(torch.float32).unbind(dim=1)
    ys = _sample_points(top, box_h, size[0], images.shape[-2])
    xs = _sample_points(left, box_w, size[1], images.shape[-1])
    if flips is not None:
        xs = torch.where(flips[:, None], xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (N, H, W, [x, y])
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def _float_batch(images: list[torch.Tensor], size: int | None) -> torch.Tensor:
    """uint8 images → one float (N, C, H, W) batch in [0, 1], resized to ``size`` where given."""
    def resized(batch: torch.Tensor) -> torch.Tensor:
        if size is None or tuple(batch.shape[-2:]) == (size, size):
            return batch
        return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    if len({tuple(image.shape) for image in images}) == 1:
        return resized(torch.stack(images).float().div_(255.0))
    if size is None:
        raise ValueError(f"images of different sizes {sorted({tuple(i.shape) for i in images})} in one batch "
                         f"and no image_size to resize them to")
    return torch.cat([resized(image[None].float().div_(255.0)) for image in images])


def batch_to_model_input(images: list[torch.Tensor], spec: LoaderSpec,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (C, H, W) images → one float batch: resized, augmented (with ``generator``), normalised.

    Augmentation runs on the whole batch: MAE's RandomResizedCrop(scale=crop_scale, ratio 3/4-4/3) and
    a horizontal flip with probability 1/2, both drawn from ``generator`` (never torch's global RNG, so
    the model's random stream and an exact resume are untouched).
    """
    batch = _float_batch(images, spec.image_size)
    if generator is not None and spec.augment != "none":
        flips = torch.rand(len(batch), generator=generator) < 0.5
        if spec.augment == "flip":
            batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
        else:
            height, width = batch.shape[-2:]
            boxes = random_resized_crop_boxes(len(batch), height, width, spec.crop_scale, generator=generator)
            batch = resized_crop_batch(batch, boxes, (height, width), flips)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return batch.sub_(mean).div_(std)


def to_model_input(image: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """One uint8 (C, H, W) image → float, resized, normalised (no augmentation)."""
    return batch_to_model_input([image], spec)[0]


class ShardStream(IterableDataset):
    """This slot's batches of its share of the shards for ``spec.epoch``, decoded and transformed."""

    def __init__(self, spec: LoaderSpec, cached: bool = False):
        super().__init__()
        if not spec.shard_paths:
            raise ValueError("no shards to read")
        self.spec = spec
        self.cached = cached  # read decoded shards from DECODED_CACHE rather than the tars
        self.counts = shard_sample_counts(spec.shard_paths)  # fails here, before any worker starts
        self.skipped = 0

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = info.id if info else 0
        return self.spec.rank * workers + worker, self.spec.world_size * workers

    def _records(self, slot: int, slots: int) -> Iterator[Decoded | tuple[str, dict[str, Any]]]:
        """Decoded samples (cached) or (path, raw sample) pairs (streamed, decoded after the shuffle
        buffer so that it holds compressed bytes)."""
        order = list(range(len(self.spec.shard_paths)))
        if self.spec.shuffle:
            random.Random(self.spec.seed * 1_000_003 + self.spec.epoch).shuffle(order)
        for shard, start, stop in slot_pieces(list(self.counts), order, slot, slots, equal=self.spec.drop_last):
            path = self.spec.shard_paths[shard]
            if self.cached:
                yield from DECODED_CACHE.get(path, self.counts[shard], self.spec.channels)[start:stop]
            else:
                for sample in read_shard(path, self.counts[shard], start, stop):
                    yield path, sample

    def _shuffled(self, records: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        if not self.spec.shuffle or self.spec.shuffle_buffer <= 1:
            yield from records
            return
        buffer: list[Any] = []
        for item in records:
            buffer.append(item)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _usable(self, records: Iterator[Any]) -> Iterator[Decoded]:
        for record in records:
            decoded = record if isinstance(record, Decoded) else decode_sample(*record, self.spec.channels)
            if decoded.error is None:
                yield decoded
                continue
            message = f"shard {decoded.path} key {decoded.key!r}: {decoded.error}"
            if self.spec.on_error == "raise":
                raise ShardError(message, hint=_rebuild_hint(decoded.path))
            self.skipped += 1
            log.warning("skipping sample (%d skipped so far in this worker): %s", self.skipped, message)

    def _batch(self, samples: list[Decoded], generator: torch.Generator | None) -> dict[str, Any]:
        try:
            images = batch_to_model_input([s.image for s in samples], self.spec, generator)
        except ValueError as exc:
            raise ShardError(f"shard {samples[0].path} keys {samples[0].key!r}..{samples[-1].key!r}: {exc}",
                             hint="set the stage's image_size") from None
        return {"image": images, "label": torch.tensor([s.label for s in samples], dtype=torch.long),
                "caption": [s.caption for s in samples], "key": [s.key for s in samples]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        rng = random.Random(f"{self.spec.seed}/{self.spec.epoch}/{slot}")
        augmenting = self.spec.shuffle and self.spec.augment != "none"
        pending: list[Decoded] = []
        for sample in self._usable(self._shuffled(self._records(slot, slots), rng)):
            pending.append(sample)
            if len(pending) == self.spec.batch_size:
                generator = torch.Generator().manual_seed(rng.getrandbits(63)) if augmenting else None
                yield self._batch(pending, generator)
                pending = []
        if pending and not self.spec.drop_last:
            yield self._batch(pending, None)


def worker_context() -> multiprocessing.context.BaseContext:
    """Start loader workers from a fork server rather than by forking this process.

    Forking a process that runs Prefect (its API client threads and fork hooks) kills the
    workers with exit code 1; the fork server is a clean single-threaded process that has
    imported this module once, so each worker still starts in milliseconds.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_shards.loader"])
    return context


def epoch_loader(spec: LoaderSpec, epoch: int) -> Iterable[dict[str, Any]]:
    """The batches of one epoch of this rank's share.

    Shards that fit the decoded cache are read in this process (no workers: they would only take
    cores from the training threads); larger ones stream through ``spec.num_workers`` processes.
    """
    spec = replace(spec, epoch=epoch)
    cached = in_memory(spec)
    if cached or spec.num_workers == 0:
        return ShardStream(spec, cached=cached)
    # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG, so where an
    # epoch starts would shift the model's random stream (masks, dropout) and break exact resume.
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
    return DataLoader(ShardStream(spec), batch_size=None, num_workers=spec.num_workers, persistent_workers=False,
                      generator=generator, multiprocessing_context=worker_context())


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

"""Shard writer: encode and check every image, then write WebDataset tar shards and describe them.

Same input and config give byte-identical shards: samples keep the source's order, tar members
get a fixed mtime/owner, and PNG encoding is deterministic.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import webdataset as wds
from PIL import Image, ImageStat

from data_shards.atomic import sha256_file
from data_shards.progress import progress
from data_shards.samples import RawSample, SourceError

# Below this many samples a process pool costs more than it saves.
POOL_THRESHOLD = 4000


@dataclass
class EncodedSample:
    """A sample as it will sit in the tar: ``files`` maps extension → bytes."""

    key: str
    files: dict[str, bytes]
    label: int | None
    width: int
    height: int
    channels: int
    pixel_sums: tuple[tuple[float, float, int], ...] = ()  # per channel: Σx, Σx², count (x in [0, 1])


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _flatten_onto_white(image: Image.Image) -> Image.Image:
    """Palette/alpha images (emoji) become RGB on white, so loaders see plain L or RGB."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def encode_sample(sample: RawSample) -> EncodedSample:
    """Encode pixels to PNG, or check that given bytes decode; raises naming the sample's origin."""
    try:
        if sample.pixels is not None:
            image = Image.fromarray(sample.pixels)
            ext, payload = "png", _png_bytes(image)
        else:
            image = Image.open(io.BytesIO(sample.image_bytes or b""))
            image.load()
            if image.mode in ("L", "RGB"):
                ext, payload = sample.image_ext, sample.image_bytes
            else:
                image = _flatten_onto_white(image)
                ext, payload = "png", _png_bytes(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise SourceError(f"{sample.origin}: image does not decode ({exc})") from None
    files = {ext: payload}
    if sample.label is not None:
        files["cls"] = str(sample.label).encode()
    if sample.caption is not None:
        files["txt"] = sample.caption.encode("utf-8")
    if sample.meta:
        files["json"] = json.dumps(sample.meta, sort_keys=True).encode()
    channels = 1 if image.mode == "L" else 3
    stat = ImageStat.Stat(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    sums = tuple((s / 255.0, s2 / 255.0**2, int(n)) for s, s2, n in zip(stat.sum, stat.sum2, stat.count))
    return EncodedSample(sample.key, files, sample.label, image.width, image.height, channels, sums)


def pool_context() -> multiprocessing.context.BaseContext:
    """Start encoder processes from a fork server (spawn where there is none), never by forking.

    The shard stage runs inside Prefect, whose API client threads and fork hooks make a forked
    child unsafe (the loader's forked workers died of it). A fork server is a fresh single-threaded
    process that has imported this module once, so workers still start in milliseconds.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_shards.writer"])
    return context


def encode_all(samples: Sequence[RawSample], workers: int) -> list[EncodedSample]:
    """Encode in order; uses a process pool for large splits (PNG encoding is CPU-bound)."""
    if workers <= 1 or len(samples) < POOL_THRESHOLD:
        return [encode_sample(s) for s in samples]
    with pool_context().Pool(workers) as pool:
        return pool.map(encode_sample, samples, chunksize=256)


def write_split(
    out_dir: Path, split: str, encoded: Sequence[EncodedSample], samples_per_shard: int, max_shard_bytes: int
) -> list[dict[str, Any]]:
    """Write one split's shards into ``out_dir``; returns per-shard name, sample count, bytes and sha256.

    ``out_dir`` is a staging folder of :func:`~data_shards.atomic.atomic_directory`, which removes it
    and reports a full disk (path, free space, bytes written) if a shard write fails.
    """
    counts: list[int] = []
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=max_shard_bytes, verbose=0,
        mtime=0.0, user="patchflow", group="patchflow", mode=0o444,
    ) as writer:
        for sample in progress(encoded, f"shard: writing {split}", len(encoded)):
            shard_before = writer.shard
            writer.write({"__key__": sample.key, **sample.files})
            if writer.shard != shard_before or not counts:
                counts.append(0)
            counts[-1] += 1
    shards = []
    for index, count in enumerate(counts):
        path = out_dir / f"{split}-{index:06d}.tar"
        shards.append({"name": path.name, "samples": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return shards


def pixel_statistics(encoded: Sequence[EncodedSample], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in [0, 1] (grey images count towards every channel)."""
    totals = [[0.0, 0.0, 0] for _ in range(channels)]
    for sample in encoded:
        sums = sample.pixel_sums * channels if len(sample.pixel_sums) == 1 else sample.pixel_sums
        for total, (s, s2, n) in zip(totals, sums):
            total[0] += s
            total[1] += s2
            total[2] += n
    mean = [s / max(n, 1) for s, _, n in totals]
    std = [max(s2 / max(n, 1) - m * m, 0.0) ** 0.5 for (_, s2, n), m in zip(totals, mean)]
    return [round(m, 6) for m in mean], [round(max(s, 1e-6), 6) for s in std]


def describe_split(encoded: Sequence[EncodedSample]) -> dict[str, Any]:
    """Class histogram, image size(s), channels and pixel statistics of a split, for the manifest."""
    sizes = Counter((s.height, s.width) for s in encoded)
    channels = max(s.channels for s in encoded)
    mean, std = pixel_statistics(encoded, channels)
    histogram = Counter(s.label for s in encoded if s.label is not None)
    return {
        "num_samples": len(encoded),
        "class_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "image_size": list(sizes.most_common(1)[0][0]) if len(sizes) == 1 else None,
        "image_sizes": {f"{h}x{w}": n for (h, w), n in sorted(sizes.items())},
        "channels": channels,
        "pixel_mean": mean,
        "pixel_std": std,
        "has_captions": any("txt" in s.files for s in encoded),
        # Blank captions train nothing; a source that keeps them (empty_captions: keep) reports how many.
        "empty_captions": sum(1 for s in encoded if "txt" in s.files and not s.files["txt"].decode("utf-8").strip()),
        "has_labels": bool(histogram),
    }

"""The sharding stage: a source dataset becomes WebDataset shards plus a manifest."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, TypeVar

from data_shards import remote
from data_shards.atomic import atomic_directory
from data_shards.sources import SOURCE_UNAVAILABLE, open_source, source_fingerprint
from data_shards.writer import describe_split, encode_all, write_split
from tasks import tracking
from tasks.config import ShardConfig
from tasks.stage import (
    MANIFEST_NAME, StageContext, StageResult, finished_result, result_from_manifest,
    stage_output_dir, write_manifest,
)
from tasks.tracking import stage_run

STAGE = "shard"
log = logging.getLogger("patchflow.shard")
T = TypeVar("T")


def shuffled(samples: list[T], seed: int, split: str) -> list[T]:
    """The split's samples in a permutation fixed by ``seed`` and the split's name (writes stay deterministic)."""
    order = random.Random(f"{seed}/{split}").sample(range(len(samples)), len(samples))
    return [samples[i] for i in order]


def external_inputs(config: ShardConfig, data_root: Path) -> dict[str, str]:
    """The key's view of the source: its files' names, sizes and times (and the caption table's
    bytes), so a folder that gained, lost or changed an image is sharded again."""
    return {"source": source_fingerprint(config.source, data_root)}


def run(config: ShardConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Shard the configured source; a finished earlier run with the same config and source files is reused."""
    external = external_inputs(config, context.data_root)
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs, external)
    done = finished_result(output_dir)
    if done is not None:
        log.info("shard: reusing %s", output_dir)
        return done

    if config.output:
        remote.check_bucket(config.output)
    started = time.perf_counter()
    source = open_source(config.source, context.data_root, seed=config.seed)
    if external["source"] == SOURCE_UNAVAILABLE:
        # Reading fetched it (Fashion-MNIST on a fresh machine): name the shards by the files fetched,
        # which every later run fingerprints, so the next run reuses them instead of sharding again.
        external = external_inputs(config, context.data_root)
        output_dir = stage_output_dir(context.data_root, STAGE, config, inputs, external)
    # Every image is encoded (and so checked) before the first shard is written, in a seeded
    # shuffled order: sources list files sorted by path, so an image folder laid out class by class
    # would otherwise give one class per shard, which no shuffle buffer can undo.
    encoded = {split: encode_all(shuffled(samples, config.seed, split), config.workers)
               for split, samples in source.splits.items()}
    encode_seconds = time.perf_counter() - started

    # Remotely, under the same key as the folder: another config never overwrites these shards.
    location = f"{config.output}/{output_dir.name}" if config.output else None
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=config.model_dump(mode="json")) as tracked:
        with atomic_directory(output_dir) as staging:
            splits = {}
            for split, samples in encoded.items():
                shards = write_split(staging, split, samples, config.samples_per_shard, config.max_shard_bytes)
                splits[split] = {**describe_split(samples), "shards": shards}
                if location:
                    upload_shards(staging, shards, location)
            elapsed = time.perf_counter() - started
            total = sum(info["num_samples"] for info in splits.values())
            metrics = {f"{split}_samples": float(info["num_samples"]) for split, info in splits.items()}
            metrics.update(
                total_samples=float(total),
                num_shards=float(sum(len(info["shards"]) for info in splits.values())),
                samples_per_s=total / max(elapsed, 1e-9),
                encode_seconds=encode_seconds,
            )
            outputs = {"splits": splits, "classes": source.classes, "source": source.description}
            if location:
                outputs["location"] = location
            write_manifest(staging, STAGE, config, inputs, outputs, metrics, tracked.info.run_id, external)
            if location:  # last: a remote prefix without its manifest is a shard run that did not finish
                remote.upload(str(staging / MANIFEST_NAME), f"{location}/{MANIFEST_NAME}")
        tracking.log_metrics(metrics)
        tracking.log_artifact(Path(output_dir) / MANIFEST_NAME)
    log.info("shard: wrote %d samples in %d shards to %s", total, int(metrics["num_shards"]), location or output_dir)
    return result_from_manifest(Path(output_dir) / MANIFEST_NAME)


def upload_shards(staging: Path, shards: list[dict[str, Any]], location: str) -> None:
    """Upload a split's finished shards to ``location`` and drop the local copies (the manifest,
    written after, then records no local shard files: the loader reads them from ``location``)."""
    for shard in shards:
        local = staging / shard["name"]
        remote.upload(str(local), f"{location}/{shard['name']}")
        local.unlink()
        log.info("shard: uploaded %s (%d samples) to %s", shard["name"], shard["samples"], location)

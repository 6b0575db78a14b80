"""The ``encode_latents`` stage: every image encoded once by the frozen VAE into latent shards.

One latent shard per image shard, each written atomically with a ``.done.json`` sidecar, so a
killed run re-encodes only the shards it had not finished. DiT training streams these latents and
never runs the VAE encoder.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds

from data_shards.errors import BadInputError
from data_shards.progress import progress
from data_shards.atomic import atomic_file, sha256_file, write_json_atomic
from data_shards.loader import evaluation_batches, read_shard, split_shards
from models.vae import parameter_fingerprint
from tasks import tracking
from tasks.config import LatentConfig
from tasks.devices import stage_device
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import stage_run
from tasks.vae_train import load_vae, rgb01_spec

STAGE = "encode_latents"
log = logging.getLogger("patchflow.latents")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.clone(), buffer)
    return buffer.getvalue()


@torch.no_grad()
def encode_shard(vae: torch.nn.Module, source: str, target: Path, image_size: int, batch_size: int, hflip: bool,
                 device: str | torch.device = "cpu") -> int:
    """Encode one image shard into one latent shard (temp file + rename) with the VAE on ``device``
    (where it must already live); returns the sample count."""
    spec = rgb01_spec((source,), image_size, batch_size)
    count = 0
    with atomic_file(target) as partial, wds.TarWriter(str(partial), mtime=0.0, user="patchflow", group="patchflow",
                                                       mode=0o444) as writer:
        for batch in evaluation_batches(spec):
            images = batch["image"].to(device)  # (N, 3, H, W)
            views = [("", images)] + ([("_flip", images.flip(-1))] if hflip else [])
            for suffix, view in views:
                latents = vae.encode(view).half().cpu()  # (N, C, h, w): fp16 halves storage, diffusion-safe
                for key, latent, label in zip(batch["key"], latents, batch["label"].tolist()):
                    writer.write({"__key__": key + suffix, "pth": _tensor_bytes(latent), "cls": str(label).encode()})
                    count += 1
    return count


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".done.json")


def run(config: LatentConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    shards = next(r for r in inputs if r.stage == "shard")
    vae_result = next(r for r in inputs if r.stage == "vae")
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    available = shards.manifest()["outputs"]["splits"]
    missing = [s for s in config.splits if s not in available]
    if missing:
        raise BadInputError(f"latents.splits: {missing} not in the shards ({shards.manifest_path} has {sorted(available)})")
    device = stage_device(context)
    vae = load_vae(vae_result).to(device)
    vae_outputs = vae_result.manifest()["outputs"]
    fingerprint = parameter_fingerprint(vae)
    output_dir.mkdir(parents=True, exist_ok=True)
    started, encoded, splits = time.perf_counter(), 0, {}
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=config.model_dump(mode="json")) as tracked:
        for split in config.splits:
            entries = []
            sources = split_shards(shards.manifest_path, split)
            for index, source in enumerate(progress(sources, f"encode_latents: {split} shards", len(sources))):
                target = output_dir / f"{split}-{index:06d}.tar"
                if target.is_file() and _sidecar(target).is_file():
                    count = json.loads(_sidecar(target).read_text())["samples"]  # finished by an earlier attempt
                else:
                    count = encode_shard(vae, source, target, vae_outputs["image_size"], config.batch_size, config.hflip_copy,
                                         device)
                    write_json_atomic(_sidecar(target), {"samples": count, "source": source})
                    encoded += count
                entries.append({"name": target.name, "samples": count, "bytes": target.stat().st_size,
                                "sha256": sha256_file(target)})
            splits[split] = {"num_samples": sum(e["samples"] for e in entries), "shards": entries}
        if parameter_fingerprint(vae) != fingerprint:
            raise BadInputError(f"the frozen VAE from {vae_result.output_dir} changed while encoding")
        elapsed = time.perf_counter() - started
        size = vae_outputs["image_size"] // vae_outputs["downsample_factor"]
        outputs = {"splits": splits, "latent_shape": [vae_outputs["constructor"]["latent_channels"], size, size],
                   "classes": shards.manifest()["outputs"]["classes"], "vae_fingerprint": fingerprint}
        metrics = {"latents": float(sum(s["num_samples"] for s in splits.values())),
                   "latents_per_s": encoded / max(elapsed, 1e-9), "encoded_now": float(encoded)}
        tracking.log_metrics(metrics)
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)


def load_latents(manifest_path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every latent of a split as one float tensor (N, C, h, w) with labels (N,): latents are small."""
    latents, labels = [], []
    for path in split_shards(manifest_path, split):
        for sample in read_shard(path):  # verified against the manifest's count: no silently short split
            latents.append(torch.load(io.BytesIO(sample["pth"]), weights_only=True).float())
            labels.append(int(sample["cls"]))
    return torch.stack(latents), torch.tensor(labels, dtype=torch.long)


def latent_batches(latents: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, rank: int = 0,
                   world_size: int = 1, start_epoch: int = 0, skip: int = 0) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless ``(epoch, index, batch)`` over in-memory latents: a seeded permutation per epoch,
    split by rank into equal shares (so every rank runs the same batches per epoch), full batches
    only; resumes exactly at (epoch, skip)."""
    epoch = start_epoch
    usable = len(latents) - len(latents) % world_size
    while True:
        permutation = torch.randperm(len(latents), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        order = permutation[:usable][rank::world_size]
        for index in range(skip if epoch == start_epoch else 0, len(order) // batch_size):
            chosen = order[index * batch_size:(index + 1) * batch_size]
            yield epoch, index, {"image": latents[chosen], "label": labels[chosen]}
        epoch += 1

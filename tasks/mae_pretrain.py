"""The MAE pretraining stage: a ViT encoder pretrained as a masked autoencoder on the shards.

One process trains in-process; several are launched with torchrun on this module
(``python -m tasks.mae_pretrain JOB.json``), every rank running :func:`train_worker`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from data_shards.errors import BadInputError
from data_shards.atomic import sha256_file, write_json_atomic
from data_shards.loader import LoaderSpec, evaluation_batches, split_shards, training_batches
from models.mae import MaskedAutoencoder, denormalize_pred, mae_from_name, reconstruction_tiles
from tasks import tracking
from tasks.checkpoint import save_torch_atomic
from tasks.config import MAEConfig
from tasks.distributed import DistInfo, init_distributed, launch_training, loss_ends, run_rank, shutdown_distributed
from tasks.engine import TrainJob, TrainSummary, seed_everything, train
from tasks.pictures import labelled_grid
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import log_image, stage_run

STAGE = "mae_pretrain"
RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction")
log = logging.getLogger("patchflow.mae")


def data_geometry(shards_manifest: str | Path) -> dict[str, Any]:
    """Channels and normalisation of the train split, read from the shard manifest."""
    train_split = json.loads(Path(shards_manifest).read_text())["outputs"]["splits"].get("train")
    if train_split is None:
        raise BadInputError(f"{shards_manifest}: no train split to pretrain on")
    return {"channels": train_split["channels"], "mean": train_split["pixel_mean"], "std": train_split["pixel_std"]}


def model_signature(config: MAEConfig, channels: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the architecture, not the schedule."""
    return {"encoder_size": config.encoder_size, "image_size": config.image_size, "patch_size": config.patch_size,
            "in_chans": channels, "decoder_embed_dim": config.decoder_embed_dim, "decoder_depth": config.decoder_depth,
            "decoder_num_heads": config.decoder_num_heads, "norm_pix_loss": config.norm_pix_loss}


def build_model(config: MAEConfig, channels: int) -> MaskedAutoencoder:
    return mae_from_name(
        config.encoder_size, img_size=config.image_size, patch_size=config.patch_size, in_chans=channels,
        decoder_embed_dim=config.decoder_embed_dim, decoder_depth=config.decoder_depth,
        decoder_num_heads=config.decoder_num_heads, mask_ratio=config.mask_ratio,
        norm_pix_loss=config.norm_pix_loss, drop_path_rate=config.drop_path)


def mae_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    loss, _, _ = model(batch["image"])
    return loss, {}


def _loader_spec(config: MAEConfig, manifest: str, split: str, geometry: dict, rank: int = 0, world: int = 1) -> LoaderSpec:
    return LoaderSpec(
        shard_paths=split_shards(manifest, split), batch_size=config.train.batch_size, rank=rank, world_size=world,
        num_workers=config.train.num_workers, seed=config.train.seed, shuffle_buffer=config.train.shuffle_buffer,
        image_size=config.image_size, channels=geometry["channels"], augment="crop_flip",
        mean=tuple(geometry["mean"]), std=tuple(geometry["std"]))


def _reconstruction_logger(config: MAEConfig, manifest: str, geometry: dict, device: str):
    """Every eval interval: validation loss with a fixed mask, and an original/masked/reconstruction grid."""
    spec = _loader_spec(config, manifest, "val", geometry)
    images = next(iter(evaluation_batches(spec)))["image"][:8].to(device)

    @torch.no_grad()
    def on_eval(model: MaskedAutoencoder, step: int) -> None:
        model.eval()
        generator = torch.Generator(device=device).manual_seed(0)
        loss, pred, mask = model(images, generator=generator)
        if model.norm_pix_loss:
            pred = denormalize_pred(images, pred, model.patch_size)
        tiles = reconstruction_tiles(images, pred, mask, model.patch_size, mean=geometry["mean"], std=geometry["std"])
        grid = labelled_grid(tiles, column_labels=RECONSTRUCTION_COLUMNS)
        tracking.log_metrics({"val_loss": float(loss)}, step=step)
        log_image(grid, f"reconstruction/step-{step:06d}.png")

    return on_eval


def training_job(job_path: Path, dist: DistInfo) -> TrainJob:
    """The rank's training job as the stage runs it (also what benchmarks/bench_stage_efficiency.py times)."""
    spec = json.loads(Path(job_path).read_text())
    config, manifest, output_dir = MAEConfig.model_validate(spec["config"]), spec["shards_manifest"], Path(spec["output_dir"])
    geometry = data_geometry(manifest)
    loader = _loader_spec(config, manifest, "train", geometry, dist.rank, dist.world_size)
    seed_everything(config.train.seed)  # same initial weights for the same seed
    model = build_model(config, geometry["channels"])
    return TrainJob(
        model=model, loss_fn=mae_loss, batches=lambda epoch, skip: training_batches(loader, epoch, skip),
        config=config.train, checkpoint_dir=output_dir / "checkpoints",
        signature=model_signature(config, geometry["channels"]), dist=dist,
        log_metrics=tracking.log_metrics if dist.is_main else None,
        on_eval=_reconstruction_logger(config, manifest, geometry, dist.device) if dist.is_main else None,
        stop_after=spec.get("stop_after"),
    )


def train_worker(job_path: Path) -> TrainSummary:
    """What every rank runs: build model and stream, train, and (rank 0) export the encoder."""
    dist = init_distributed()
    job = training_job(job_path, dist)
    summary = train(job)
    if dist.is_main and summary.steps == job.config.steps:
        _export(job.model, job.checkpoint_dir.parent, summary, dist.world_size)
    shutdown_distributed()
    return summary


def _export(model: MaskedAutoencoder, output_dir: Path, summary: TrainSummary, world_size: int) -> None:
    for name, module in (("encoder.pt", model.encoder), ("mae.pt", model)):
        save_torch_atomic(output_dir / name, {k: v.cpu() for k, v in module.state_dict().items()})
    write_json_atomic(output_dir / "train_summary.json", summary.record(world_size))


def run(config: MAEConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Pretrain (or resume pretraining) an MAE on the upstream shards; reuse a finished run."""
    (shards,) = [r for r in inputs if r.stage == "shard"]
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    geometry = data_geometry(shards.manifest_path)
    build_model(config, geometry["channels"])  # bad geometry fails here, before any process starts
    output_dir.mkdir(parents=True, exist_ok=True)
    job_path = output_dir / "job.json"
    write_json_atomic(job_path, {"config": config.model_dump(mode="json"), "shards_manifest": shards.manifest_path,
                                 "output_dir": str(output_dir), "stop_after": context.extra.get("stop_after")})
    world = config.train.nproc_per_node * config.train.nnodes
    params = {**config.model_dump(mode="json"), "in_chans": geometry["channels"], "world_size": world}
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=params, system_metrics=True) as tracked:
        summary = launch_training("tasks.mae_pretrain", train_worker, job_path, config.train, tracked.info.run_id,
                                  context.data_root, exported=output_dir / "encoder.pt",
                                  summary_path=output_dir / "train_summary.json",
                                  checkpoint_dir=output_dir / "checkpoints", log=log.info)
        metrics = {**loss_ends(summary["losses"], 10), "images_per_s": summary["images_per_s"], "train_wall_s": summary["wall_s"],
                   "steps": float(summary["steps"]), "resumed_from_step": float(summary["resumed_from"])}
        tracking.log_metrics(metrics)
        tracking.log_artifact(output_dir / "encoder.pt")
        outputs = {
            "encoder": {"path": "encoder.pt", "sha256": sha256_file(output_dir / "encoder.pt")},
            "mae": {"path": "mae.pt", "sha256": sha256_file(output_dir / "mae.pt")},
            "architecture": model_signature(config, geometry["channels"]),
            "normalization": {"mean": geometry["mean"], "std": geometry["std"]},
        }
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)


if __name__ == "__main__":  # a torchrun rank
    run_rank(train_worker, sys.argv[1])

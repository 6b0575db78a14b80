"""The ``vae`` stage: the frozen autoencoder whose latent space the DiT learns.

With ``vae.pretrained_dir`` it loads the TAEF2 tiny autoencoder strictly (``auto`` finds or downloads
it: ``tasks/pretrained.py``); without, it trains a small one of the same architecture on the shards with the shared engine, so the pipeline runs end to end
with no external weights. Either way it measures reconstruction PSNR on val and estimates the
per-channel latent shift/scale the diffusion model normalises with.
"""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from data_shards.errors import BadInputError
from data_shards.atomic import sha256_file, write_json_atomic
from data_shards.fingerprint import content_entry, fingerprint
from data_shards.loader import LoaderSpec, evaluation_batches, split_shards, training_batches
from models.vae import TinyAutoencoder, autoencoder_loss, freeze, load_pretrained_tiny_autoencoder, parameter_fingerprint
from tasks import tracking
from tasks.checkpoint import load_torch_file, save_torch_atomic
from tasks.config import VAEConfig
from tasks.devices import module_device, stage_device
from tasks.distributed import DistInfo
from tasks.engine import TrainJob, seed_everything, train
from tasks.features import random_subset
from tasks.pictures import labelled_grid
from tasks.pretrained import TAEF2_FILES, resolve_pretrained_dir
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import log_image, stage_run

STAGE = "vae"
log = logging.getLogger("patchflow.vae")


def rgb01_spec(shard_paths: tuple[str, ...], image_size: int, batch_size: int = 64, **overrides: Any) -> LoaderSpec:
    """Images as the VAE sees them: RGB in [0, 1] at ``image_size`` (grey images are repeated);
    ``overrides`` may change the normalisation for other consumers of the same images."""
    settings = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), **overrides}
    return LoaderSpec(shard_paths=shard_paths, batch_size=batch_size, channels=3, image_size=image_size, **settings)


def image_spec(shards_manifest: str, split: str, image_size: int, batch_size: int = 64, **overrides: Any) -> LoaderSpec:
    return rgb01_spec(split_shards(shards_manifest, split), image_size, batch_size, **overrides)


def load_pretrained(folder: str) -> TinyAutoencoder:
    states = []
    for name in TAEF2_FILES:
        path = Path(folder).expanduser() / name
        if not path.is_file():
            raise BadInputError(f"vae.pretrained_dir: {path} does not exist")
        try:
            states.append(load_torch_file(path))
        except Exception as exc:  # torch raises several types for a damaged file
            raise BadInputError(f"{path}: cannot read weights ({exc})") from None
    return load_pretrained_tiny_autoencoder(*states)


def vae_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    return autoencoder_loss(model, batch["image"])


def training_job(job_path: Path, dist: DistInfo) -> TrainJob:
    """The VAE training job as the stage runs it (also what benchmarks/bench_stage_efficiency.py times):
    the fallback autoencoder from scratch, or with ``pretrained_dir`` the pretrained decoder alone."""
    job = json.loads(Path(job_path).read_text())
    config, output_dir = VAEConfig.model_validate(job["config"]), Path(job["output_dir"])
    pretrained_dir = job.get("pretrained_dir")
    train_config = config.decoder_finetune if pretrained_dir else config.train
    seed_everything(train_config.seed)
    if pretrained_dir:
        model = load_pretrained(pretrained_dir)  # frozen; the encoder stays so, so latents do not move
        model.decoder.requires_grad_(True)
        model.train()
        signature = {"pretrained": parameter_fingerprint(model), "image_size": config.image_size, "trains": "decoder"}
    else:
        model = TinyAutoencoder(latent_channels=config.latent_channels, width=config.width, midblock_gn=False)
        signature = {"latent_channels": config.latent_channels, "width": config.width, "image_size": config.image_size}
    spec = image_spec(job["shards_manifest"], "train", config.image_size, train_config.batch_size, augment="flip",
                      num_workers=train_config.num_workers, shuffle_buffer=train_config.shuffle_buffer,
                      seed=train_config.seed)
    return TrainJob(model=model, loss_fn=vae_loss, batches=lambda e, s: training_batches(spec, e, s),
                    config=train_config, checkpoint_dir=output_dir / "checkpoints", signature=signature,
                    log_metrics=tracking.log_metrics if dist.is_main else None, dist=dist)


def train_vae(config: VAEConfig, shards_manifest: str, output_dir: Path, device: str = "cpu",
              pretrained_dir: Path | None = None) -> TinyAutoencoder:
    """Train the fallback autoencoder, or the pretrained one's decoder (``config.decoder_finetune``), on
    ``device``; it is returned frozen, still on ``device``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    job_path = output_dir / "job.json"
    write_json_atomic(job_path, {"config": config.model_dump(mode="json"), "shards_manifest": shards_manifest,
                                 "output_dir": str(output_dir),
                                 "pretrained_dir": None if pretrained_dir is None else str(pretrained_dir)})
    job = training_job(job_path, DistInfo(device=device))
    summary = train(job)
    write_json_atomic(output_dir / "train_summary.json", summary.record(1))
    return freeze(summary.ema if summary.ema is not None else job.model)  # the EMA weights when ema_decay is set


@torch.no_grad()
def latent_statistics(vae: TinyAutoencoder, spec: LoaderSpec, max_images: int = 512, seed: int = 0) -> dict[str, list[float]]:
    """Per-channel mean and std of the latents of a seeded random subset of ``max_images`` images
    (the first N of class-ordered shards would describe a few classes), so diffusion sees roughly
    unit-variance inputs. The VAE encodes where its weights live."""
    device = module_device(vae)
    subset = random_subset(evaluation_batches(spec), max_images, seed, spec.batch_size)
    latents = torch.cat([vae.encode(b["image"].to(device)).float().cpu() for b in subset])  # (N, C, h, w)
    per_channel = latents.transpose(0, 1).flatten(1)  # (C, N·h·w)
    return {"mean": per_channel.mean(1).tolist(), "std": per_channel.std(1).clamp_min(1e-6).tolist()}


@torch.no_grad()
def reconstruction_psnr(vae: TinyAutoencoder, spec: LoaderSpec, max_images: int = 256) -> tuple[float, torch.Tensor]:
    """Mean PSNR (dB) over val images, and a labelled grid of originals above their reconstructions."""
    scores, first = [], None
    device = module_device(vae)
    for batch in islice(evaluation_batches(spec), -(-max_images // spec.batch_size)):
        images = batch["image"]
        recon = vae.decode(vae.encode(images.to(device))).float().cpu()
        mse = ((recon - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        scores.append(10 * torch.log10(1.0 / mse))
        first = first if first is not None else torch.stack([images[:8], recon[:8]])  # (2, n, C, H, W)
    return float(torch.cat(scores).mean()), labelled_grid(first, row_labels=("original", "reconstruction"))


def load_vae(result: StageResult) -> TinyAutoencoder:
    """The frozen VAE a finished ``vae`` stage saved."""
    outputs = result.manifest()["outputs"]
    model = TinyAutoencoder(**outputs["constructor"])
    model.load_state_dict(load_torch_file(Path(result.output_dir) / outputs["vae"]["path"]), strict=True)
    return freeze(model)


def external_inputs(config: VAEConfig, data_root: Path) -> dict[str, str]:
    """The pretrained weights' bytes when the VAE is loaded rather than trained (a few MB: hashed).
    With ``auto`` and no weights to be had, none: a small VAE is trained (and weights found later make a
    new key)."""
    folder = resolve_pretrained_dir(config.pretrained_dir, data_root)
    if folder is None:
        return {}
    return {"pretrained_weights": fingerprint("vae_weights", [content_entry(folder / name, name) for name in TAEF2_FILES])}


def run(config: VAEConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    shards = next(r for r in inputs if r.stage == "shard")
    external = external_inputs(config, context.data_root)
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs, external)
    done = finished_result(output_dir)
    if done is not None:
        return done
    weights = resolve_pretrained_dir(config.pretrained_dir, context.data_root)
    vae = load_pretrained(str(weights)) if weights else None  # bad weights fail first
    device = stage_device(context)
    output_dir.mkdir(parents=True, exist_ok=True)
    trains = vae is None or config.decoder_finetune is not None
    val_spec = image_spec(shards.manifest_path, "val", config.image_size)
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=config.model_dump(mode="json"),
                   system_metrics=trains) as tracked:
        before: dict[str, float] = {}
        if vae is not None and trains:  # the baseline the fine-tuned decoder is judged against
            before["pretrained_val_psnr"] = reconstruction_psnr(vae.to(device), val_spec)[0]
        vae = train_vae(config, shards.manifest_path, output_dir, device, weights) if trains else vae.to(device)
        psnr, grid = reconstruction_psnr(vae, val_spec)
        stats = latent_statistics(vae, image_spec(shards.manifest_path, "train", config.image_size), seed=config.train.seed)
        log_image(grid, "reconstruction.png")
        vae.cpu()  # saved and fingerprinted on the CPU, where every later stage loads it
        save_torch_atomic(output_dir / "vae.pt", vae.state_dict())
        constructor = {"latent_channels": vae.encoder[-1].out_channels, "width": vae.encoder[0].out_channels,
                       "midblock_gn": any(".pool." in name for name, _ in vae.named_parameters())}
        outputs = {"vae": {"path": "vae.pt", "sha256": sha256_file(output_dir / "vae.pt")}, "constructor": constructor,
                   "pretrained": weights is not None, "latent_stats": stats, "downsample_factor": 8,
                   "image_size": config.image_size, "parameter_fingerprint": parameter_fingerprint(vae)}
        outputs["decoder_finetuned"] = weights is not None and trains
        metrics = {"val_psnr": psnr, "latent_channels": float(constructor["latent_channels"]),
                   "pretrained": float(weights is not None), **before}
        tracking.log_metrics(metrics)
        what = "trained here" if weights is None else "pretrained TAEF2" + (", decoder fine-tuned" if trains else "")
        log.info("vae: %s, val PSNR %.2f dB%s", what, psnr,
                 f" (before fine-tuning {before['pretrained_val_psnr']:.2f} dB)" if before else "")
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id, external)

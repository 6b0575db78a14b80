"""The ``dit_train`` stage: a class-conditional DiT trained on pre-extracted VAE latents with the
shared engine (EMA weights), class-conditional samples with classifier-free guidance decoded through
the frozen VAE, and a quality score computed from those samples."""

from __future__ import annotations

import json
import logging
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from data_shards.errors import BadInputError
from data_shards.atomic import sha256_file, write_json_atomic
from data_shards.loader import evaluation_batches
from models.convnet import ConvNetClassifier
from models.diffusion import GaussianDiffusion
from models.dit import DiT, dit_from_name
from models.vae import parameter_fingerprint
from tasks import tracking
from tasks.checkpoint import load_torch_file, save_torch_atomic
from tasks.config import DiTConfig, OptimConfig, TrainConfig
from tasks.devices import module_device, stage_device
from tasks.distributed import DistInfo, init_distributed, launch_training, loss_ends, run_rank, shutdown_distributed
from tasks.engine import TrainJob, seed_everything, train
from tasks.finetune import train_classifier
from tasks.latents import latent_batches, load_latents
from tasks.pictures import labelled_grid, rows_of
from tasks.quality import ImageClassifier, quality_scores
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import log_image, stage_run
from tasks.vae_train import image_spec, load_vae

STAGE = "dit_train"
JUDGE_WIDTHS = (32, 64, 128)  # the scoring CNN's stages
log = logging.getLogger("patchflow.dit")


def build_dit(config: DiTConfig, latent_shape: list[int], num_classes: int) -> DiT:
    """The DiT for these latents; a patch that does not tile the latent grid fails here."""
    channels, size, _ = latent_shape
    patch = int(config.model.rpartition("/")[2]) if config.model.rpartition("/")[2].isdigit() else 0
    if patch < 1 or size % patch:
        raise BadInputError(f"dit.model {config.model!r}: latent size {size} (image {size * 8} px / 8) is not divisible "
                         f"by patch size {patch}; use a smaller patch or a larger vae.image_size")
    return dit_from_name(config.model, input_size=size, in_channels=channels, num_classes=num_classes,
                         learn_sigma=config.learn_sigma, class_dropout_prob=config.class_dropout_prob)


class LatentCodec:
    """Maps between VAE latents and the unit-scale latents diffusion works on (shift/scale per channel)."""

    def __init__(self, stats: dict[str, list[float]]):
        self.mean = torch.tensor(stats["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(stats["std"]).view(1, -1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)


@torch.no_grad()
def sample_images(model: DiT, diffusion: GaussianDiffusion, vae: torch.nn.Module, codec: LatentCodec,
                  labels: torch.Tensor, config: DiTConfig, seed: int, chunk: int = 256) -> torch.Tensor:
    """Class-conditional samples (``config.sampler``, classifier-free guidance) decoded to RGB in [0, 1].

    Sampling runs where the model lives, with a generator there (no per-step host copies of noise);
    decoding runs where the VAE lives, and the images stay there.
    """
    model.eval()
    device, vae_device = module_device(model), module_device(vae)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (model.in_channels, model.input_size, model.input_size)
    images = []
    for start in range(0, len(labels), chunk):
        y = labels[start:start + chunk].to(device)
        if config.sampler == "ddpm":
            z = diffusion.ddpm_sample(model, (len(y), *shape), y, cfg_scale=config.cfg_scale, steps=config.sample_steps,
                                      variance=config.sample_variance, generator=generator, device=device)
        else:
            z = diffusion.ddim_sample(model, (len(y), *shape), y, cfg_scale=config.cfg_scale, steps=config.sample_steps,
                                      generator=generator, device=device)
        images.append(vae.decode(codec.denormalize(z.to(vae_device))))  # (n, 3, H, W)
    return torch.cat(images)


def scoring_classifier(shards: StageResult, image_size: int, config: DiTConfig, num_classes: int, output_dir: Path,
                       device: str = "cpu") -> ImageClassifier:
    """A small CNN trained here on the real images, at the DiT's resolution, to score its samples (on
    ``device``, where it is returned).

    The stage's own, not the evaluation stage's fine-tuned classifier: a DiT's scores then never
    depend on probe or fine-tune settings, so changing those does not retrain the DiT, and two DiT runs
    are always scored by the same judge. A CNN, not a ViT: it is a measuring instrument, and at the
    same cost it classifies far better (see ``models/convnet.py``).
    """
    seed_everything(0)
    model = ConvNetClassifier(in_chans=3, num_classes=num_classes, widths=JUDGE_WIDTHS).to(device)
    spec = image_spec(shards.manifest_path, "train", image_size, 64, augment="flip", mean=(0.5,) * 3, std=(0.5,) * 3)
    train_config = TrainConfig(steps=config.classifier_steps, batch_size=64, checkpoint_every=config.classifier_steps,
                               log_every=max(1, config.classifier_steps // 5), num_workers=0,
                               optim=OptimConfig(base_lr=4e-3, weight_decay=0.05, warmup_steps=config.classifier_steps // 10))
    signature = {"judge": "convnet", "widths": list(JUDGE_WIDTHS), "image_size": image_size, "num_classes": num_classes}
    train_classifier(model, spec, train_config, output_dir / "classifier" / "checkpoints", signature,
                     layer_decay=1.0, label_smoothing=0.0, dist=DistInfo(device=device))
    return ImageClassifier(model, image_size, 3, (0.5,) * 3, (0.5,) * 3)


def real_images(shards: StageResult, image_size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec = image_spec(shards.manifest_path, "val", image_size, 256)
    batches = list(islice(evaluation_batches(spec), -(-limit // 256)))
    return torch.cat([b["image"] for b in batches])[:limit], torch.cat([b["label"] for b in batches])[:limit]


def _stage_inputs(inputs: list[StageResult]) -> tuple[StageResult, StageResult, StageResult]:
    shards, vae_result, latents_result = (next(r for r in inputs if r.stage == s) for s in ("shard", "vae", "encode_latents"))
    return shards, vae_result, latents_result


def training_job(job_path: Path, dist: DistInfo) -> TrainJob:
    """The rank's training job as the stage runs it (also what benchmarks/bench_stage_efficiency.py times).

    Each rank takes every ``world_size``-th latent of the epoch's seeded permutation, so the ranks
    together see each latent once per epoch.
    """
    job = json.loads(Path(job_path).read_text())
    config, output_dir = DiTConfig.model_validate(job["config"]), Path(job["output_dir"])
    _, vae_result, latents_result = _stage_inputs([StageResult.model_validate(r) for r in job["inputs"]])
    latent_outputs = latents_result.manifest()["outputs"]
    classes = latent_outputs["classes"]
    seed_everything(config.train.seed)  # same initial weights on every rank
    model = build_dit(config, latent_outputs["latent_shape"], len(classes))
    codec = LatentCodec(vae_result.manifest()["outputs"]["latent_stats"])
    latents, labels = load_latents(latents_result.manifest_path, "train")
    latents = codec.normalize(latents)
    diffusion = GaussianDiffusion(config.num_timesteps, config.schedule)
    on_eval = None
    if dist.is_main:
        # The EMA model the hook gets lives on this rank's device: sample there, decode there.
        vae, grid_labels = load_vae(vae_result).to(dist.device), torch.arange(len(classes)).repeat_interleave(2)

        def on_eval(ema_model: DiT, step: int) -> None:
            samples = sample_images(ema_model, diffusion, vae, codec, grid_labels, config, seed=0)
            log_image(labelled_grid(rows_of(samples, 2), row_labels=classes), f"samples/step-{step:06d}.png")

    return TrainJob(
        model=model, loss_fn=lambda m, batch: diffusion.training_loss(m, batch["image"], y=batch["label"]),
        batches=lambda epoch, skip: latent_batches(latents, labels, config.train.batch_size, config.train.seed,
                                                   dist.rank, dist.world_size, start_epoch=epoch, skip=skip),
        config=config.train, checkpoint_dir=output_dir / "checkpoints", on_eval=on_eval, dist=dist,
        signature={"model": config.model, "latent_shape": latent_outputs["latent_shape"], "classes": len(classes),
                   "learn_sigma": config.learn_sigma},
        log_metrics=tracking.log_metrics if dist.is_main else None,
        stop_after=job.get("stop_after"))


def train_worker(job_path: Path) -> None:
    """What every rank runs: train the DiT on its share of the latents; rank 0 exports the EMA weights."""
    dist = init_distributed()
    job = training_job(job_path, dist)
    summary = train(job)
    if dist.is_main and summary.steps == job.config.steps:
        ema = summary.ema if summary.ema is not None else job.model
        output_dir = job.checkpoint_dir.parent
        save_torch_atomic(output_dir / "dit.pt", {k: v.cpu() for k, v in ema.state_dict().items()})
        write_json_atomic(output_dir / "train_summary.json", summary.record(dist.world_size))
    shutdown_distributed()


def run(config: DiTConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Train a class-conditional DiT on the frozen VAE's latents (one process or torchrun ranks), then
    sample from its EMA weights and score the samples; reuse a finished run."""
    shards, vae_result, latents_result = _stage_inputs(inputs)
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    latent_outputs = latents_result.manifest()["outputs"]
    classes = latent_outputs["classes"]
    if not classes:
        raise BadInputError(f"{latents_result.manifest_path}: class-conditional DiT needs labelled shards")
    model = build_dit(config, latent_outputs["latent_shape"], len(classes))  # geometry errors before any work
    vae = load_vae(vae_result)
    fingerprint = parameter_fingerprint(vae)
    image_size = vae_result.manifest()["outputs"]["image_size"]
    codec = LatentCodec(vae_result.manifest()["outputs"]["latent_stats"])
    diffusion = GaussianDiffusion(config.num_timesteps, config.schedule)
    output_dir.mkdir(parents=True, exist_ok=True)
    job_path = output_dir / "job.json"
    write_json_atomic(job_path, {"config": config.model_dump(mode="json"), "output_dir": str(output_dir),
                                 "inputs": [r.model_dump(mode="json") for r in inputs],
                                 "stop_after": context.extra.get("stop_after")})
    world = config.train.nproc_per_node * config.train.nnodes
    with stage_run(STAGE, context.data_root, context.parent_run_id,
                   params={**config.model_dump(mode="json"), "world_size": world}, system_metrics=True) as tracked:
        summary = launch_training("tasks.dit_stage", train_worker, job_path, config.train, tracked.info.run_id,
                                  context.data_root, exported=output_dir / "dit.pt",
                                  summary_path=output_dir / "train_summary.json",
                                  checkpoint_dir=output_dir / "checkpoints", log=log.info)
        ema = model  # the stage's copy takes the EMA weights rank 0 exported
        ema.load_state_dict(load_torch_file(output_dir / "dit.pt"))
        device = stage_device(context)
        ema.to(device)
        vae.to(device)

        classifier = scoring_classifier(shards, image_size, config, len(classes), output_dir, device)
        sample_labels = torch.arange(len(classes)).repeat_interleave(config.samples_per_class)
        generated = sample_images(ema, diffusion, vae, codec, sample_labels, config, seed=1)
        real, real_labels = real_images(shards, image_size, limit=max(len(sample_labels), 200))
        with torch.no_grad():
            reconstructed = torch.cat([vae(chunk.to(device)).float().cpu() for chunk in real.split(256)])
        scores = quality_scores(classifier, generated, sample_labels, real, real_labels, reconstructed)
        per_class = generated.view(len(classes), config.samples_per_class, *generated.shape[1:])  # labels are grouped
        log_image(labelled_grid(per_class[:, :8], row_labels=classes), "samples_final.png")
        if parameter_fingerprint(vae) != fingerprint:
            raise BadInputError(f"the frozen VAE from {vae_result.output_dir} changed during DiT training")
        metrics = {**loss_ends(summary["losses"], 20), "latents_per_s": summary["images_per_s"], "train_wall_s": summary["wall_s"], **scores}
        tracking.log_metrics(metrics)
        outputs: dict[str, Any] = {"dit": {"path": "dit.pt", "sha256": sha256_file(output_dir / "dit.pt")},
                                   "architecture": {"model": config.model, "latent_shape": latent_outputs["latent_shape"],
                                                    "num_classes": len(classes), "learn_sigma": config.learn_sigma},
                                   "latent_stats": vae_result.manifest()["outputs"]["latent_stats"],
                                   "world_size": world}
        log.info("dit_train: %s", {k: round(v, 4) for k, v in metrics.items()})
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)


if __name__ == "__main__":  # a torchrun rank
    run_rank(train_worker, sys.argv[1])

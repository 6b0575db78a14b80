"""The CLIP stage: contrastive image-text training on the pairs shards.

The image tower starts from the MAE stage's encoder (``image_init: mae``) or from random weights.
With MAE init the same budget is also trained from random init (the ``baseline`` variant), so the
difference MAE pretraining makes is measured, not assumed. Both are evaluated on the held-out split
(grouped so variants of one emoji never straddle it) against an untrained model and chance.

One process trains in-process; several are launched with torchrun on this module
(``python -m tasks.clip_train JOB.json``), every rank running :func:`train_worker`; the loss then
all-gathers features so every rank scores its pairs against the global batch.
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
from models.clip import CLIP, clip_loss, load_clip, save_clip
from models.tokenizer import Tokenizer
from models.vit import with_input_channels
from tasks import tracking
from tasks.checkpoint import load_torch_file, save_torch_atomic
from tasks.config import CLIPConfig
from tasks.distributed import DistInfo, init_distributed, launch_training, loss_ends, run_rank, shutdown_distributed
from tasks.engine import TrainJob, TrainSummary, seed_everything, train
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.pictures import labelled_grid
from tasks.tracking import log_image, stage_run

STAGE = "clip_train"
log = logging.getLogger("patchflow.clip")
LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L") weights


def pairs_geometry(shards_manifest: str | Path, channels: int) -> dict[str, Any]:
    """Normalisation of the train split as the tower sees it: a grey tower on RGB pairs gets the
    luma-weighted channel mean (exact) and the luma-weighted std (an upper bound: it ignores that
    channels are correlated below 1, which only rescales the inputs slightly)."""
    manifest = json.loads(Path(shards_manifest).read_text())["outputs"]
    split = manifest["splits"].get("train")
    if split is None or not split.get("has_captions"):
        raise BadInputError(f"{shards_manifest}: no captioned train split to train CLIP on")
    mean, std = split["pixel_mean"], split["pixel_std"]
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(w * m for w, m in zip(LUMA, mean))], [sum(w * s for w, s in zip(LUMA, std))]
    elif channels == 3 and len(mean) == 1:
        mean, std = mean * 3, std * 3
    return {"channels": channels, "mean": mean, "std": std, "classes": manifest.get("classes")}


def model_kwargs(config: CLIPConfig) -> dict[str, Any]:
    return {"embed_dim": config.embed_dim, "image_size": config.image_size, "patch_size": config.patch_size,
            "in_chans": config.channels, "vision_size": config.vision_size, "context_length": config.context_length,
            "text_width": config.text_width, "text_depth": config.text_depth, "text_heads": config.text_heads}


def build_model(config: CLIPConfig) -> CLIP:
    return CLIP(**model_kwargs(config))


def check_mae_geometry(config: CLIPConfig, mae_architecture: dict[str, Any]) -> None:
    """Refuse an MAE encoder whose geometry differs from the image tower's, naming the field."""
    # Channels may differ: load_mae_encoder spreads a grey encoder over RGB (or sums an RGB one to grey).
    wanted = {"image_size": config.image_size, "patch_size": config.patch_size, "encoder_size": config.vision_size}
    for field, value in wanted.items():
        if mae_architecture.get(field) != value:
            raise BadInputError(f"clip.image_init=mae: the MAE encoder has {field}={mae_architecture.get(field)!r} but the "
                             f"CLIP image tower has {field}={value!r}; set clip.{'vision_size' if field == 'encoder_size' else field} "
                             f"to match, or clip.image_init=random")


def load_mae_encoder(model: CLIP, encoder_path: str | Path) -> None:
    """The MAE encoder's weights into the image tower, every key matched (strict); a grey MAE's patch
    projection is spread over the tower's RGB channels (``models.vit.with_input_channels``)."""
    state = with_input_channels(load_torch_file(Path(encoder_path)), model.visual.patch_embed.proj.in_channels)
    model.visual.load_state_dict(state, strict=True)


def pick_captions(captions: list[str]) -> list[str]:
    """One of each pair's template captions (newline-joined in the shard), drawn from torch's RNG,
    which the engine checkpoints, so a resumed run draws the same ones."""
    chosen = []
    for caption in captions:
        options = caption.split("\n")
        chosen.append(options[int(torch.randint(len(options), ()))] if len(options) > 1 else options[0])
    return chosen


def make_loss(tokenizer: Tokenizer):
    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        images = batch["image"]
        tokens = tokenizer.encode(pick_captions(batch["caption"])).to(images.device)
        image_features, text_features, scale = model(images, tokens)
        return clip_loss(image_features, text_features, scale), {"logit_scale": scale.detach()}
    return loss_fn


def _loader_spec(config: CLIPConfig, manifest: str, split: str, geometry: dict, rank: int = 0, world: int = 1,
                 batch_size: int | None = None) -> LoaderSpec:
    # No flips or crops: "left arrow", text on signs and flags change meaning when mirrored.
    return LoaderSpec(
        shard_paths=split_shards(manifest, split), batch_size=batch_size or config.train.batch_size, rank=rank,
        world_size=world, num_workers=config.train.num_workers, seed=config.train.seed,
        shuffle_buffer=config.train.shuffle_buffer, image_size=config.image_size, channels=config.channels,
        augment="none", mean=tuple(geometry["mean"]), std=tuple(geometry["std"]))


def training_job(job_path: Path, dist: DistInfo) -> TrainJob:
    """The rank's training job as the stage runs it (also what benchmarks/bench_stage_efficiency.py times)."""
    spec = json.loads(Path(job_path).read_text())
    config, manifest = CLIPConfig.model_validate(spec["config"]), spec["shards_manifest"]
    variant_dir = Path(spec["variant_dir"])
    train_config = config.train.model_copy(update={"steps": spec["steps"]})
    geometry = pairs_geometry(manifest, config.channels)
    loader = _loader_spec(config, manifest, "train", geometry, dist.rank, dist.world_size)
    seed_everything(config.train.seed)  # same initial weights for the same seed
    model = build_model(config)
    if spec.get("mae_encoder"):
        load_mae_encoder(model, spec["mae_encoder"])
    prefix = spec["metric_prefix"]
    return TrainJob(
        model=model, loss_fn=make_loss(Tokenizer(config.context_length)),
        batches=lambda epoch, skip: training_batches(loader, epoch, skip),
        config=train_config, checkpoint_dir=variant_dir / "checkpoints",
        signature={**model_kwargs(config), "mae_init": bool(spec.get("mae_encoder"))}, dist=dist,
        log_metrics=(lambda metrics, step: tracking.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step))
        if dist.is_main else None,
        stop_after=spec.get("stop_after"),
    )


def train_worker(job_path: Path) -> TrainSummary:
    """What every rank runs: build the model (MAE-initialised or not), train, and (rank 0) export."""
    dist = init_distributed()
    job = training_job(job_path, dist)
    summary = train(job)
    if dist.is_main and summary.steps == job.config.steps:
        variant_dir = job.checkpoint_dir.parent
        save_torch_atomic(variant_dir / "weights.pt", {k: v.cpu() for k, v in job.model.state_dict().items()})
        write_json_atomic(variant_dir / "train_summary.json", summary.record(dist.world_size))
    shutdown_distributed()
    return summary


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed_split(model: CLIP, tokenizer: Tokenizer, spec: LoaderSpec) -> dict[str, Any]:
    """Image and first-template caption embeddings of a whole split, with labels and (denormalised) images."""
    model.eval()
    images, texts, labels, pixels, captions = [], [], [], [], []
    for batch in evaluation_batches(spec):
        first = [c.split("\n")[0] for c in batch["caption"]]
        images.append(model.encode_image(batch["image"]))
        texts.append(model.encode_text(tokenizer.encode(first)))
        labels.append(batch["label"])
        pixels.append(batch["image"])
        captions.extend(first)
    return {"image": torch.cat(images), "text": torch.cat(texts), "label": torch.cat(labels),
            "pixels": torch.cat(pixels), "captions": captions}


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Row i's match is column i: the fraction of rows whose match ranks within the top k."""
    target = similarity.diagonal().unsqueeze(1)
    rank = (similarity > target).sum(1)  # how many columns beat the true one (ties count for the truth)
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, tokenizer: Tokenizer, image_features: torch.Tensor, labels: torch.Tensor,
                       classes: list[str], templates: list[str]) -> float:
    """Top-1 of the class whose prompt-ensembled text embedding (templates averaged, renormalised) is nearest."""
    prompts = torch.stack([
        torch.nn.functional.normalize(model.encode_text(tokenizer.encode([t.format(label=c) for t in templates])).mean(0), dim=-1)
        for c in classes])  # (C, D)
    predicted = (image_features @ prompts.T).argmax(1)
    return float((predicted == labels).float().mean())


def evaluate_model(model: CLIP, tokenizer: Tokenizer, data: dict[str, Any], classes: list[str] | None,
                   templates: list[str], name: str) -> dict[str, float]:
    ks = (1, 5, 10)
    similarity = data["image"] @ data["text"].T
    metrics = {}
    for k, value in recall_at(similarity, ks).items():
        metrics[f"{name}_i2t_recall_at_{k}"] = value
    for k, value in recall_at(similarity.T, ks).items():
        metrics[f"{name}_t2i_recall_at_{k}"] = value
    if classes and bool((data["label"] >= 0).all()):
        metrics[f"{name}_zero_shot_top1"] = zero_shot_accuracy(model, tokenizer, data["image"], data["label"], classes, templates)
    return metrics


def retrieval_picture(data: dict[str, Any], mean: list[float], std: list[float], queries: int) -> tuple[torch.Tensor, list[dict]]:
    """One row per text query (evenly spaced val captions, the caption as the row's label): its true
    image, then the top-5 retrieved images; a retrieved image that is the true one has a green frame."""
    n = len(data["captions"])
    picks = sorted({round(i * (n - 1) / max(queries - 1, 1)) for i in range(queries)})
    pixels = data["pixels"] * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    pixels = pixels.clamp(0, 1).expand(-1, 3, -1, -1)  # RGB, so the frame can be green
    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    rows, listing = [], []
    for query in picks:
        top = (data["text"][query] @ data["image"].T).topk(min(5, n)).indices.tolist()
        listing.append({"query": data["captions"][query], "top5": [data["captions"][i] for i in top]})
        retrieved = pixels[top].clone()
        for tile, index in zip(retrieved, top):
            if index == query:
                tile[:, :1], tile[:, -1:], tile[:, :, :1], tile[:, :, -1:] = green, green, green, green
        rows.append(torch.cat([pixels[query:query + 1], retrieved]))
    labels = [data["captions"][query][:40] for query in picks]
    columns = ["true image"] + [f"top {k + 1}" for k in range(min(5, n))]
    return labelled_grid(torch.stack(rows), row_labels=labels, column_labels=columns), listing


# ----------------------------------------------------------------------------- stage

def _launch(config: CLIPConfig, name: str, steps: int, mae_encoder: str | None, shards: StageResult, output_dir: Path,
            context: StageContext, run_id: str) -> dict[str, Any]:
    variant_dir = output_dir / name
    variant_dir.mkdir(parents=True, exist_ok=True)
    job_path = variant_dir / "job.json"
    write_json_atomic(job_path, {"config": config.model_dump(mode="json"), "shards_manifest": shards.manifest_path,
                                 "variant_dir": str(variant_dir), "steps": steps, "mae_encoder": mae_encoder,
                                 "metric_prefix": "" if name == "main" else f"{name}_",
                                 "stop_after": context.extra.get("stop_after")})
    train = config.train.model_copy(update={"steps": steps})
    return launch_training("tasks.clip_train", train_worker, job_path, train, run_id, context.data_root,
                           exported=variant_dir / "weights.pt", summary_path=variant_dir / "train_summary.json",
                           checkpoint_dir=variant_dir / "checkpoints", log=log.info)


def run(config: CLIPConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Train CLIP (and its random-init baseline) on the pairs shards, evaluate, export ``clip.pt``."""
    (shards,) = [r for r in inputs if r.stage == "shard"]
    mae = [r for r in inputs if r.stage == "mae_pretrain"]
    if config.image_init == "mae" and not mae:
        raise BadInputError("clip.image_init=mae needs the mae_pretrain stage's result as an input "
                         "(enable mae_pretrain, or set clip.image_init=random)")
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    geometry = pairs_geometry(shards.manifest_path, config.channels)
    build_model(config)  # bad geometry fails here, before any process starts
    mae_encoder = None
    if config.image_init == "mae":
        mae_outputs = mae[0].manifest()["outputs"]
        check_mae_geometry(config, mae_outputs["architecture"])
        mae_encoder = str(Path(mae[0].output_dir) / mae_outputs["encoder"]["path"])
    output_dir.mkdir(parents=True, exist_ok=True)
    world = config.train.nproc_per_node * config.train.nnodes
    params = {**config.model_dump(mode="json"), "world_size": world}
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=params, system_metrics=True) as tracked:
        summary = _launch(config, "main", config.train.steps, mae_encoder, shards, output_dir, context, tracked.info.run_id)
        metrics = {**loss_ends(summary["losses"], 10), "pairs_per_s": summary["images_per_s"],
                   "train_wall_s": summary["wall_s"], "steps": float(summary["steps"]),
                   "resumed_from_step": float(summary["resumed_from"])}
        variants = {"trained": output_dir / "main" / "weights.pt"}
        if config.image_init == "mae" and config.baseline:
            steps = config.baseline_steps or config.train.steps
            base = _launch(config, "random_init", steps, None, shards, output_dir, context, tracked.info.run_id)
            metrics.update({"random_init_final_loss": loss_ends(base["losses"], 10)["final_loss"],
                            "random_init_steps": float(steps)})
            variants["random_init"] = output_dir / "random_init" / "weights.pt"

        tokenizer = Tokenizer(config.context_length)
        val_spec = _loader_spec(config, shards.manifest_path, "val", geometry, batch_size=config.eval_batch_size)
        classes = geometry["classes"]
        evaluated = {}
        seed_everything(config.train.seed)
        untrained = build_model(config)  # the floor: random init, no training (same seed as training's init)
        for name, model in [("untrained", untrained)] + [(n, _loaded(config, p)) for n, p in variants.items()]:
            data = embed_split(model, tokenizer, val_spec)
            metrics.update(evaluate_model(model, tokenizer, data, classes, config.zero_shot_templates, name))
            evaluated[name] = (model, data)
        n_val = len(evaluated["trained"][1]["captions"])
        for k in (1, 5, 10):
            metrics[f"chance_recall_at_{k}"] = min(k, n_val) / n_val
        if classes:
            labels = evaluated["trained"][1]["label"]
            metrics["chance_zero_shot_top1"] = 1 / len(classes)
            metrics["majority_zero_shot_top1"] = float(torch.bincount(labels, minlength=len(classes)).max()) / len(labels)
        metrics["val_pairs"] = float(n_val)
        metrics["truncated_captions_eval"] = float(tokenizer.truncated)
        tracking.log_metrics(metrics)
        grid, listing = retrieval_picture(evaluated["trained"][1], geometry["mean"], geometry["std"], config.query_examples)
        log_image(grid, "retrieval/text_to_image_top5.png")
        tracking.log_dict({"columns": "true image | top-5 retrieved (framed = the true one)", "rows": listing},
                        "retrieval/text_to_image_top5.json")

        info = {"image_size": config.image_size, "channels": config.channels, "mean": geometry["mean"],
                "std": geometry["std"], "embed_dim": config.embed_dim, "context_length": config.context_length,
                "model_kwargs": model_kwargs(config), "image_init": config.image_init,
                "classes": classes, "zero_shot_templates": config.zero_shot_templates}
        save_clip(output_dir / "clip.pt", evaluated["trained"][0], tokenizer, info)
        tracking.log_artifact(output_dir / "clip.pt")
        outputs = {
            "model": {"path": "clip.pt", "sha256": sha256_file(output_dir / "clip.pt")},
            "embed_dim": config.embed_dim,
            "image": {"image_size": config.image_size, "channels": config.channels, "mean": geometry["mean"],
                      "std": geometry["std"]},
            "context_length": config.context_length,
            "tokenizer": tokenizer.state(),
        }
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)


def _loaded(config: CLIPConfig, weights: Path) -> CLIP:
    model = build_model(config)
    model.load_state_dict(load_torch_file(weights))
    return model.eval()


__all__ = ["run", "train_worker", "load_clip", "pairs_geometry", "check_mae_geometry", "recall_at"]


if __name__ == "__main__":  # a torchrun rank
    run_rank(train_worker, sys.argv[1])

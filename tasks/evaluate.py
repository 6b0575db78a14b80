"""The evaluation stage: does pretraining help? Frozen-feature linear probe and kNN, end-to-end
fine-tuning, and on the same splits the baselines that make those numbers mean something:
logistic regression on raw pixels, the same probe/kNN on a randomly initialised encoder of the same
size, and the same ViT trained from scratch with the fine-tuning budget."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import mlflow
import numpy as np
import torch

from data_shards.errors import BadInputError
from data_shards.atomic import sha256_file
from data_shards.loader import LoaderSpec, evaluation_batches, split_shards
from models.vit import VisionTransformer
from tasks import tracking
from tasks.config import EvalConfig
from tasks.devices import stage_device
from tasks.features import extract_features, random_subset, save_features
from tasks.finetune import (FinetuneJob, build_encoder, confusion_image, confusion_matrix, load_encoder_weights,
                            predict, run_finetune)
from tasks.probes import bn_linear_probe, check_labels, knn_accuracy, logistic_regression_probe
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import stage_run

STAGE = "evaluate"
SPLITS = ("train", "val", "test")
SUBSET_SEED = 0  # probe features and the pixel baseline take the same random subset of train
log = logging.getLogger("patchflow.evaluate")


def _require_labelled_splits(shard_manifest: dict[str, Any], manifest_path: str) -> list[str]:
    splits = shard_manifest["outputs"]["splits"]
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise BadInputError(f"{manifest_path}: evaluation needs train/val/test splits; missing {missing}")
    for name in SPLITS:
        if not splits[name]["has_labels"]:
            raise BadInputError(f"{manifest_path}: split {name!r} has no labels (.cls) to evaluate against")
        if name == "train" and len(splits[name]["class_histogram"]) < 2:
            raise BadInputError(f"{manifest_path}: split 'train' has only one class; a classifier needs two or more")
    return shard_manifest["outputs"]["classes"] or sorted(splits["train"]["class_histogram"])


def _spec(manifest_path: str, split: str, architecture: dict, normalization: dict, **overrides) -> LoaderSpec:
    return LoaderSpec(shard_paths=split_shards(manifest_path, split), batch_size=256, shuffle=False,
                      image_size=architecture["image_size"], channels=architecture["in_chans"],
                      mean=tuple(normalization["mean"]), std=tuple(normalization["std"]), **overrides)


def _batches(spec: LoaderSpec, limit: int | None) -> Iterable[dict[str, Any]]:
    """Every batch of the split, or a seeded random subset of ``limit`` samples (never the first N:
    shards written class by class would leave classes out)."""
    return random_subset(evaluation_batches(spec), limit, SUBSET_SEED, spec.batch_size)


def _probe(config: EvalConfig, x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, float]:
    args = (x["train"], y["train"], x["val"], y["val"], x["test"], y["test"])
    if config.probe == "logistic":
        return logistic_regression_probe(*args)
    return bn_linear_probe(*args, epochs=config.probe_epochs)


def frozen_feature_scores(config: EvalConfig, encoder: VisionTransformer, specs: dict[str, LoaderSpec],
                          features_dir: Path, name: str, device: str = "cpu") -> dict[str, float]:
    """Linear probe and kNN on one encoder's frozen features (cached as arrays for reuse); the encoder
    runs on ``device``."""
    feats = {}
    encoder.to(device)
    for split, spec in specs.items():
        limit = config.max_train_features if split == "train" else None
        feats[split] = extract_features(encoder, _batches(spec, limit), device=device, blocks=config.feature_blocks)
        save_features(features_dir / f"{name}-{split}.npz", feats[split])
    x = {s: f[config.pool] for s, f in feats.items()}
    y = {s: f["labels"] for s, f in feats.items()}
    probe = _probe(config, x, y)
    knn = knn_accuracy(x["train"], y["train"], x["test"], y["test"], k=config.knn_k, temperature=config.knn_temperature)
    return {f"{name}_linear_{k}": float(v) for k, v in probe.items() if k in ("top1", "top5")} | \
           {f"{name}_knn_{k}": float(v) for k, v in knn.items()}


def raw_pixel_scores(config: EvalConfig, specs: dict[str, LoaderSpec]) -> dict[str, float]:
    """The baseline every pretrained encoder must beat: logistic regression on the pixels."""
    x, y = {}, {}
    for split, spec in specs.items():
        batches = list(_batches(spec, config.max_train_features if split == "train" else None))
        x[split] = torch.cat([b["image"].flatten(1) for b in batches]).numpy()
        y[split] = torch.cat([b["label"] for b in batches]).numpy()
        check_labels(y[split], split, min_classes=2 if split == "train" else 1)
    result = logistic_regression_probe(x["train"], y["train"], x["val"], y["val"], x["test"], y["test"])
    return {f"pixels_linear_{k}": float(v) for k, v in result.items() if k in ("top1", "top5")}


def finetune_scores(config: EvalConfig, architecture: dict, encoder_path: Path | None, num_classes: int,
                    specs: dict[str, LoaderSpec], output_dir: Path, name: str, classes: list[str],
                    run_id: str, data_root: Path, device: str = "cpu") -> dict[str, float]:
    """Fine-tune the pretrained encoder (or train the same ViT from scratch when no weights)."""
    train = config.finetune_train
    train_spec = dataclasses.replace(specs["train"], shuffle=True, augment=config.finetune_augment, batch_size=train.batch_size,
                                     shuffle_buffer=train.shuffle_buffer, num_workers=train.num_workers, seed=train.seed)
    job = FinetuneJob(
        architecture=architecture, num_classes=num_classes, encoder_path=None if encoder_path is None else str(encoder_path),
        loader=dataclasses.asdict(train_spec), train=train.model_dump(mode="json"), layer_decay=config.layer_decay,
        label_smoothing=config.label_smoothing, drop_path=config.drop_path, global_pool=config.finetune_pool,
        signature={**architecture, "num_classes": num_classes, "init": name},
        checkpoint_dir=str(output_dir / name / "checkpoints"),
        weights_path=str(output_dir / ("classifier.pt" if name == "finetune" else f"{name}/model.pt")),
        metric_prefix=f"{name}/")
    model, summary = run_finetune(job, output_dir / name / "job.json", run_id, data_root, log=log.info)
    predicted, true = predict(model.to(device), specs["test"], device)
    scores = {f"{name}_top1": float((predicted == true).mean()), f"{name}_train_wall_s": summary["wall_s"]}
    if name == "finetune":
        matrix = confusion_matrix(predicted, true, num_classes)
        tracking.guarded("image", lambda: mlflow.log_image(confusion_image(matrix), artifact_file="confusion_matrix.png"))
        per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
        tracking.log_dict({c: float(a) for c, a in zip(classes, per_class)}, "per_class_accuracy.json")
        tracking.log_metrics({f"class_accuracy/{i}": float(a) for i, a in enumerate(per_class)})
    return scores


def run(config: EvalConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Evaluate the upstream pretrained encoder against its baselines; reuse a finished run."""
    shards = next(r for r in inputs if r.stage == "shard")
    pretrained = next(r for r in inputs if r.stage == "mae_pretrain")
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    classes = _require_labelled_splits(shards.manifest(), shards.manifest_path)
    pretrained_outputs = pretrained.manifest()["outputs"]
    architecture, normalization = pretrained_outputs["architecture"], pretrained_outputs["normalization"]
    encoder_path = Path(pretrained.output_dir) / pretrained_outputs["encoder"]["path"]
    encoder = build_encoder(architecture)
    load_encoder_weights(encoder, encoder_path)  # a mismatched checkpoint fails here, before any work
    if config.feature_blocks > len(encoder.blocks):
        raise BadInputError(f"evaluate.feature_blocks={config.feature_blocks} exceeds the {architecture['encoder_size']} "
                         f"encoder's depth {len(encoder.blocks)}")
    torch.manual_seed(0)
    random_encoder = build_encoder(architecture)
    specs = {split: _spec(shards.manifest_path, split, architecture, normalization) for split in SPLITS}
    features_dir = output_dir / "features"
    features_dir.mkdir(parents=True, exist_ok=True)

    with stage_run(STAGE, context.data_root, context.parent_run_id, params=config.model_dump(mode="json"),
                   system_metrics=True) as tracked:
        device = stage_device(context)
        metrics = frozen_feature_scores(config, encoder, specs, features_dir, "mae", device)
        metrics |= frozen_feature_scores(config, random_encoder, specs, features_dir, "random_init", device)
        metrics |= raw_pixel_scores(config, specs)
        if config.finetune:
            for name, weights in (("finetune", encoder_path), ("scratch", None)):
                metrics |= finetune_scores(config, architecture, weights, len(classes), specs, output_dir, name,
                                           classes, tracked.info.run_id, context.data_root, device)
            metrics["finetune_margin_over_scratch"] = metrics["finetune_top1"] - metrics["scratch_top1"]
        metrics["linear_margin_over_pixels"] = metrics["mae_linear_top1"] - metrics["pixels_linear_top1"]
        metrics["linear_margin_over_random_init"] = metrics["mae_linear_top1"] - metrics["random_init_linear_top1"]
        metrics["knn_margin_over_random_init"] = metrics["mae_knn_top1"] - metrics["random_init_knn_top1"]
        tracking.log_metrics(metrics)
        outputs: dict[str, Any] = {"features": sorted(p.name for p in features_dir.glob("*.npz")),
                                   "classes": classes, "architecture": architecture, "normalization": normalization}
        if (output_dir / "classifier.pt").is_file():
            outputs["classifier"] = {"path": "classifier.pt", "sha256": sha256_file(output_dir / "classifier.pt"),
                                     "num_classes": len(classes), "global_pool": config.finetune_pool}
        log.info("evaluate: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)

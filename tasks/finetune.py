"""End-to-end fine-tuning of a ViT classifier on the shared engine (MAE's ``main_finetune.py`` recipe,
scaled down): average pooling with ``fc_norm`` (or the class token), a head initialised with std 2e-5,
AdamW betas (0.9, 0.999) from the config, layer-wise lr decay, drop path, label smoothing and the
loader's crop/flip augmentation.

One process fine-tunes in-process; with ``train.nproc_per_node`` > 1 the evaluation stage launches
torchrun on this module (``python -m tasks.finetune JOB.json``), every rank running
:func:`finetune_worker` under DDP, exactly as MAE pretraining does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_shards.errors import BadInputError
from data_shards.atomic import write_json_atomic
from data_shards.loader import LoaderSpec, evaluation_batches, training_batches
from models.vit import VisionTransformer, vit_from_name
from tasks import tracking
from tasks.checkpoint import load_torch_file, save_torch_atomic
from tasks.config import TrainConfig
from tasks.distributed import DistInfo, init_distributed, launch_training, run_rank, shutdown_distributed
from tasks.engine import TrainJob, TrainSummary, no_weight_decay, seed_everything, train
from tasks.stage import StageResult

log = logging.getLogger("patchflow.finetune")

# MAE's main_finetune.py: a near-zero head, so the pretrained features are not disturbed by the first
# steps' large random logits.
HEAD_INIT_STD = 2e-5
# Pooling of MAE's fine-tuning recipe (global_pool=True): mean of the patch tokens, then fc_norm.
FINETUNE_POOL = "avg"


def build_encoder(architecture: dict[str, Any], num_classes: int = 0, drop_path: float = 0.0,
                  global_pool: Literal["token", "avg"] | None = None) -> VisionTransformer:
    """The ViT of an MAE ``architecture`` record.

    Args:
        architecture: encoder_size, image_size, patch_size, in_chans (the pretraining stage's manifest).
        num_classes: 0 for the bare encoder, else a classifier head of that size.
        drop_path: stochastic-depth rate.
        global_pool: None picks the class token and final norm for the bare encoder (what MAE
            pretraining exports) and ``FINETUNE_POOL`` for a classifier (what fine-tuning trains).
    """
    if global_pool is None:
        global_pool = FINETUNE_POOL if num_classes > 0 else "token"
    return vit_from_name(architecture["encoder_size"], img_size=architecture["image_size"],
                         patch_size=architecture["patch_size"], in_chans=architecture["in_chans"],
                         num_classes=num_classes, drop_path_rate=drop_path, global_pool=global_pool)


def load_encoder_weights(model: VisionTransformer, path: Path) -> tuple[list[str], list[str]]:
    """Load an exported MAE encoder into ``model``, strictly except for what fine-tuning adds.

    The head and, with avg pooling, ``fc_norm`` stay new; such a model has no final ``norm``, so the
    encoder's is dropped, as MAE's fine-tuning does. Any other missing, extra or misshapen key is an error.

    Returns:
        (keys of the model left at their initial values, keys of the file not loaded).
    """
    state = load_torch_file(path)
    own = model.state_dict()
    may_stay_new = ("head.", "fc_norm.")
    may_drop = ("norm.",) if model.global_pool == "avg" else ()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(may_stay_new)]
    unexpected = [k for k in state if k not in own and not k.startswith(may_drop)]
    if wrong or missing or unexpected:
        raise BadInputError(f"{path} does not match the encoder config: shapes {wrong[:5]}, missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    new = sorted(k for k in own if k not in state)
    dropped = sorted(k for k in state if k not in own)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if new or dropped:
        log.info("loaded %s: left new %s, not loaded %s", path, new, dropped)
    return new, dropped


def load_classifier(evaluation: StageResult) -> tuple[VisionTransformer, dict[str, Any], dict[str, Any]]:
    """The evaluate stage's fine-tuned classifier (eval mode), with its architecture and normalisation."""
    outputs = evaluation.manifest()["outputs"]
    classifier = outputs["classifier"]
    model = build_encoder(outputs["architecture"], num_classes=classifier["num_classes"],
                          global_pool=classifier.get("global_pool"))
    model.load_state_dict(load_torch_file(Path(evaluation.output_dir) / classifier["path"]))
    return model.eval(), outputs["architecture"], outputs["normalization"]


def init_head(model: VisionTransformer, std: float = HEAD_INIT_STD) -> None:
    """Truncated-normal head weights of standard deviation ``std`` and zero biases (MAE's fine-tuning)."""
    nn.init.trunc_normal_(model.head.weight, std=std)
    nn.init.zeros_(model.head.bias)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Parameter groups whose lr shrinks by ``layer_decay`` per layer below the head (BEiT/MAE)."""
    depth = len(model.blocks)
    plain_names = no_weight_decay(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, plain = layer_id(name, depth), name in plain_names
        group = groups.setdefault((layer, plain), {
            "params": [], "weight_decay": 0.0 if plain else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def classification_loss(label_smoothing: float):
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["image"])
        return F.cross_entropy(logits, batch["label"], label_smoothing=label_smoothing), {}
    return loss_fn


def classifier_job(
    model: nn.Module, loader: LoaderSpec, train_config: TrainConfig, checkpoint_dir: Path,
    signature: dict[str, Any], layer_decay: float, label_smoothing: float, log_metrics=None,
    stop_after: int | None = None, dist: DistInfo | None = None,
) -> TrainJob:
    """Fine-tuning (or, from random weights, training from scratch) ``model`` as a job of the shared engine.
    ``layer_decay`` below 1 needs a ViT (its blocks are the layers); any classifier trains with 1."""
    seed_everything(train_config.seed)
    if layer_decay < 1.0 and not isinstance(model, VisionTransformer):
        raise ValueError(f"layer_decay {layer_decay} needs a VisionTransformer, got {type(model).__name__}")
    groups = (lambda m, wd: layer_decay_groups(m, wd, layer_decay)) if layer_decay < 1.0 else None
    return TrainJob(
        model=model, loss_fn=classification_loss(label_smoothing),
        batches=lambda epoch, skip: training_batches(loader, epoch, skip), config=train_config,
        checkpoint_dir=checkpoint_dir, signature=signature, log_metrics=log_metrics,
        param_groups=groups, stop_after=stop_after, dist=dist or DistInfo(),
    )


def train_classifier(model: nn.Module, loader: LoaderSpec, train_config: TrainConfig, checkpoint_dir: Path,
                     signature: dict[str, Any], layer_decay: float, label_smoothing: float, **options: Any) -> TrainSummary:
    """Run :func:`classifier_job` in this process (``options``: log_metrics, stop_after, dist)."""
    return train(classifier_job(model, loader, train_config, checkpoint_dir, signature, layer_decay, label_smoothing,
                                **options))


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """Everything a rank needs to fine-tune one classifier; written as JSON for torchrun's ranks.

    ``encoder_path`` None trains the same ViT from scratch. ``loader`` is the rank-0 train spec;
    each rank takes its own slice of the shards. The trained weights go to ``weights_path``.
    """

    architecture: dict[str, Any]
    num_classes: int
    encoder_path: str | None
    loader: dict[str, Any]
    train: dict[str, Any]
    layer_decay: float
    label_smoothing: float
    drop_path: float
    signature: dict[str, Any]
    checkpoint_dir: str
    weights_path: str
    metric_prefix: str = ""
    stop_after: int | None = None
    global_pool: Literal["token", "avg"] = FINETUNE_POOL


def build_classifier(job: FinetuneJob) -> VisionTransformer:
    """The job's ViT with a head: random weights seeded by the train config, then the encoder's and,
    when fine-tuning, MAE's near-zero head (training from scratch keeps the usual init)."""
    torch.manual_seed(TrainConfig.model_validate(job.train).seed)
    model = build_encoder(job.architecture, num_classes=job.num_classes, drop_path=job.drop_path,
                          global_pool=job.global_pool)
    if job.encoder_path is not None:
        load_encoder_weights(model, Path(job.encoder_path))
        init_head(model)
    return model


def training_job(job_path: Path, dist: DistInfo) -> TrainJob:
    """The rank's training job as the stage runs it (also what benchmarks/bench_stage_efficiency.py times)."""
    job = FinetuneJob(**json.loads(Path(job_path).read_text()))
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in job.loader.items()}
    loader = LoaderSpec(**{**fields, "rank": dist.rank, "world_size": dist.world_size})
    log_metrics: Callable | None = None
    if dist.is_main:
        log_metrics = lambda m, step: tracking.log_metrics({job.metric_prefix + k: v for k, v in m.items()}, step=step)  # noqa: E731
    # The pooling changes the parameters, so a checkpoint of the other pooling must not resume here.
    signature = {**job.signature, "global_pool": job.global_pool}
    return classifier_job(build_classifier(job), loader, TrainConfig.model_validate(job.train), Path(job.checkpoint_dir),
                          signature, job.layer_decay, job.label_smoothing, log_metrics=log_metrics,
                          stop_after=job.stop_after, dist=dist)


def finetune_worker(job_path: Path) -> TrainSummary:
    """What every rank runs: build, train on its shard slice, and (rank 0) save the weights."""
    weights_path = Path(FinetuneJob(**json.loads(Path(job_path).read_text())).weights_path)
    dist = init_distributed()
    job = training_job(job_path, dist)
    summary = train(job)
    if dist.is_main and summary.steps == job.config.steps:
        save_torch_atomic(weights_path, {k: v.cpu() for k, v in job.model.state_dict().items()})
        write_json_atomic(weights_path.with_suffix(".summary.json"), summary.record(dist.world_size))
    shutdown_distributed()
    return summary


def run_finetune(job: FinetuneJob, job_path: Path, run_id: str, data_root: Path,
                 log: Callable[[str], None] | None = None) -> tuple[VisionTransformer, dict[str, Any]]:
    """Fine-tune on one process or on ``train.nproc_per_node`` torchrun ranks; return the trained model.

    Raises:
        RuntimeError: training stopped before its last step (a rerun resumes from the checkpoints).
    """
    write_json_atomic(job_path, dataclasses.asdict(job))
    weights = Path(job.weights_path)
    summary = launch_training("tasks.finetune", finetune_worker, job_path, TrainConfig.model_validate(job.train),
                              run_id, data_root, exported=weights, summary_path=weights.with_suffix(".summary.json"),
                              checkpoint_dir=Path(job.checkpoint_dir), log=log)
    model = build_encoder(job.architecture, num_classes=job.num_classes, global_pool=job.global_pool)
    model.load_state_dict(load_torch_file(weights))
    return model, summary


@torch.no_grad()
def predict(model: nn.Module, loader: LoaderSpec, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, true classes) over one ordered pass of the loader's split."""
    model.eval()
    predictions, labels = [], []
    for batch in evaluation_batches(loader):
        predictions.append(model(batch["image"].to(device)).argmax(dim=1).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(predictions), np.concatenate(labels)


def confusion_matrix(predicted: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def confusion_image(matrix: np.ndarray, cell: int = 24) -> np.ndarray:
    """A heat-map picture (H, W, 3 uint8) of a row-normalised confusion matrix, rows = true class."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    heat = (255 * (1 - rates)).astype(np.uint8)  # dark = frequent
    image = np.repeat(np.repeat(heat, cell, axis=0), cell, axis=1)
    rgb = np.stack([image, image, np.full_like(image, 255)], axis=-1)
    rgb[::cell, :, :] = rgb[:, ::cell, :] = 128  # grid lines
    return rgb


if __name__ == "__main__":  # a torchrun rank
    run_rank(finetune_worker, sys.argv[1])

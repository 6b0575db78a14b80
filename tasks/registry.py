"""Trained models as MLflow registered models: findable by name, not by folder.

After a stage that trains a model runs (not when it is reused), the model is logged with
``mlflow.pytorch.log_model`` into that stage's MLflow run, with a signature (and, for the
one-input models, an input example), and registered under a stable name. Each version carries the
run's key metrics as tags; the best version by the stage's quality metric gets the alias
``champion``, so that ``mlflow.pytorch.load_model("models:/patchflow-mae-encoder@champion")`` is the
best encoder so far and ``models:/patchflow-mae-encoder/latest`` the newest (MLflow reserves the
alias name ``latest`` for that built-in).

The MAE encoder is registered by the evaluate stage, which is what measures it (linear probe).
A version whose weights are already registered (same output digest) is not registered again.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from models.clip import load_clip
from tasks import tracking
from tasks.checkpoint import load_torch_file
from tasks.config import DiTConfig
from tasks.dit_stage import build_dit
from tasks.finetune import build_encoder, load_classifier, load_encoder_weights
from tasks.stage import StageResult

log = logging.getLogger("patchflow.registry")

CHAMPION = "champion"
# What loading the logged model needs; inferring it would import-scan the model for seconds.
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


@dataclass(frozen=True)
class LoggedModel:
    """A model ready to log: the module, its signature and (for one-input models) an input example."""

    module: torch.nn.Module
    signature: ModelSignature
    input_example: np.ndarray | None


@dataclass(frozen=True)
class Registration:
    name: str  # the registered model's name
    stage: str  # the stage after which it is registered; its metric picks the champion
    source: str  # the stage whose outputs hold the weights
    quality: str  # the metric of ``stage`` that ranks versions (higher is better)
    build: Callable[[StageResult], LoggedModel]


def _one_input(module: torch.nn.Module, shape: tuple[int, ...]) -> LoggedModel:
    module.eval()
    example = np.zeros(shape, dtype=np.float32)
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    return LoggedModel(module, infer_signature(example, output), example)


def _mae_encoder(mae: StageResult) -> LoggedModel:
    outputs = mae.manifest()["outputs"]
    arch = outputs["architecture"]
    encoder = build_encoder(arch)
    load_encoder_weights(encoder, Path(mae.output_dir) / outputs["encoder"]["path"])
    return _one_input(encoder, (2, arch["in_chans"], arch["image_size"], arch["image_size"]))


def _classifier(evaluation: StageResult) -> LoggedModel:
    model, arch, _ = load_classifier(evaluation)
    return _one_input(model, (2, arch["in_chans"], arch["image_size"], arch["image_size"]))


def _tensor(name: str, dtype: Any, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(np.dtype(dtype), shape, name)


def _clip(result: StageResult) -> LoggedModel:
    # Two inputs (images, token ids): MLflow's pytorch flavour serves one-tensor models only, so
    # the signature documents both and there is no input example to serve.
    model, _, info = load_clip(Path(result.output_dir) / result.manifest()["outputs"]["model"]["path"])
    size, channels = info["image_size"], info["channels"]
    inputs = Schema([_tensor("images", np.float32, (-1, channels, size, size)),
                     _tensor("tokens", np.int64, (-1, info["context_length"]))])
    outputs = Schema([_tensor("image_features", np.float32, (-1, info["embed_dim"])),
                      _tensor("text_features", np.float32, (-1, info["embed_dim"])),
                      _tensor("logit_scale", np.float32, ())])
    return LoggedModel(model, ModelSignature(inputs, outputs), None)


def _dit(result: StageResult) -> LoggedModel:
    manifest = result.manifest()
    arch = manifest["outputs"]["architecture"]
    model = build_dit(DiTConfig(**manifest["config"]), arch["latent_shape"], arch["num_classes"])
    model.load_state_dict(load_torch_file(Path(result.output_dir) / manifest["outputs"]["dit"]["path"]))  # EMA weights
    channels, size, _ = arch["latent_shape"]
    inputs = Schema([_tensor("x", np.float32, (-1, channels, size, size)), _tensor("t", np.int64, (-1,)),
                     _tensor("y", np.int64, (-1,))])
    outputs = Schema([_tensor("prediction", np.float32, (-1, model.out_channels, size, size))])
    return LoggedModel(model.eval(), ModelSignature(inputs, outputs), None)


REGISTRATIONS = (
    Registration("patchflow-mae-encoder", "evaluate", "mae_pretrain", "mae_linear_top1", _mae_encoder),
    Registration("patchflow-classifier", "evaluate", "evaluate", "finetune_top1", _classifier),
    Registration("patchflow-clip", "clip_train", "clip_train", "trained_t2i_recall_at_10", _clip),
    Registration("patchflow-dit", "dit_train", "dit_train", "sample_accuracy", _dit),
)


def register_models(stage: str, results: dict[str, StageResult]) -> list[str]:
    """Log and register the models the finished ``stage`` judges; returns "name vN" for each new
    version. A lost tracking server skips registration (the stage's outputs are the record)."""
    registered = []
    for registration in REGISTRATIONS:
        judge, source = results.get(registration.stage), results.get(registration.source)
        if registration.stage != stage or judge is None or source is None or judge.mlflow_run_id is None:
            continue
        if registration.quality not in judge.metrics:
            continue  # e.g. the classifier when fine-tuning was switched off
        version: list[str] = []
        tracking.guarded("registered model", lambda: version.append(_register(registration, judge, source)))
        registered += version
    return registered


def _register(registration: Registration, judge: StageResult, source: StageResult) -> str:
    client = MlflowClient(mlflow.get_tracking_uri())
    name = registration.name
    for existing in client.search_model_versions(f"name = '{name}'"):  # none before the first registration
        if existing.tags.get("patchflow.digest") == source.digest:
            return f"{name} v{existing.version} (already registered)"
    built = registration.build(source)
    with mlflow.start_run(run_id=judge.mlflow_run_id, nested=mlflow.active_run() is not None), _pickle_notice_off():
        info = mlflow.pytorch.log_model(built.module, name=registration.name.removeprefix("patchflow-"),
                                        signature=built.signature, input_example=built.input_example,
                                        pip_requirements=PIP_REQUIREMENTS,
                                        # pickle: MLflow's pt2 export would trace the model for minutes
                                        serialization_format="pickle")
    tags = {"patchflow.digest": source.digest, "patchflow.stage": source.stage, "patchflow.run_id": judge.mlflow_run_id,
            **{f"metric.{k}": f"{v:.6g}" for k, v in judge.metrics.items()}}
    version = _new_version(client, name, info, tags)
    score = judge.metrics[registration.quality]
    champion = _champion_score(client, name, registration.quality)
    if champion is None or score > champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered %s v%s (%s=%.4g%s)", name, version, registration.quality, score,
             ", champion" if champion is None or score > champion else f"; champion stays at {champion:.4g}")
    return f"{name} v{version}"


@contextlib.contextmanager
def _pickle_notice_off() -> Iterator[None]:
    """MLflow warns on every pickled model that unpickling runs code; these are our own models, loaded
    from our own store, so the warning would only repeat once per model in every run's output."""
    logger = logging.getLogger("mlflow.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _new_version(client: MlflowClient, name: str, info: Any, tags: dict[str, str]) -> str:
    """Register the logged model as a new version of ``name`` through the client, which says nothing:
    ``mlflow.register_model`` prints two lines per model to stderr on every run that trains one."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name=name, source=info.model_uri, run_id=info.run_id, tags=tags,
                                       model_id=info.model_id).version


def _champion_score(client: MlflowClient, name: str, quality: str) -> float | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    value = champion.tags.get(f"metric.{quality}")
    return float(value) if value is not None else None

"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Defaults to a SQLite store under the data root (no server needed); ``MLFLOW_TRACKING_URI`` wins
when set, so the same code logs to a real tracking server.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

EXPERIMENT_NAME = "patchflow"
# Read once at import: mlflow.set_tracking_uri() writes this variable back into os.environ, so a
# later read could no longer tell the user's server from the store of an earlier data root.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(data_root: Path) -> str:
    return USER_TRACKING_URI or f"sqlite:///{Path(data_root).resolve()}/mlflow.db"


def configure_tracking(data_root: Path) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    Path(data_root).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(data_root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        # Artifacts beside the SQLite store, not in whatever folder the user happened to start in.
        location = None if USER_TRACKING_URI else (Path(data_root).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(EXPERIMENT_NAME, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict → ``{"mae.train.steps": 100, ...}`` for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def stage_run(
    stage: str, data_root: Path, parent_run_id: str | None, params: dict[str, Any] | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open the stage's MLflow run, nested under the pipeline's parent run when there is one.

    ``system_metrics`` samples CPU/GPU/memory use alongside (for the training stages).
    """
    configure_tracking(data_root)  # a stage called without the flow still logs under its data root
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent_run_id, nested=parent_run_id is not None,
        tags={"patchflow.stage": stage}, log_system_metrics=system_metrics,
    ) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield run


def log_image(image_chw: Any, artifact_file: str, upscale: int = 1) -> None:
    """Log a (C, H, W) tensor in [0, 1] as a PNG artifact of the active run, optionally enlarged
    ``upscale`` times by nearest neighbour (28 px tiles are unreadable in the MLflow UI otherwise)."""
    import numpy as np

    if upscale > 1:
        image_chw = image_chw.repeat_interleave(upscale, dim=-2).repeat_interleave(upscale, dim=-1)
    array = (image_chw.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    mlflow.log_image(array[..., 0] if array.shape[-1] == 1 else np.ascontiguousarray(array), artifact_file=artifact_file)

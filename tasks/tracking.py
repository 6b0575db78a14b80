"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Defaults to a SQLite store under the data root (no server needed); ``MLFLOW_TRACKING_URI`` wins
when set, so the same code logs to a real tracking server.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

EXPERIMENT_NAME = "patchflow"
# Read once at import: mlflow.set_tracking_uri() writes this variable back into os.environ, so a
# later read could no longer tell the user's server from the store of an earlier data root.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(data_root: Path) -> str:
    return USER_TRACKING_URI or f"sqlite:///{store_path(data_root)}"


def store_path(data_root: Path) -> Path:
    """The data root's own SQLite store (used unless ``MLFLOW_TRACKING_URI`` names another)."""
    return Path(data_root).resolve() / "mlflow.db"


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
        try:
            yield run
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Ctrl-C, SIGTERM (SystemExit, TerminationSignal): the whole pipeline stops, not just
                # this stage, so the parent run too reads KILLED rather than FAILED.
                while mlflow.active_run() is not None:
                    mlflow.end_run("KILLED")
            raise


def log_image(image_chw: Any, artifact_file: str, upscale: int = 1) -> None:
    """Log a (C, H, W) tensor in [0, 1] as a PNG artifact of the active run, optionally enlarged
    ``upscale`` times by nearest neighbour (28 px tiles are unreadable in the MLflow UI otherwise)."""
    import numpy as np

    if upscale > 1:
        image_chw = image_chw.repeat_interleave(upscale, dim=-2).repeat_interleave(upscale, dim=-1)
    array = (image_chw.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    mlflow.log_image(array[..., 0] if array.shape[-1] == 1 else np.ascontiguousarray(array), artifact_file=artifact_file)


@dataclass(frozen=True)
class StoreHealth:
    """What stops MLflow from opening a SQLite store (``problem``, None when it opens) and how many
    runs the store holds."""

    problem: str | None
    runs: int


def inspect_store(path: Path) -> StoreHealth:
    """Compare a SQLite tracking store with the schema this MLflow writes, without changing it.

    MLflow initialises a store whose tables are not all there by migrating it from scratch, so a
    first run killed (or out of space) during that migration leaves tables that the next attempt
    creates again: "table webhooks already exists", on every run from then on.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return StoreHealth(problem=None, runs=0)
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = db.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
            runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError as exc:
        return StoreHealth(problem=f"it cannot be read as an SQLite database ({exc})", runs=0)
    if not any(not name.startswith(("alembic_", "sqlite_")) for name in tables):
        return StoreHealth(problem=None, runs=0)  # empty: MLflow creates the tables on first use
    expected, head = _expected_schema()
    problems = []
    leftovers = sorted(name for name in tables if name.startswith("_alembic_tmp_"))
    if leftovers:
        problems.append(f"an interrupted schema migration left table(s) {', '.join(leftovers)}")
    missing = sorted(expected - tables)
    if missing:
        problems.append(f"table(s) {', '.join(missing)} are missing")
    found = revision[0] if revision else None
    if found != head:
        problems.append(f"its schema version is {found}, MLflow {mlflow.__version__} expects {head}")
    return StoreHealth(problem="; ".join(problems) or None, runs=runs)


def _expected_schema() -> tuple[set[str], str]:
    """The tables and the schema (alembic) revision that MLflow checks when it opens a store."""
    import mlflow.store.db.utils as db_utils  # importing it registers every table on Base.metadata
    from mlflow.store.db.base_sql_model import Base

    return set(Base.metadata.tables), db_utils._get_latest_schema_revision()


def set_store_aside(path: Path) -> Path:
    """Rename a broken store (and SQLite's side files) to ``<name>.broken-<time>``; returns the new path."""
    suffix = f".broken-{time.strftime('%Y%m%d-%H%M%S')}"
    for side in ("", "-journal", "-wal", "-shm"):
        source = path.with_name(path.name + side)
        if source.exists():
            os.replace(source, path.with_name(path.name + suffix + side))
    return path.with_name(path.name + suffix)


def end_stale_runs(data_root: Path, started_before: float) -> list[str]:
    """Mark KILLED the runs of the data root's own store that still read RUNNING and started before
    ``started_before`` (epoch seconds): runs whose process was killed before it could end them.
    Returns their ids. A user's tracking server (``MLFLOW_TRACKING_URI``) is never touched: its
    RUNNING runs may belong to anyone."""
    path = store_path(data_root)
    if USER_TRACKING_URI or not path.is_file():
        return []
    client = MlflowClient(f"sqlite:///{path}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return []
    stale = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", run_view_type=ViewType.ALL,
                               max_results=10_000)
    ended = [run.info.run_id for run in stale if run.info.start_time < started_before * 1000]
    for run_id in ended:
        client.set_terminated(run_id, "KILLED")
    return ended

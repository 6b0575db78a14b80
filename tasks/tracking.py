"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Defaults to a SQLite store under the data root (no server needed); ``MLFLOW_TRACKING_URI`` wins
when set, so the same code logs to a real tracking server.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections import Counter
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.entities import RunTag, ViewType
from mlflow.tracking import MlflowClient

from data_shards.atomic import is_disk_full
from data_shards.errors import is_transient

EXPERIMENT_NAME = "patchflow"
# Read once at import: mlflow.set_tracking_uri() writes this variable back into os.environ, so a
# later read could no longer tell the user's server from the store of an earlier data root.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
log = logging.getLogger("patchflow.tracking")


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
        # The UI opens a "model training" experiment on its runs table, not on the GenAI trace views.
        experiment_id = client.create_experiment(EXPERIMENT_NAME, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
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


# In-stage calls fail fast: MLflow's client defaults (7 retries, exponential backoff, 120 s timeout)
# would stall training for minutes on the first call after the server went away. A user's own
# setting of these variables wins.
QUICK_FAILURE_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                          "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
COOLDOWN_S = 60.0  # after a failed call, the server is left alone this long; then one call tries again
_PLURALS = {"metric batch": "metric batches"}


class TrackingGuard:
    """Runs a stage's MLflow calls so that a tracking server lost mid-run never fails or stalls it.

    A call that fails on a lost connection, a server error or a full disk under the SQLite store
    is dropped with one warning; MLflow is then not called again for ``cooldown_s`` and the calls
    skipped meanwhile are counted, so that the stage can say at its end what is missing from
    MLflow. Any other error (a bug, a bad value) still raises. The stage's outputs and manifest
    are the record; MLflow is a view of it.
    """

    def __init__(self, cooldown_s: float = COOLDOWN_S) -> None:
        self.cooldown_s = cooldown_s
        self.reset()

    def reset(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.down_since: str | None = None
        self.problem = "unreachable"
        self.error: str | None = None
        self._last_step: int | None = None
        self._paused_until = 0.0

    def call(self, what: str, fn: Callable[[], Any], step: int | None = None, force: bool = False) -> bool:
        """Run ``fn`` (the MLflow call logging ``what``); False when it was dropped. ``force`` tries even
        during the cool-down (ending a run: it is the last chance, and MLflow unstacks the run either way)."""
        self._last_step = step if step is not None else self._last_step
        if not force and time.monotonic() < self._paused_until:
            self.dropped[what] += 1
            return False
        try:
            fn()
        except Exception as exc:
            outside = _outside_problem(exc)
            if outside is None:
                raise
            self._failed(what, step, *outside)
            return False
        if self._paused_until:
            log.info("MLflow is reachable again (down since %s); logging resumes", self.down_since)
            self._paused_until = 0.0
        return True

    def _failed(self, what: str, step: int | None, problem: str, reason: str) -> None:
        self.dropped[what] += 1
        self._paused_until = time.monotonic() + self.cooldown_s
        if self.down_since is not None:
            return  # warned already: one warning per stage, the count says the rest
        where = (f"step {step}" if step is not None else f"after step {self._last_step}" if self._last_step is not None
                 else time.strftime("%H:%M:%S"))
        self.down_since, self.problem, self.error = where, problem, reason
        log.warning("MLflow %s at %s since %s (%s): the stage goes on without it; MLflow is tried again "
                    "every %.0f s, and what is not logged is counted", problem, mlflow.get_tracking_uri(), where,
                    self.error, self.cooldown_s)

    def summary(self) -> str | None:
        """"MLflow unreachable since step 40 (...): not logged: 12 metric batches, 1 artifact", or None."""
        if not self.dropped:
            return None
        items = ", ".join(f"{n} {what if n == 1 else _PLURALS.get(what, what + 's')}" for what, n in self.dropped.items())
        return f"MLflow {self.problem} since {self.down_since} ({self.error}): not logged: {items}"


guard = TrackingGuard()


def _outside_problem(exc: BaseException) -> tuple[str, str] | None:
    """What keeps MLflow from logging and why in a few words, when it is no fault of the call: a lost
    server, or a full disk under the data root's own SQLite store (the next checkpoint save then
    reports the disk). None for anything else, which is a bug to raise."""
    if is_transient(exc):
        return "unreachable", _reason(exc)
    current: BaseException | None = exc
    for _ in range(16):  # a wrapping chain is short; this only guards against cycles
        if current is None:
            return None
        if is_disk_full(current):
            return "cannot write its store", current.strerror or "no space left on device"
        if "database or disk is full" in str(current):
            return "cannot write its store", "database or disk is full"
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    """"Connection refused" rather than MLflow's 400-character wrapping of urllib3's wrapping of it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    errno_text = re.search(r"\[Errno -?\d+\] ([^\"'()\[\]]+)", text)
    return errno_text.group(1).strip() if errno_text else text[:200]


class _NoRetryNotes(logging.Filter):
    """urllib3 logs a warning per retry; the guard's one warning and its count say it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Retrying (")


def guarded(what: str, fn: Callable[[], Any], step: int | None = None) -> bool:
    """Run one MLflow call through the process's :class:`TrackingGuard` (for calls without a helper below)."""
    return guard.call(what, fn, step=step)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """``mlflow.log_metrics`` that a lost server cannot fail; also the engine's ``log_metrics`` callback."""
    guard.call("metric batch", lambda: mlflow.log_metrics(metrics, step=step), step=step)


def log_params(params: dict[str, Any]) -> None:
    guard.call("param batch", lambda: mlflow.log_params(params))


def log_artifact(path: Path | str) -> None:
    guard.call("artifact", lambda: mlflow.log_artifact(str(path)))


def log_dict(payload: Any, artifact_file: str) -> None:
    guard.call("artifact", lambda: mlflow.log_dict(payload, artifact_file))


def set_tag(key: str, value: Any) -> None:
    guard.call("tag", lambda: mlflow.set_tag(key, value))


def tag_run(run_id: str | None, tags: dict[str, str]) -> None:
    """Tag a run other than the active one (the pipeline's run, from inside the flow); no-op without a run."""
    if run_id:
        batch = [RunTag(key, str(value)) for key, value in tags.items()]
        guard.call("tag", lambda: MlflowClient(mlflow.get_tracking_uri()).log_batch(run_id, tags=batch))


def run_link(experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI: the user's tracking server, else ``patchflow ui``'s default address."""
    base = USER_TRACKING_URI if USER_TRACKING_URI and USER_TRACKING_URI.startswith("http") else ui
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def log_artifact_to(run_id: str, path: Path | str) -> None:
    """Log a file to a run that has ended (a stage's run, with the manifest it wrote last)."""
    guard.call("artifact", lambda: MlflowClient(mlflow.get_tracking_uri()).log_artifact(run_id, str(path)))


@contextmanager
def _quick_failures() -> Iterator[None]:
    added = [name for name in QUICK_FAILURE_SETTINGS if name not in os.environ]
    os.environ.update({name: QUICK_FAILURE_SETTINGS[name] for name in added})
    quiet, urllib3_log = _NoRetryNotes(), logging.getLogger("urllib3.connectionpool")
    urllib3_log.addFilter(quiet)
    try:
        yield
    finally:
        urllib3_log.removeFilter(quiet)
        for name in added:
            os.environ.pop(name, None)


@contextmanager
def stage_run(
    stage: str, data_root: Path, parent_run_id: str | None, params: dict[str, Any] | None = None,
    system_metrics: bool = False, run_name: str | None = None, tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the stage's MLflow run, nested under the pipeline's parent run when there is one (the
    pipeline's own run is opened here too, with its ``run_name`` and ``tags``).

    ``system_metrics`` samples CPU/GPU/memory use alongside (for the training stages). Inside it,
    MLflow calls go through :data:`guard`: if the server is lost, the stage still finishes, and on
    the way out a warning says what MLflow is missing.
    """
    configure_tracking(data_root)  # a stage called without the flow still logs under its data root
    guard.reset()
    run = mlflow.start_run(run_name=run_name or stage, parent_run_id=parent_run_id, nested=parent_run_id is not None,
                           tags=tags if tags is not None else {"patchflow.stage": stage},
                           log_system_metrics=system_metrics)
    status = "FAILED"
    try:
        with _quick_failures():
            if params:
                log_params({k: str(v)[:500] for k, v in flatten(params).items()})
            try:
                yield run
                status = "FINISHED"
            except BaseException as exc:
                # Ctrl-C, SIGTERM (SystemExit, TerminationSignal): the whole pipeline stops, not just
                # this stage, so the parent run too reads KILLED rather than FAILED.
                status = "FAILED" if isinstance(exc, Exception) else "KILLED"
                raise
            finally:
                _end_runs(run.info.run_id, status)
    finally:
        report = guard.summary()
        if report:
            unended = f"; its MLflow run {run.info.run_id} still reads RUNNING" if guard.dropped["run status"] else ""
            log.warning("%s: %s. The stage's own outputs and manifest do not depend on MLflow%s", stage, report, unended)


def detach_run() -> None:
    """Leave the run a torchrun rank attached to (the launcher's stage run ends it), through the guard,
    and say what this rank could not log."""
    guard.call("run status", lambda: mlflow.end_run(), force=True)
    if report := guard.summary():
        log.warning("rank 0: %s", report)


def _end_runs(run_id: str, status: str) -> None:
    """End the stage's run (and, when KILLED, every run above it). MLflow takes a run off its stack
    before telling the server, so a failed call still leaves the next stage a clean stack."""
    while (active := mlflow.active_run()) is not None:
        if status != "KILLED" and active.info.run_id != run_id:
            return
        guard.call("run status", lambda: mlflow.end_run(status), force=True)
        if status != "KILLED" or mlflow.active_run() is active:
            return


def log_image(image_chw: Any, artifact_file: str) -> None:
    """Log a (C, H, W) tensor in [0, 1] as a PNG artifact of the active run (enlarge and label small
    tiles first with ``tasks.pictures.labelled_grid``)."""
    import numpy as np

    def log() -> None:
        array = image_chw.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        mlflow.log_image(array[..., 0] if array.shape[-1] == 1 else np.ascontiguousarray(array), artifact_file=artifact_file)

    guard.call("image", log)


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

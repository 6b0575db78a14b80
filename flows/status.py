"""What the recent pipeline runs of a data root did, read back from MLflow: the pipeline's run and
the ``stage.<name>`` tags the flow keeps on it (running, ran, reused, failed: <error>), so a failed
run is seen at a glance and resumed with exactly its preset and overrides."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from data_shards.errors import BadInputError
from flows.lock import lock_path, read_holder


@dataclass(frozen=True)
class StageStatus:
    name: str
    state: str  # ran | reused | running | failed: <first line> | killed | skipped: <why> | not started
    seconds: float | None
    mlflow_run_id: str | None  # the run that produced the stage's outputs (an earlier one when reused)


@dataclass(frozen=True)
class PipelineRun:
    run_id: str
    status: str  # MLflow's FINISHED / FAILED / KILLED, or RUNNING
    started: str
    seconds: float | None
    preset: str
    overrides: list[str]
    data_root: str
    flow_run_id: str
    stages: list[StageStatus]

    @property
    def short_id(self) -> str:
        return self.run_id[:8]


def recent_runs(data_root: str | Path, limit: int = 5) -> list[PipelineRun]:
    """The newest ``limit`` pipeline runs recorded for the data root, newest first."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import EXPERIMENT_NAME, USER_TRACKING_URI, store_path, tracking_uri

    root = Path(data_root).expanduser()
    if not USER_TRACKING_URI and not store_path(root).is_file():
        return []
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        return []
    # On a shared tracking server the experiment holds other data roots' runs too.
    where = f"tags.`patchflow.stage` = 'pipeline' and tags.`patchflow.data_root` = '{root.resolve()}'"
    found = client.search_runs([experiment.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                               max_results=limit)
    holder = _live_holder(root)
    return [_pipeline_run(run, holder) for run in found]


def find_run(data_root: str | Path, run_id: str | None) -> PipelineRun:
    """The run whose id starts with ``run_id``; without one, the newest run that did not finish."""
    runs = recent_runs(data_root, limit=200)
    if run_id is None:
        unfinished = [run for run in runs if run.status != "FINISHED"]
        if not unfinished:
            raise BadInputError(f"no failed or killed pipeline run is recorded under {data_root}",
                                hint="`patchflow status` lists the recorded runs; `patchflow run` starts a new one")
        return unfinished[0]
    matches = [run for run in runs if run.run_id.startswith(run_id)]
    if len(matches) != 1:
        known = ", ".join(run.short_id for run in runs[:10]) or "none"
        raise BadInputError(f"{'no' if not matches else 'more than one'} pipeline run under {data_root} has an id "
                            f"starting with {run_id!r} (recent: {known})",
                            hint="`patchflow status` lists the recorded runs with their ids")
    return matches[0]


def _live_holder(root: Path) -> int | None:
    """The pid of the live run holding the data root, if any (read from its lock record, not by
    taking the lock, which would refuse a run starting at that moment). Another host's holder
    cannot be checked from here and counts as live."""
    holder = read_holder(lock_path(root))
    if holder is None:
        return None
    try:
        alive = holder["host"] != socket.gethostname() or psutil.pid_exists(holder["pid"])
    except (KeyError, TypeError):
        return None
    return holder["pid"] if alive else None


def _pipeline_run(run, holder_pid: int | None) -> PipelineRun:
    tags, info = run.data.tags, run.info
    # A run still RUNNING with no live holder of the lock was killed; the next run marks it KILLED.
    status = info.status if info.status != "RUNNING" or holder_pid else "KILLED"
    stages = []
    for name in filter(None, tags.get("patchflow.planned", "").split(",")):
        state = tags.get(f"stage.{name}", "not started")
        if state == "running" and status == "KILLED":
            state = "killed"
        seconds = tags.get(f"stage.{name}.seconds")
        stages.append(StageStatus(name, state, float(seconds) if seconds else None,
                                  tags.get(f"stage.{name}.mlflow_run") or None))
    end = info.end_time
    return PipelineRun(
        run_id=info.run_id, status=status,
        started=datetime.fromtimestamp(info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        seconds=(end - info.start_time) / 1000 if end else None,
        preset=tags.get("patchflow.preset", "?"), overrides=json.loads(tags.get("patchflow.overrides", "[]")),
        data_root=tags.get("patchflow.data_root", ""), flow_run_id=tags.get("prefect.flow_run_id", ""), stages=stages,
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{seconds:.1f}s"


def format_runs(runs: list[PipelineRun], data_root: str | Path) -> str:
    """The runs as a terminal table, with the command that resumes each unfinished one."""
    if not runs:
        return f"no pipeline runs recorded under {data_root}"
    lines = []
    for run in runs:
        overrides = " ".join(f"--set {o}" for o in run.overrides)
        lines.append(f"run {run.short_id}  {run.status:8s} preset {run.preset} {overrides}".rstrip())
        lines.append(f"    started {run.started}, took {_duration(run.seconds) or '(still running)'}; "
                     f"MLflow run {run.run_id}, Prefect flow run {run.flow_run_id}")
        width = max((len(_one_line(stage.state, 70)) for stage in run.stages), default=0)
        for stage in run.stages:
            produced = f"  MLflow {stage.mlflow_run_id[:8]}" if stage.mlflow_run_id else ""
            line = f"    {stage.name:15s} {_one_line(stage.state, 70):{width}s} {_duration(stage.seconds):>8s}{produced}"
            lines.append(line.rstrip())
        if run.status in ("FAILED", "KILLED"):
            lines.append(f"    resume: patchflow resume {run.short_id} --data-root {run.data_root}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _one_line(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def runs_as_json(runs: list[PipelineRun]) -> str:
    return json.dumps([asdict(run) for run in runs], indent=2)

"""A failed run is seen in `patchflow status` and resumed with its exact config: the stages before
the failure come back reused, and the failed training stage continues from its newest checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.status import find_run, format_runs, recent_runs
from tests._shared_data import REPO_ROOT, require_shared

pytestmark = pytest.mark.slow


class InjectedFault(RuntimeError):
    pass


def test_failed_stage_shows_in_status_and_resume_continues_from_its_checkpoint(prefect_harness, tmp_path,
                                                                                monkeypatch):
    import tasks.engine
    from flows.pipeline import pipeline

    real_save = tasks.engine.save_checkpoint
    failures = []

    def save_then_fail_once(folder, step, state, keep):  # the fixture's fault: the process "dies" after step 20
        real_save(folder, step, state, keep=keep)
        if step == 20 and not failures:
            failures.append(step)
            raise InjectedFault("injected fault after the step-20 checkpoint")

    monkeypatch.setattr(tasks.engine, "save_checkpoint", save_then_fail_once)
    overrides = [f"shard.source.path={require_shared('fashion-mnist')}", "stages=[shard,mae_pretrain,evaluate]",
                 "mae.train.steps=30", "mae.train.checkpoint_every=10"]
    failed = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    assert failed.is_failed()

    (run,) = recent_runs(tmp_path)
    assert run.status == "FAILED" and run.overrides == overrides and run.preset == "smoke"
    states = {stage.name: stage.state for stage in run.stages}
    assert states == {"shard": "ran", "mae_pretrain": "failed: injected fault after the step-20 checkpoint",
                      "evaluate": "not started"}
    assert f"resume: patchflow resume {run.short_id} --data-root {tmp_path.resolve()}" in format_runs([run], tmp_path)

    again = find_run(tmp_path, None)  # `patchflow resume` without an id: the newest unfinished run
    assert again.run_id == run.run_id
    resumed = pipeline(preset=again.preset, overrides=again.overrides, data_root=again.data_root, return_state=True)
    assert resumed.is_completed()
    summary = json.loads((Path(resumed.result()["mae_pretrain"].output_dir) / "train_summary.json").read_text())
    assert summary["resumed_from"] == 20 and summary["steps"] == 30

    newest, oldest = recent_runs(tmp_path)
    assert newest.status == "FINISHED" and oldest.status == "FAILED"
    assert {s.name: s.state for s in newest.stages} == {"shard": "reused", "mae_pretrain": "ran", "evaluate": "ran"}
    # A reused stage links to the run that produced its outputs: the failed run's shard stage.
    shard_then, shard_now = (next(s for s in r.stages if s.name == "shard") for r in (oldest, newest))
    assert shard_now.mlflow_run_id == shard_then.mlflow_run_id is not None

    # The CLI reads the same store: the table, then JSON for scripts.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--data-root", str(tmp_path)],
                           capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"run {newest.short_id}  FINISHED" in shown.stdout and f"run {oldest.short_id}  FAILED" in shown.stdout
    assert "failed: injected fault after the step-20 checkpoint" in shown.stdout
    as_json = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--json", "-n", "1", "--data-root",
                              str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert [r["run_id"] for r in json.loads(as_json.stdout)] == [newest.run_id]
    nothing = subprocess.run([sys.executable, "-m", "flows.cli", "resume", "--data-root", str(tmp_path / "empty")],
                             capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert nothing.returncode == 2 and "no failed or killed pipeline run is recorded" in nothing.stderr

"""The whole flow through Prefect and MLflow: stages run once, then come back Cached."""

import asyncio

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests._shared_data import require_shared

pytestmark = pytest.mark.slow


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}

    return asyncio.run(read())


def test_second_pipeline_run_is_cached_and_mlflow_has_nested_runs(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    overrides = [f"shard.source.path={require_shared('fashion-mnist')}", "stages=[shard]"]
    first = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    second = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    assert first.is_completed() and second.is_completed()
    assert _task_states(first.state_details.flow_run_id) == {"shard": "Completed"}
    assert _task_states(second.state_details.flow_run_id) == {"shard": "Cached"}
    assert first.result()["shard"].output_dir == second.result()["shard"].output_dir

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("patchflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2
    assert [c.data.tags["patchflow.stage"] for c in children] == ["shard"]  # only the first run did work
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
    assert child.data.metrics["train_samples"] == 512
    assert "manifest.json" in [a.path for a in client.list_artifacts(child.info.run_id)]
    assert parents[0].data.params["mae.mask_ratio"] == "0.75"
    mlflow.set_tracking_uri("")  # do not leak this store into other tests

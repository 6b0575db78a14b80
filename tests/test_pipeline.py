"""The whole flow through Prefect and MLflow: stages run once, then come back Cached."""

import asyncio
import json
import shutil
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests._shared_data import require_shared

pytestmark = pytest.mark.slow


def _task_states(flow_run_id) -> dict[str, str]:
    """Stage name → state of its task run(s) in a flow run (several runs of a stage joined by '+')."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states: dict[str, list[str]] = {}
            for run in sorted(runs, key=lambda r: r.expected_start_time):
                states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
            return {name: "+".join(found) for name, found in states.items()}

    return asyncio.run(read())


def test_second_pipeline_run_is_cached_and_mlflow_has_nested_runs(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    overrides = [f"shard.source.path={require_shared('fashion-mnist')}",  # every stage, smoke budgets
                 f"pairs.source.path={require_shared('emoji-captions/twemoji')}"]
    first = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    second = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    assert first.is_completed() and second.is_completed()
    stages = {"shard", "mae_pretrain", "evaluate", "vae", "encode_latents", "dit_train", "clip_train", "index"}
    once = lambda state: {name: "+".join([state] * (2 if name == "shard" else 1)) for name in stages}  # images + pairs
    assert _task_states(first.state_details.flow_run_id) == once("Completed")
    assert _task_states(second.state_details.flow_run_id) == once("Cached")
    assert {k: r.output_dir for k, r in first.result().items()} == {k: r.output_dir for k, r in second.result().items()}

    # The last screen's headline table: each number read from the stage's manifest, beside its baseline.
    from flows.headlines import headlines, wall_times

    rows = {(row.stage, row.measure): row for row in headlines(first.result())}
    logged = json.loads(Path(first.result()["evaluate"].manifest_path).read_text())["metrics"]
    probe = rows[("evaluate", "MAE linear probe top-1")]
    assert probe.value == f"{100 * logged['mae_linear_top1']:.2f}%"
    assert probe.baseline.startswith(f"raw pixels {100 * logged['pixels_linear_top1']:.2f}%")
    assert {row.stage for row in rows.values()} == {"evaluate", "clip_train", "vae", "dit_train", "index"}
    assert rows[("vae", "VAE val PSNR")].baseline == "a small VAE trained here"  # smoke has no pretrained weights
    assert "reused" not in wall_times(first.result()) and wall_times(second.result()).count("reused") == len(stages) + 1

    # A stage whose outputs are gone (deleted, or never finished) runs again; the rest stay Cached.
    shutil.rmtree(first.result()["dit_train"].output_dir)
    third = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    states = _task_states(third.state_details.flow_run_id)
    # The cache still held the deleted stage's result: the flow notices and refreshes that one stage.
    expected = once("Cached")
    expected["dit_train"] = "Cached+Completed"
    assert states == expected
    assert Path(third.result()["dit_train"].manifest_path).is_file()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("patchflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 3
    assert sorted(c.data.tags["patchflow.stage"] for c in children) == sorted([*stages, "shard", "dit_train"])
    child = next(c for c in children if c.data.tags["patchflow.stage"] == "shard")
    assert child.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
    assert child.data.metrics["train_samples"] == 512
    assert "manifest.json" in [a.path for a in client.list_artifacts(child.info.run_id)]
    assert parents[0].data.params["mae.mask_ratio"] == "0.75"
    # The pipeline's run says what each stage did: ran the first time, reused (with a link to the run
    # that produced the outputs) after, recomputed where the outputs were gone.
    first_run, second_run, third_run = sorted(parents, key=lambda r: r.info.start_time)
    assert {f"stage.{n}" for n in stages} <= set(first_run.data.tags)
    assert all(first_run.data.tags[f"stage.{n}"] == "ran" for n in stages)
    assert all(second_run.data.tags[f"stage.{n}"] == "reused" for n in stages)
    assert second_run.data.tags["stage.mae_pretrain.mlflow_run"] == first_run.data.tags["stage.mae_pretrain.mlflow_run"]
    assert third_run.data.tags["stage.dit_train"] == "ran" and third_run.data.tags["stage.evaluate"] == "reused"
    assert "evaluate.linear_margin_over_pixels" in first_run.data.metrics  # headline numbers on the parent run
    for name in stages - {"shard", "dit_train"}:  # every stage's run keeps its manifest
        child = next(c for c in children if c.data.tags["patchflow.stage"] == name)
        assert "manifest.json" in [a.path for a in client.list_artifacts(child.info.run_id)], name

    # The flow run's Prefect artifact summarises the stages with links to their MLflow runs.
    from prefect.artifacts import Artifact

    summary = Artifact.get("patchflow-run-summary", _sync=True)
    assert "| evaluate | reused |" in summary.data and "#/experiments/" in summary.data
    assert "| evaluate | MAE linear probe top-1 |" in summary.data and "Wall time: shard " in summary.data

    # The trained models are registered: loadable by alias, one version per distinct set of weights.
    encoder = mlflow.pytorch.load_model("models:/patchflow-mae-encoder@champion")
    assert encoder(torch.zeros(2, 1, 28, 28)).shape == (2, encoder.embed_dim)
    classifier = mlflow.pytorch.load_model("models:/patchflow-classifier/latest")
    assert classifier(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    for name in ("patchflow-mae-encoder", "patchflow-classifier", "patchflow-clip", "patchflow-dit"):
        (version,) = client.search_model_versions(f"name = '{name}'")  # the rerun DiT has the same digest
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(version.version)
        assert "metric." + {"patchflow-mae-encoder": "mae_linear_top1", "patchflow-classifier": "finetune_top1",
                            "patchflow-clip": "trained_t2i_recall_at_10", "patchflow-dit": "sample_accuracy"}[name] \
            in version.tags

    # A probe setting reruns the evaluation only: the DiT branch does not depend on it.
    fourth = pipeline(preset="smoke", overrides=[*overrides, "evaluate.knn_k=5"], data_root=str(tmp_path),
                      return_state=True)
    expected = once("Cached")
    expected["evaluate"] = "Completed"
    assert _task_states(fourth.state_details.flow_run_id) == expected
    mlflow.set_tracking_uri("")  # do not leak this store into other tests


def test_concurrent_stages_run_the_branches_side_by_side_into_the_same_cached_folders(prefect_harness, tmp_path):
    """``concurrent_stages=2``: the latent-diffusion branch overlaps MAE → evaluate, each stage in a
    process of its own, dependants still wait for their inputs; the folders are the ones a one-at-a-time
    run uses (the setting is in no key), so such a run afterwards reuses every stage."""
    from flows.pipeline import pipeline

    overrides = [f"shard.source.path={require_shared('fashion-mnist')}",
                 "stages=[shard,mae_pretrain,evaluate,vae,encode_latents,dit_train]"]
    side_by_side = pipeline(preset="smoke", overrides=[*overrides, "concurrent_stages=2"], data_root=str(tmp_path),
                            return_state=True)
    assert side_by_side.is_completed()
    results = side_by_side.result()
    assert list(results) == ["shard", "mae_pretrain", "evaluate", "vae", "encode_latents", "dit_train"]
    assert all(Path(r.manifest_path).is_file() and not r.reused for r in results.values())

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("patchflow").experiment_id])
    span = {r.data.tags["patchflow.stage"]: (r.info.start_time, r.info.end_time) for r in runs
            if "mlflow.parentRunId" in r.data.tags}
    overlaps = lambda a, b: span[a][0] < span[b][1] and span[b][0] < span[a][1]  # noqa: E731
    assert any(overlaps(a, b) for a in ("mae_pretrain", "evaluate") for b in ("vae", "encode_latents", "dit_train")), span
    for stage, needed in [("mae_pretrain", "shard"), ("evaluate", "mae_pretrain"), ("vae", "shard"),
                          ("encode_latents", "vae"), ("dit_train", "encode_latents")]:
        assert span[needed][1] <= span[stage][0], f"{stage} started before {needed} ended: {span}"

    one_at_a_time = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path), return_state=True)
    assert set(_task_states(one_at_a_time.state_details.flow_run_id).values()) == {"Cached"}
    assert {k: r.output_dir for k, r in one_at_a_time.result().items()} == {k: r.output_dir for k, r in results.items()}
    mlflow.set_tracking_uri("")


def test_missing_pairs_source_skips_clip_and_says_so(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    overrides = [f"shard.source.path={require_shared('fashion-mnist')}", "stages=[shard,mae_pretrain,clip_train,index]",
                 f"pairs.source.path={tmp_path / 'no-such-table'}"]
    results = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path))
    assert set(results) == {"shard", "mae_pretrain", "index"}  # the pairs-clip index target is dropped too
    assert [t["name"] for t in results["index"].manifest()["config"]["targets"]] == ["images-mae"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("patchflow").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["stage.clip_train"] == f"skipped: no pairs source at {tmp_path / 'no-such-table'}"
    mlflow.set_tracking_uri("")


def test_a_real_tracking_server_gets_the_runs_metrics_and_registered_models(prefect_harness, tracking_server, tmp_path):
    """The same flow against a real ``mlflow server`` on a loopback port (MLFLOW_TRACKING_URI): the
    pipeline's run, its nested stage runs and metrics, and a registered model version are read back
    through MLflow's client, and the champion encoder loads through the server."""
    from flows.pipeline import pipeline
    from flows.status import recent_runs

    overrides = [f"shard.source.path={require_shared('fashion-mnist')}", "stages=[shard,mae_pretrain,evaluate]"]
    state = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path / "root"), return_state=True)
    assert state.is_completed()
    assert not (tmp_path / "root" / "mlflow.db").exists()  # nothing went to the local store

    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("patchflow")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`patchflow.stage` = 'pipeline'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["patchflow.stage"] for c in children) == ["evaluate", "mae_pretrain", "shard"]
    assert parent.info.status == "FINISHED" and "evaluate.mae_linear_top1" in parent.data.metrics
    assert len(client.get_metric_history(next(c.info.run_id for c in children
                                              if c.data.tags["patchflow.stage"] == "mae_pretrain"), "loss")) > 1
    version = client.get_model_version_by_alias("patchflow-mae-encoder", "champion")
    assert version.run_id == next(c.info.run_id for c in children if c.data.tags["patchflow.stage"] == "evaluate")
    encoder = mlflow.pytorch.load_model("models:/patchflow-mae-encoder@champion")
    assert encoder(torch.zeros(1, 1, 28, 28)).shape == (1, encoder.embed_dim)
    (run,) = recent_runs(tmp_path / "root")  # status reads the same server
    assert [(s.name, s.state) for s in run.stages] == [("shard", "ran"), ("mae_pretrain", "ran"), ("evaluate", "ran")]

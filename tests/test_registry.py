"""Registered models: each newly trained model becomes a version; ``latest`` follows the newest,
``champion`` the best by the stage's quality metric; the same weights are never registered twice."""

from __future__ import annotations

import mlflow
import mlflow.pytorch
import torch
from mlflow.tracking import MlflowClient

from tasks import registry, tracking
from tasks.stage import StageResult


def _trained(tmp_path, digest: str, score: float) -> StageResult:
    """A finished stage with its own MLflow run, as the pipeline hands it to registration."""
    with tracking.stage_run("toy_train", tmp_path, None) as run:
        pass
    return StageResult(stage="toy_train", output_dir=str(tmp_path), manifest_path=str(tmp_path / "manifest.json"),
                       digest=digest, metrics={"top1": score, "final_loss": 0.5}, mlflow_run_id=run.info.run_id)


def _toy_model(result: StageResult) -> registry.LoggedModel:
    torch.manual_seed(int(result.digest, 16))
    return registry._one_input(torch.nn.Linear(4, 3), (2, 4))


def test_versions_aliases_and_loading(tmp_path, monkeypatch):
    toy = registry.Registration("patchflow-toy", "toy_train", "toy_train", "top1", _toy_model)
    monkeypatch.setattr(registry, "REGISTRATIONS", (toy,))
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    registered = []
    for digest, score in [("01", 0.50), ("02", 0.40), ("02", 0.40), ("03", 0.60)]:
        result = _trained(tmp_path, digest, score)
        registered += registry.register_models("toy_train", {"toy_train": result})
        if digest == "02":
            worse = str(client.get_model_version_by_alias("patchflow-toy", "champion").version)
    assert registered == ["patchflow-toy v1", "patchflow-toy v2", "patchflow-toy v2 (already registered)",
                          "patchflow-toy v3"]
    assert worse == "1"  # a worse newer version does not take the champion alias
    assert str(client.get_model_version_by_alias("patchflow-toy", "champion").version) == "3"
    version = client.get_model_version("patchflow-toy", "3")
    assert version.tags["metric.top1"] == "0.6" and version.tags["patchflow.digest"] == "03"

    loaded = mlflow.pytorch.load_model("models:/patchflow-toy@champion")
    expected = _toy_model(StageResult(stage="t", output_dir="", manifest_path="", digest="03")).module
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), expected(x))
    torch.testing.assert_close(mlflow.pytorch.load_model("models:/patchflow-toy/latest")(x), expected(x))
    signature = mlflow.models.get_model_info("models:/patchflow-toy@champion").signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 4)
    # Another stage's completion registers nothing of this model.
    assert registry.register_models("evaluate", {"toy_train": result}) == []
    mlflow.set_tracking_uri("")


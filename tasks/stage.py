"""The stage contract shared by every stage: output folders named by what they were made from,
and a manifest written last, so a folder without a manifest is a stage that did not finish."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from data_shards.atomic import write_json_atomic
from tasks.config import StrictModel
from tasks.verify import MANIFEST_NAME, describe_files  # noqa: F401  (stages import MANIFEST_NAME from here)

# Bump a stage's version when its code changes what it writes: old outputs are then not reused.
CODE_VERSIONS: dict[str, str] = {
    "shard": "2", "mae_pretrain": "1", "evaluate": "1", "vae": "1", "encode_latents": "1", "dit_train": "1",
    "index": "1",
}


class StageResult(BaseModel):
    """What a stage hands downstream: small, serialisable, and enough to find its outputs."""

    stage: str
    output_dir: str
    manifest_path: str
    digest: str
    metrics: dict[str, float] = {}
    mlflow_run_id: str | None = None
    reused: bool = False

    def manifest(self) -> dict[str, Any]:
        return json.loads(Path(self.manifest_path).read_text())


@dataclass
class StageContext:
    """What a stage needs besides its config and inputs: where to write and whom to report to."""

    data_root: Path
    parent_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def stage_key(stage: str, config: StrictModel, inputs: list[StageResult]) -> str:
    """Hash of stage name, code version, config and upstream output digests."""
    payload = json.dumps(
        {
            "stage": stage,
            "code": CODE_VERSIONS.get(stage, "0"),
            "config": config.model_dump(mode="json"),
            "inputs": sorted(result.digest for result in inputs),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_output_dir(
    data_root: Path, stage: str, config: StrictModel, inputs: list[StageResult]
) -> Path:
    return Path(data_root) / "stages" / stage / stage_key(stage, config, inputs)


def outputs_digest(stage: str, outputs: dict[str, Any]) -> str:
    """Digest of what a stage produced (checksums and counts, never timestamps)."""
    payload = json.dumps({"stage": stage, "outputs": outputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_manifest(
    output_dir: Path,
    stage: str,
    config: StrictModel,
    inputs: list[StageResult],
    outputs: dict[str, Any],
    metrics: dict[str, float],
    mlflow_run_id: str | None,
) -> StageResult:
    """Write the manifest (the last act of a stage) and return the stage's result."""
    digest = outputs_digest(stage, outputs)
    manifest = {
        "stage": stage,
        "code_version": CODE_VERSIONS.get(stage, "0"),
        "config": config.model_dump(mode="json"),
        "inputs": [{"stage": r.stage, "digest": r.digest, "manifest": r.manifest_path} for r in inputs],
        "outputs": outputs,
        # What tasks/verify.py checks before the folder is reused (not part of the digest: the same
        # outputs keep their digest, so downstream caches survive this record being added).
        "files": describe_files(Path(output_dir)),
        "metrics": metrics,
        "digest": digest,
        "mlflow_run_id": mlflow_run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(output_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return result_from_manifest(path)


def result_from_manifest(path: Path, reused: bool = False) -> StageResult:
    manifest = json.loads(Path(path).read_text())
    return StageResult(
        stage=manifest["stage"],
        output_dir=str(Path(path).parent),
        manifest_path=str(path),
        digest=manifest["digest"],
        metrics=manifest.get("metrics", {}),
        mlflow_run_id=manifest.get("mlflow_run_id"),
        reused=reused,
    )


def finished_result(output_dir: Path) -> StageResult | None:
    """The result of an earlier finished run of this exact stage, or None."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return result_from_manifest(path, reused=True)

"""The stage contract shared by every stage: output folders named by what they were made from,
and a manifest written last, so a folder without a manifest is a stage that did not finish."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from data_shards.atomic import write_json_atomic
from tasks.config import StrictModel
from tasks.verify import MANIFEST_NAME, describe_files  # noqa: F401  (stages import MANIFEST_NAME from here)

# The module whose ``run`` each stage is. Its code, and that of every project module it imports, is
# hashed into the stage's key; an ``external_inputs(config, data_root)`` function there, if any, names
# the files the stage reads from outside the data root.
STAGE_MODULES: dict[str, str] = {
    "shard": "tasks.shard", "mae_pretrain": "tasks.mae_pretrain", "evaluate": "tasks.evaluate", "vae": "tasks.vae_train",
    "encode_latents": "tasks.latents", "dit_train": "tasks.dit_stage", "clip_train": "tasks.clip_train", "index": "tasks.index",
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("models", "data_shards", "tasks")
# Every stage imports tasks.config, yet it is left out of the code hash: all it gives a stage reaches the
# stage as validated config values, which the key holds (a new field or default changes the dumped
# values of exactly the sections that have it). Hashing it would re-run every stage for a reworded
# description or a new field of another stage.
UNHASHED_MODULES = frozenset({"tasks.config"})


class StageResult(BaseModel):
    """What a stage hands downstream: small, serialisable, and enough to find its outputs."""

    stage: str
    output_dir: str
    manifest_path: str
    digest: str
    metrics: dict[str, float] = {}
    mlflow_run_id: str | None = None
    reused: bool = False
    wall_s: float = 0.0  # this flow run's time in the stage (near zero when reused)
    started_s: float = 0.0  # when this flow run started the stage (seconds since the epoch)

    def manifest(self) -> dict[str, Any]:
        return json.loads(Path(self.manifest_path).read_text())


@dataclass
class StageContext:
    """What a stage needs besides its config and inputs: where to write and whom to report to."""

    data_root: Path
    parent_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Set when stages run side by side (``concurrent_stages`` > 1): the stage runs in a process of its
    # own with this many compute threads, so its seeds, thread count and MLflow run are its own.
    process_threads: int | None = None


def _module_file(name: str) -> Path | None:
    """The project file of module ``name`` (a package's ``__init__.py``); None outside the project's packages."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _imported_names(name: str, is_package: bool, tree: ast.Module) -> set[str]:
    """Every module an ``import`` anywhere in ``tree`` may load, with the packages above it (importing
    ``a.b`` runs ``a/__init__.py``); names that are not modules are dropped later, finding no file."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from tasks import shard` loads a module
    return {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 2)}


@functools.cache
def _parsed_module(name: str) -> tuple[str, frozenset[str]]:
    """(digest of the module's code, the modules it imports); read once per process.

    The digest is of the syntax tree, so editing a comment or the layout keeps every key (docstrings
    are code here and count); another Python version may dump trees differently and re-run stages once.
    """
    path = _module_file(name)
    assert path is not None, name
    tree = ast.parse(path.read_bytes(), filename=str(path))
    digest = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    return digest, frozenset(_imported_names(name, path.name == "__init__.py", tree))


@functools.cache
def code_modules(module: str) -> tuple[str, ...]:
    """``module`` and every project module it imports, directly or not, in name order (none of
    ``UNHASHED_MODULES``)."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or name in UNHASHED_MODULES or _module_file(name) is None:
            continue
        seen.add(name)
        pending.extend(_parsed_module(name)[1])
    return tuple(sorted(seen))


def _stage_module(stage: str) -> str:
    if stage not in STAGE_MODULES:
        raise KeyError(f"unknown stage {stage!r}: tasks/stage.py STAGE_MODULES names {sorted(STAGE_MODULES)}")
    return STAGE_MODULES[stage]


def code_digest(stage: str) -> str:
    """Hash of the code a stage runs: its module and the project modules it imports (models/,
    data_shards/, tasks/), so any change there re-runs the stage and a change elsewhere does not."""
    modules = code_modules(_stage_module(stage))
    payload = json.dumps({name: _parsed_module(name)[0] for name in modules}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def external_inputs(stage: str, config: StrictModel, data_root: Path) -> dict[str, str]:
    """Fingerprints of the files the stage reads from outside the data root (a source folder,
    pretrained weights), from its module's ``external_inputs`` hook; cheap, and computed before any
    cache lookup, so a changed file changes the key."""
    hook = getattr(importlib.import_module(_stage_module(stage)), "external_inputs", None)
    return dict(hook(config, Path(data_root))) if hook is not None else {}


def _execution_only(field_info: FieldInfo) -> bool:
    extra = field_info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("execution_only"))


def _without_execution_only(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _without_execution_only(getattr(value, name), dumped[name])
                for name, info in type(value).model_fields.items() if not _execution_only(info)}
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_without_execution_only(item, item_dumped) for item, item_dumped in zip(value, dumped)]
    return dumped


def key_config(config: StrictModel) -> dict[str, Any]:
    """The config as a key sees it: every value but the fields tasks/config.py marks
    ``json_schema_extra={"execution_only": True}`` (how a run executes, not what it computes)."""
    return _without_execution_only(config, config.model_dump(mode="json"))


def stage_key(
    stage: str, config: StrictModel, inputs: list[StageResult], external: Mapping[str, str] | None = None
) -> str:
    """Hash of what a stage's outputs depend on: its name, its code (:func:`code_digest`), its config
    (:func:`key_config`), its upstream output digests and ``external`` (:func:`external_inputs`)."""
    payload = json.dumps(
        {
            "stage": stage,
            "code": code_digest(stage),
            "config": key_config(config),
            "inputs": sorted(result.digest for result in inputs),
            "external": dict(external or {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_output_dir(
    data_root: Path, stage: str, config: StrictModel, inputs: list[StageResult],
    external: Mapping[str, str] | None = None,
) -> Path:
    """The stage's folder, named by :func:`stage_key`. ``external`` is computed here unless the
    caller passes the values it computed (to record the same ones in its manifest)."""
    if external is None:
        external = external_inputs(stage, config, data_root)
    return Path(data_root) / "stages" / stage / stage_key(stage, config, inputs, external)


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
    external: Mapping[str, str] | None = None,
) -> StageResult:
    """Write the manifest (the last act of a stage) and return the stage's result."""
    digest = outputs_digest(stage, outputs)
    manifest = {
        "stage": stage,
        "code_version": code_digest(stage),
        "external_inputs": dict(external or {}),
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

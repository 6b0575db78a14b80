"""Small builders shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from tasks import shard
from tasks.config import ShardConfig, SourceConfig
from tasks.stage import StageContext, StageResult
from tests._shared_data import require_shared


def fashion_source(**limits: int) -> SourceConfig:
    path = require_shared("fashion-mnist")
    return SourceConfig(kind="fashion_mnist", path=str(path), **({"max_train": 200, "max_val": 40, "max_test": 40} | limits))


def make_shards(data_root: Path, source: SourceConfig | None = None, **shard_args) -> StageResult:
    config = ShardConfig(source=source or fashion_source(), **({"samples_per_shard": 50} | shard_args))
    return shard.run(config, [], StageContext(data_root=Path(data_root)))


def manifest(result: StageResult) -> dict:
    return json.loads(Path(result.manifest_path).read_text())

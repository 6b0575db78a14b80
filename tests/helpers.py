"""Small builders shared by the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


class TrackingServer:
    """A real ``mlflow server`` on a free loopback port, over a SQLite store that outlives it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{port}"
        log = open(self.folder / f"server-{port}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / f"server-{port}.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} did not start")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

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
from typing import Callable

import torch

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


def fp32_and_bf16_loss_curves(start: Callable[[], tuple[torch.nn.Module, Callable[[], torch.Tensor]]], steps: int,
                              **adamw) -> tuple[torch.Tensor, torch.Tensor]:
    """Each step's loss of the same training in fp32 and under CPU bf16 autocast (``train.precision: bf16``).

    ``start()`` runs once per precision after seeding 0 and returns the model and a function giving one
    step's loss; AdamW takes ``adamw``."""
    curves = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model, next_loss = start()
        optimizer = torch.optim.AdamW(model.parameters(), **adamw)
        losses = []
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = next_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        curves.append(torch.tensor(losses))
    return curves[0], curves[1]


def assert_bf16_follows_fp32(fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    """The documented precision choice holds: bf16's loss curve stays within 5% of fp32's, step by step and at the end."""
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.max(), (fp32, bf16)
    assert abs(float(bf16[-5:].mean() - fp32[-5:].mean())) <= 0.05 * float(fp32[-5:].mean()), (fp32, bf16)

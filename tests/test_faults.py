"""Faults from outside the code: a disk that fills up, a tracking server that goes away mid-run.

The full disk is a real tmpfs of a few MiB mounted where the output goes (this needs root; without
it the disk fills by a budget checked inside the project's own atomic-write helper instead).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_shards import atomic
from data_shards.atomic import DiskFullError, atomic_directory
from data_shards.writer import write_split
from tasks import mae_pretrain, tracking
from tasks.checkpoint import list_checkpoints, load_latest
from tasks.config import MAEConfig, TrainConfig
from tasks.stage import StageContext, stage_output_dir
from tests.helpers import make_shards


class SmallDisk:
    """A folder on a filesystem of ``size`` bytes that can be grown in place (contents kept)."""

    def __init__(self, folder: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.monkeypatch = folder, monkeypatch
        folder.mkdir(parents=True, exist_ok=True)
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                      capture_output=True).returncode == 0
        if not self.mounted:
            self._simulate(size)

    def grow(self, size: int) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)], check=True)
        else:
            self._simulate(size)

    def _simulate(self, size: int) -> None:
        """Without root: the helper's fsync of a finished temporary file fails as a full disk would."""
        real_fsync, folder = atomic._fsync, self.folder

        def fsync_within_budget(path: Path) -> None:
            if Path(path).is_relative_to(folder):
                used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                if used > size:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real_fsync(path)

        self.monkeypatch.setattr(atomic, "_fsync", fsync_within_budget)

    def release(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture
def small_disk(monkeypatch):
    disks: list[SmallDisk] = []

    def make(folder: Path, size: int) -> SmallDisk:
        disks.append(SmallDisk(folder, size, monkeypatch))
        return disks[-1]

    yield make
    for disk in disks:
        disk.release()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), samples_per_shard=50)


def _mae_config(**train_args) -> MAEConfig:
    train = {"batch_size": 16, "steps": 6, "checkpoint_every": 2, "keep_checkpoints": 1, "log_every": 1,
             "eval_every": 100, "num_workers": 1, "shuffle_buffer": 64, "optim": {"base_lr": 2e-3, "warmup_steps": 2}}
    return MAEConfig(encoder_size="nano", image_size=28, patch_size=4, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2, train=TrainConfig.model_validate(train | train_args))


@pytest.mark.slow
def test_full_disk_fails_the_checkpoint_save_keeps_the_older_one_and_a_rerun_resumes(shards, tmp_path, small_disk, caplog):
    config, root = _mae_config(), tmp_path / "root"
    # One checkpoint's size, measured: the disk then holds one and a half, so the save at step 4
    # (written beside step 2, which is pruned only afterwards) runs out of space.
    probe = mae_pretrain.run(config.model_copy(update={"train": config.train.model_copy(update={"steps": 2})}),
                             [shards], StageContext(data_root=tmp_path / "probe"))
    size = list_checkpoints(Path(probe.output_dir) / "checkpoints")[0].stat().st_size
    checkpoints = stage_output_dir(root, mae_pretrain.STAGE, config, [shards]) / "checkpoints"
    disk = small_disk(checkpoints, size * 3 // 2)

    with pytest.raises(DiskFullError) as failure:
        mae_pretrain.run(config, [shards], StageContext(data_root=root))

    message = str(failure.value)
    assert message.startswith(f"{checkpoints / 'step-00000004.pt'}: ")
    assert "to write" in message and "free there" in message
    assert "another --data-root" in failure.value.hint and "resumes" in failure.value.hint
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002.pt"]
    assert _leftovers(checkpoints) == []
    signature = mae_pretrain.model_signature(config, 1)
    assert load_latest(checkpoints, signature)["step"] == 2

    disk.grow(size * 4)  # the user frees space; the same command resumes from step 2
    with caplog.at_level("INFO", logger="patchflow.engine"):
        result = mae_pretrain.run(config, [shards], StageContext(data_root=root))
    assert "resuming from step 2" in caplog.text
    assert result.manifest()["metrics"]["resumed_from_step"] == 2.0


def test_full_disk_during_a_shard_write_names_the_folder_and_keeps_the_old_shards(tmp_path, small_disk):
    from data_shards.samples import RawSample
    from data_shards.writer import encode_all

    disk_folder = tmp_path / "disk"
    if not small_disk(disk_folder, 256 * 1024).mounted:
        pytest.skip("needs a real small filesystem (root, to mount a tmpfs): tar writes bypass the simulated budget")
    final = disk_folder / "shards"
    final.mkdir()
    (final / "train-000000.tar").write_bytes(b"the old shard")
    noise = torch.Generator().manual_seed(0)
    samples = [RawSample(key=f"s{i:04d}", origin=f"sample {i}", label=0,
                         pixels=torch.randint(0, 256, (64, 64), generator=noise, dtype=torch.uint8).numpy())
               for i in range(200)]  # about 4 KiB each as PNG: 800 KiB in all
    encoded = encode_all(samples, workers=1)

    with pytest.raises(DiskFullError) as failure, atomic_directory(final) as staging:
        write_split(staging, "train", encoded, samples_per_shard=20, max_shard_bytes=1 << 30)

    message = str(failure.value)
    assert message.startswith(f"{final}: ") and "at least" in message and "free there" in message
    assert (final / "train-000000.tar").read_bytes() == b"the old shard"
    assert _leftovers(disk_folder) == []


@pytest.fixture
def dead_server(monkeypatch):
    """A tracking URI on a loopback port nothing listens on, and a fresh guard."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    monkeypatch.setattr(tracking, "guard", tracking.TrackingGuard())
    yield tracking.guard
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)


def test_unreachable_server_costs_one_quick_failure_then_calls_are_counted_not_made(dead_server, caplog):
    with caplog.at_level(logging.WARNING), tracking._quick_failures():
        started = time.monotonic()
        tracking.log_metrics({"loss": 1.0}, step=7)
        first_call = time.monotonic() - started  # MLflow's defaults: 7 retries, about two minutes
        started = time.monotonic()
        for step in range(8, 20):
            tracking.log_metrics({"loss": 1.0}, step=step)
        tracking.log_artifact(__file__)
        skipped = time.monotonic() - started
    assert first_call < 20 and skipped < 0.5
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name != "patchflow.tracking"] == []
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "patchflow.tracking"]
    assert "since step 7 (Connection refused)" in warning
    assert dead_server.summary() == "MLflow unreachable since step 7 (Connection refused): not logged: 13 metric batches, 1 artifact"


def test_a_bug_in_a_logging_call_is_not_swallowed(dead_server):
    with pytest.raises(ZeroDivisionError):
        tracking.guarded("metric batch", lambda: 1 / 0)
    assert dead_server.summary() is None


def test_a_full_disk_under_the_tracking_store_drops_metrics_instead_of_failing_the_stage(tmp_path, small_disk, caplog):
    root = tmp_path / "root"
    if not small_disk(root, 2 * 1024 * 1024).mounted:
        pytest.skip("needs a real small filesystem (root, to mount a tmpfs) for SQLite to run out of space")
    with caplog.at_level(logging.WARNING, logger="patchflow.tracking"):
        with tracking.stage_run("probe", root, None) as run:
            with pytest.raises(OSError) as filling, open(root / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            assert filling.value.errno == errno.ENOSPC
            for step in range(1, 6):
                tracking.log_metrics({"loss": 1.0}, step=step)
    first, last = [r.getMessage() for r in caplog.records if r.name == "patchflow.tracking"]
    assert "MLflow cannot write its store at sqlite:///" in first and "since step 1 (database or disk is full)" in first
    assert "not logged: 5 metric batches, 1 run status" in last and run.info.run_id in last
    assert mlflow.active_run() is None


@pytest.mark.slow
def test_tracking_server_lost_mid_training_drops_metrics_with_one_warning_and_the_stage_finishes(
        shards, tmp_path, tracking_server, monkeypatch, caplog):
    config = _mae_config(steps=40, checkpoint_every=20, keep_checkpoints=2, eval_every=100)
    real_log_metrics, reached_after_stop = mlflow.log_metrics, []

    def log_then_stop_the_server(metrics, step=None, **kwargs):
        """The server is stopped right after step 10 reached it; what comes after is timed."""
        stopped = tracking_server.process.poll() is not None
        started = time.monotonic()
        try:
            real_log_metrics(metrics, step=step, **kwargs)
        finally:
            if stopped:
                reached_after_stop.append((step, time.monotonic() - started))
        if step == 10:
            tracking_server.stop()

    monkeypatch.setattr(mlflow, "log_metrics", log_then_stop_the_server)
    monkeypatch.setattr(tracking.guard, "cooldown_s", 3600.0)  # however slow this machine, no retry in the test
    root = tmp_path / "root"
    with caplog.at_level(logging.WARNING, logger="patchflow.tracking"):
        result = mae_pretrain.run(config, [shards], StageContext(data_root=root))

    output = Path(result.output_dir)
    assert (output / "encoder.pt").is_file() and Path(result.manifest_path).is_file()
    assert result.manifest()["metrics"]["steps"] == 40.0
    # One call found the server gone (and failed fast: MLflow's own retries take minutes); the rest
    # were not even tried.
    assert [step for step, _ in reached_after_stop] == [11]
    assert reached_after_stop[0][1] < 30
    warnings = [r.getMessage() for r in caplog.records if r.name == "patchflow.tracking"]
    assert len(warnings) == 2, warnings
    assert "MLflow unreachable at" in warnings[0] and "since step 11" in warnings[0]
    # Steps 11..40, the validation loss at step 40 and the stage's final metrics; the reconstruction
    # grid; the encoder; the run's FINISHED status.
    assert warnings[1].startswith("mae_pretrain: MLflow unreachable since step 11")
    assert "not logged: 32 metric batches, 1 image, 1 artifact, 1 run status" in warnings[1]
    assert f"run {result.mlflow_run_id} still reads RUNNING" in warnings[1]

    tracking_server.start()  # the same store, served again: what was logged before the stop is there
    history = MlflowClient(tracking_server.uri).get_metric_history(result.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))

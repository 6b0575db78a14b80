"""Stopping a run and starting the next one: Ctrl-C and SIGTERM end ``patchflow run`` within
seconds and leave no process behind, the next run cleans up after a killed one and resumes, and a
data root that cannot hold a run is refused at once with a message that names it."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from flows import lock
from flows.preflight import (
    PreflightError, check_free_space, check_tracking_store, clean_up_after_killed_runs, min_free_bytes, preflight,
)
from tasks.tracking import inspect_store
from tests._shared_data import REPO_ROOT, require_shared

STOP_WITHIN_S = 15  # from the signal to the exit, on a busy 2-core machine


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start_training(root: Path, log: Path, nproc: int, *settings: str) -> subprocess.Popen:
    """``patchflow run`` (shard + MAE, 60 steps, a checkpoint every 10, then ``settings``) in its own
    process group, as a terminal runs a foreground job."""
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--data-root", str(root),
               "--set", f"shard.source.path={require_shared('fashion-mnist')}", "--set", "stages=[shard,mae_pretrain]",
               "--set", "mae.train.steps=60", "--set", "mae.train.checkpoint_every=10",
               "--set", f"mae.train.nproc_per_node={nproc}"]
    for setting in settings:
        command += ["--set", setting]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_cli_env(), cwd=REPO_ROOT,
                                start_new_session=True)


def _wait_for_checkpoint(process: subprocess.Popen, root: Path, log: Path, timeout: float = 480,
                         stage: str = "mae_pretrain") -> None:
    deadline = time.monotonic() + timeout
    while not list(root.glob(f"stages/{stage}/*/checkpoints/step-*.pt")):
        if process.poll() is not None:
            pytest.fail(f"patchflow run ended (code {process.returncode}) before training began:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            _kill_group(process)
            pytest.fail(f"no checkpoint after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _stop_and_time(process: subprocess.Popen, send) -> tuple[int, float]:
    start = time.monotonic()
    send()
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        pytest.fail("patchflow run did not stop within 120 s of the signal")
    return code, time.monotonic() - start


def _survivors(watched: list[psutil.Process], group: int) -> list[str]:
    """Watched processes still running, and anything still in the run's process group."""
    time.sleep(0.5)  # let the kernel finish reaping
    alive = [p for p in watched if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process not in alive:
                alive.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return [f"{p.pid} {' '.join(p.cmdline()[:6])}" for p in alive if p.is_running()]


def _children_by_role(pid: int) -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {"prefect server": [], "torchrun": [], "stage process": [], "other": []}
    for child in psutil.Process(pid).children(recursive=True):
        command = " ".join(child.cmdline())
        role = "prefect server" if "prefect.server.api.server:create_app" in command else (
            "torchrun" if "torch.distributed.run" in command else
            "stage process" if "flows.stage_process" in command else "other")
        found[role].append(child)
    return found


def _stop_and_check(process: subprocess.Popen, log: Path, signum: int, to_group: bool, expected_code: int) -> str:
    """Send ``signum`` (to the process group, as a terminal does, or to the CLI alone) once everything
    it must stop is running; check the exit code, that it came within STOP_WITHIN_S and that no
    process survives. Returns the run's output."""
    watched = [p for group in _children_by_role(process.pid).values() for p in group]
    code, took = _stop_and_time(process, lambda: (os.killpg if to_group else os.kill)(process.pid, signum))
    output = log.read_text()
    print(f"{signal.Signals(signum).name} to the {'group' if to_group else 'CLI'}: exit {code} after {took:.1f} s")
    assert code == expected_code, output[-3000:]
    assert took < STOP_WITHIN_S, f"stopped after {took:.1f} s"
    assert not _survivors(watched, group=process.pid)
    return output


def _run_statuses(root: Path) -> dict[str, str]:
    """Stage (or ``pipeline``) → the status of its MLflow run in the data root's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("patchflow").experiment_id])
    return {run.data.tags.get("patchflow.stage", "pipeline"): run.info.status for run in runs}


@pytest.mark.slow
def test_ctrl_c_stops_everything_with_130_and_the_next_run_resumes(tmp_path):
    root, log = tmp_path / "root", tmp_path / "run.log"
    process = _start_training(root, log, nproc=2)
    _wait_for_checkpoint(process, root, log)
    children = _children_by_role(process.pid)
    assert children["prefect server"] and children["torchrun"], children  # what the signal must not leave behind

    output = _stop_and_check(process, log, signal.SIGINT, to_group=True, expected_code=130)  # the terminal's Ctrl-C
    assert "ConnectError" not in output and "All connection attempts failed" not in output
    assert "SIGINT received" in output

    # A staging folder of an earlier killed run, as data_shards.atomic.atomic_directory leaves it.
    stale = root / "stages" / "shard" / ".0123456789abcdef.k9x2.partial"
    stale.mkdir(parents=True)
    (stale / "train-000000.tar").write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    rerun = subprocess.run([*process.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=_cli_env(), cwd=REPO_ROOT, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    # At least the planted folder; a rank killed inside a checkpoint write leaves a .tmp file too.
    assert re.search(r"removed [1-9][0-9]* unfinished staging", rerun.stdout) and not stale.exists()
    assert "resuming from step" in rerun.stdout  # training went on from its checkpoint
    assert "shard reused" in rerun.stdout or "Cached" in rerun.stdout
    # The last screen: each stage's wall time, and no library chatter (MLflow's system-metrics lines).
    assert re.search(r"Wall time: shard reused · mae_pretrain (\d+ min )?\d+ s · stages total", rerun.stdout), rerun.stdout[-1500:]
    assert "mlflow.system_metrics" not in rerun.stdout


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_143_stops_the_server_and_marks_runs_killed(tmp_path):
    root, log = tmp_path / "root", tmp_path / "run.log"
    process = _start_training(root, log, nproc=1)
    _wait_for_checkpoint(process, root, log)
    assert _children_by_role(process.pid)["prefect server"]

    _stop_and_check(process, log, signal.SIGTERM, to_group=False, expected_code=143)
    assert _run_statuses(root) == {"pipeline": "KILLED", "shard": "FINISHED", "mae_pretrain": "KILLED"}
    assert lock.read_holder(lock.lock_path(root)) is None  # released on the way out: the next run starts cleanly


@pytest.mark.slow
def test_ctrl_c_stops_stages_running_side_by_side_and_the_next_run_resumes_them(tmp_path):
    """concurrent_stages=2: MAE and the VAE train at once, each in a process of its own (its own
    session, out of the terminal's reach); Ctrl-C reaches only the pipeline, which stops both."""
    root, log = tmp_path / "root", tmp_path / "run.log"
    side_by_side = ("concurrent_stages=2", "stages=[shard,mae_pretrain,vae]", "mae.train.steps=300", "vae.train.steps=100",
                    "vae.train.checkpoint_every=5")
    process = _start_training(root, log, 1, *side_by_side)
    for stage in ("mae_pretrain", "vae"):
        _wait_for_checkpoint(process, root, log, stage=stage)
    children = _children_by_role(process.pid)
    assert len(children["stage process"]) == 2, children  # MAE and the VAE, at once

    _stop_and_check(process, log, signal.SIGINT, to_group=True, expected_code=130)
    assert _run_statuses(root) == {"pipeline": "KILLED", "shard": "FINISHED", "mae_pretrain": "KILLED", "vae": "KILLED"}

    rerun = subprocess.run([*process.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=_cli_env(), cwd=REPO_ROOT, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert rerun.stdout.count("resuming from step") == 2, rerun.stdout[-3000:]  # both went on from their checkpoints
    assert "elapsed side by side" in rerun.stdout


@contextmanager
def _read_only_folder(path: Path) -> Iterator[str]:
    """A folder that really refuses writes, holding what an earlier run left (``prefect/``), and how
    it was made: a read-only tmpfs mount, else the immutable attribute (root ignores chmod)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True).returncode == 0:
        try:
            (path / "prefect").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
            yield "read-only tmpfs"
        finally:
            subprocess.run(["umount", str(path)], capture_output=True)
        return
    (path / "prefect").mkdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        return
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield "chmod 555"
        finally:
            path.chmod(0o755)
        return
    pytest.skip("cannot make a read-only folder here: mount and chattr are refused and chmod does not bind root")


def test_read_only_data_root_is_refused_at_once_with_exit_2(tmp_path):
    root = tmp_path / "root"
    with _read_only_folder(root) as how:
        with pytest.raises(OSError):
            (root / "probe").write_text("x")  # the folder really is read-only
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--data-root", str(root)],
                                capture_output=True, text=True, env=_cli_env(), cwd=REPO_ROOT, timeout=120)
        took = time.monotonic() - start
    assert result.returncode == 2, (how, result.stderr[-2000:])
    assert f"data root {root} is read-only" in result.stderr, result.stderr[-2000:]
    assert took < 30, f"{took:.1f} s ({how})"  # it used to wait 130 s for Prefect's server


def test_too_little_free_space_is_reported_with_the_free_space(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_MIN_FREE_GIB", "1e9")  # more than any disk here
    with pytest.raises(PreflightError, match=rf"data root {re.escape(str(tmp_path))} has only [0-9.]+ GiB free; a run needs at least"):
        check_free_space(tmp_path, min_free_bytes())
    monkeypatch.setenv("PATCHFLOW_MIN_FREE_GIB", "0.001")
    check_free_space(tmp_path, min_free_bytes())


# ------------------------------------------------------------------ a half-initialised MLflow store

WEBHOOKS_MIGRATION_PARENT = "de4033877273"  # mlflow 3.17: the revision before 1a0cddfcaa16 creates `webhooks`


def _open_store(path: Path):
    """Open (and create or migrate) a SQLite store exactly as MLflow does; returns the store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{path}", (path.parent / "artifacts").as_uri())
    store.engine.dispose()
    return store


@pytest.fixture(scope="module")
def healthy_stores(tmp_path_factory) -> dict[str, Path]:
    """A store MLflow just created (no runs), and a copy holding one run."""
    folder = tmp_path_factory.mktemp("stores")
    empty = folder / "empty.db"
    _open_store(empty).create_experiment("patchflow")
    with_run = folder / "with-run.db"
    shutil.copy(empty, with_run)
    store = _open_store(with_run)
    store.create_run(store.get_experiment_by_name("patchflow").experiment_id, user_id="test", start_time=0,
                     tags=[], run_name="kept")
    store.engine.dispose()
    return {"empty": empty, "with_run": with_run}


@pytest.mark.slow
def test_half_initialised_store_without_runs_is_set_aside_and_a_fresh_one_works(healthy_stores, tmp_path, caplog):
    from sqlalchemy.exc import OperationalError

    db = tmp_path / "mlflow.db"
    shutil.copy(healthy_stores["empty"], db)
    assert inspect_store(db).problem is None  # a healthy store is left alone on every run
    # A first run killed inside the migration that creates `webhooks`: the table exists, the
    # version stamp does not say so, the migration's second table is missing.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (WEBHOOKS_MIGRATION_PARENT,))
        conn.execute("DROP TABLE webhook_events")
    probe = tmp_path / "probe" / "mlflow.db"
    probe.parent.mkdir()
    shutil.copy(db, probe)
    with pytest.raises(OperationalError, match="table webhooks already exists"):
        _open_store(probe)  # what every later run hit

    with caplog.at_level(logging.WARNING, logger="patchflow.preflight"):
        check_tracking_store(tmp_path)
    moved = list(tmp_path.glob("mlflow.db.broken-*"))
    assert len(moved) == 1 and not db.exists()
    assert f"MLflow store {db} was half-initialised" in caplog.text and str(moved[0]) in caplog.text
    assert "webhook_events" in caplog.text
    store = _open_store(db)  # the next run's fresh store opens and records
    assert store.create_experiment("patchflow")


def test_half_migrated_store_with_runs_is_named_with_the_fix(healthy_stores, tmp_path):
    db = tmp_path / "mlflow.db"
    shutil.copy(healthy_stores["with_run"], db)
    assert inspect_store(db).problem is None
    with sqlite3.connect(db) as conn:  # an upgrade killed inside a batch migration of `runs`
        conn.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32) NOT NULL)")
    with pytest.raises(PreflightError) as raised:
        check_tracking_store(tmp_path)
    message = str(raised.value)
    assert f"MLflow store {db} cannot be opened" in message and "_alembic_tmp_runs" in message
    assert "holds 1 run(s)" in message and f"mlflow db upgrade sqlite:///{db}" in message
    assert db.exists() and not list(tmp_path.glob("mlflow.db.broken-*"))  # runs are never moved away


# ------------------------------------------------------------------ leftovers of a killed run

_KILLED_RUN = """
import sys, time, mlflow
from tasks.tracking import configure_tracking
configure_tracking(sys.argv[1])
run = mlflow.start_run(run_name="killed")
print(run.info.run_id, flush=True)
time.sleep(600)
"""


def _run_killed_while_tracking(root: Path) -> str:
    """A real process that opened an MLflow run in the root's store and was SIGKILLed: the run stays RUNNING."""
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(root)], stdout=subprocess.PIPE, text=True,
                               env=_cli_env(), cwd=REPO_ROOT)
    run_id = process.stdout.readline().strip()
    process.kill()
    process.wait()
    assert run_id, "the tracking process died before it opened a run"
    return run_id


def _staging_leftovers(root: Path) -> list[Path]:
    folder = root / "stages" / "shard" / ".0123456789abcdef.a1b2.partial"
    folder.mkdir(parents=True)
    (folder / "train-000000.tar").write_bytes(b"half a shard")
    checkpoints = root / "stages" / "mae_pretrain" / "0123456789abcdef" / "checkpoints"
    checkpoints.mkdir(parents=True)
    temporary = checkpoints / ".step-00000010.pt.x7y8.tmp"
    temporary.write_bytes(b"half a checkpoint")
    finished = checkpoints / "step-00000005.pt"
    finished.write_bytes(b"a checkpoint")
    return [folder, temporary, finished]


@pytest.mark.slow
def test_next_run_removes_staging_leftovers_and_ends_runs_of_a_killed_run(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    run_id = _run_killed_while_tracking(tmp_path)
    folder, temporary, finished = _staging_leftovers(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert client.get_run(run_id).info.status == "RUNNING"

    with caplog.at_level(logging.WARNING, logger="patchflow.preflight"):
        clean_up_after_killed_runs(tmp_path, started_before=time.time())

    assert not folder.exists() and not temporary.exists() and finished.exists()
    assert client.get_run(run_id).info.status == "KILLED"
    assert "removed 2 unfinished staging" in caplog.text and run_id in caplog.text


def test_leftovers_are_kept_while_another_run_holds_the_root(tmp_path, monkeypatch):
    """A live run's staging folders look like leftovers; its lock keeps the next run from cleaning them."""
    import flows.preflight
    from flows.lock import DataRootBusy

    # preflight as the CLI runs it, minus what would outlive the test: signal handlers, an atexit hold.
    monkeypatch.setattr(flows.preflight, "exit_on_signals", lambda: None)
    monkeypatch.setattr(flows.preflight, "hold_for_process", lock.acquire)

    folder, temporary, _ = _staging_leftovers(tmp_path)
    hold = "import sys, time; from flows.lock import hold_for_process; hold_for_process(sys.argv[1]); print('held', flush=True); time.sleep(120)"
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(DataRootBusy, match=f"pid {other.pid}"):
            preflight(tmp_path)
        assert folder.exists() and temporary.exists()
    finally:
        other.kill()
        other.wait()
    with lock.data_root_lock(tmp_path):  # once it has ended (killed: its lock went with it), they go
        clean_up_after_killed_runs(tmp_path, started_before=time.time())
    assert not folder.exists() and not temporary.exists()
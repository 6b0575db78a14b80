"""One run per data root: a second ``patchflow run`` refuses naming the holder, or with ``--wait``
queues behind it; a lock left by a killed process is taken over; outputs stay intact."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import lock
from tests._shared_data import REPO_ROOT, require_shared

HOLD = ("import sys, time; from flows.lock import hold_for_process; hold_for_process(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _holder(root: Path) -> subprocess.Popen:
    """Another process holding the data root's lock, as a live run would."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                               env=_env(), cwd=REPO_ROOT)
    assert process.stdout.readline().strip() == "held"
    return process


def _run(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--data-root", str(root),
            "--set", f"shard.source.path={require_shared('fashion-mnist')}", "--set", "stages=[shard]", *extra]


def test_second_run_on_a_held_data_root_refuses_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        done = subprocess.run(_run(tmp_path), capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stderr
    assert f"data root {tmp_path.resolve()} is in use by another patchflow run (pid {holder.pid} on " in done.stderr
    assert "fix: wait for it to finish, run with --wait" in done.stderr
    assert not (tmp_path / "stages").exists()  # refused before anything was written


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="patchflow.lock"):
        with lock.data_root_lock(tmp_path):
            assert lock.read_holder(lock.lock_path(tmp_path))["pid"] == os.getpid()
            with lock.data_root_lock(tmp_path):  # reentrant within one process (the CLI, then the flow)
                pass
            assert lock.lock_path(tmp_path) in lock._held  # still held after the inner block
    assert f"did not exit cleanly (pid {holder.pid} on" in caplog.text
    assert lock.read_holder(lock.lock_path(tmp_path)) is None  # a clean release empties the record
    with caplog.at_level(logging.WARNING, logger="patchflow.lock"):
        caplog.clear()
        with lock.data_root_lock(tmp_path):
            pass
    assert "did not exit cleanly" not in caplog.text


def test_waiting_run_starts_when_the_holder_ends_and_outputs_verify(tmp_path):
    holder = _holder(tmp_path)
    waiting = subprocess.Popen(_run(tmp_path, "--wait"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_env(), cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        lines = []
        while not any("waiting for it to finish" in line for line in lines):
            assert time.monotonic() < deadline and waiting.poll() is None, "".join(lines)
            lines.append(waiting.stdout.readline())
        assert not (tmp_path / "stages").exists()  # queued, not writing beside the holder
    finally:
        holder.terminate()
        holder.wait()
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, "".join(lines) + out
    verified = subprocess.run([sys.executable, "-m", "flows.cli", "verify", "--data-root", str(tmp_path)],
                              capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=120)
    assert verified.returncode == 0 and "1 finished stage folder(s)" in verified.stdout, verified.stdout

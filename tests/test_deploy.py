"""Scheduled runs as users set them up: a real ``prefect server`` on a loopback port, a process work
pool and worker, ``prefect deploy --all`` from prefect.yaml; the shard-only deployment runs to
completion and the nightly schedules are registered."""

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

import pytest

from tests._shared_data import REPO_ROOT, require_shared

pytestmark = pytest.mark.slow
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_deploy_all_then_the_shard_only_deployment_completes_and_schedules_exist(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PATCHFLOW_REPO": str(REPO_ROOT),
           "PATCHFLOW_DATA_ROOT": str(tmp_path / "root"), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("server", "worker")}
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=logs["server"], stderr=subprocess.STDOUT, env=env, start_new_session=True)
    worker = None
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not start"
                time.sleep(0.5)

        def prefect(*args: str, timeout: float = 300) -> str:
            done = subprocess.run([*PREFECT, "--no-prompt", *args], capture_output=True, text=True, env=env,
                                  cwd=REPO_ROOT, timeout=timeout)
            assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            return done.stdout

        prefect("work-pool", "create", "patchflow", "--type", "process")
        prefect("deploy", "--all")
        nightly = prefect("deployment", "inspect", "patchflow/nightly-demo")
        assert "0 2 * * *" in nightly and "'wait_for_lock': True" in nightly
        assert "0 3 * * 6" in prefect("deployment", "inspect", "patchflow/nightly-small")

        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "patchflow"], stdout=logs["worker"],
                                  stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
        overrides = ["stages=[shard]", f"shard.source.path={require_shared('fashion-mnist')}"]
        prefect("deployment", "run", "patchflow/shard-only", "--params", json.dumps({"overrides": overrides}),
                "--watch", "--watch-timeout", "400", timeout=480)
        manifests = list((tmp_path / "root" / "stages" / "shard").glob("*/manifest.json"))
        assert len(manifests) == 1, (tmp_path / "worker.log").read_text()[-3000:]
        assert json.loads(manifests[0].read_text())["outputs"]["splits"]["train"]["num_samples"] == 12000
    finally:
        for process in (worker, server):
            if process is not None:
                _stop(process)
        for handle in logs.values():
            handle.close()

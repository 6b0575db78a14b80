"""Test-wide setup: Prefect and MLflow state in a temporary folder, never in the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="patchflow-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (it costs 10–20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks_into_later_subprocesses():
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, so a test that tracked into its
    own temporary store would send every later test's CLI subprocess there (the CLI honours the user's
    variable). Each test starts without it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def tracking_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` on a loopback port that the stages log to (as ``MLFLOW_TRACKING_URI``)."""
    import mlflow

    from tasks import tracking
    from tests.helpers import TrackingServer

    server = TrackingServer(tmp_path)
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", server.start())
    yield server
    server.stop()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri left it there
    mlflow.set_tracking_uri(None)

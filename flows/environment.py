"""Process-wide defaults that must be set before Prefect is imported, and Prefect's temporary server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Library chatter kept out of the terminal: e.g. four mlflow.system_metrics lines per training stage
# ("Skip logging GPU metrics", ...), an HTTP line per Prefect API call.
NOISY_LOGGERS = ("httpx", "httpcore", "alembic", "mlflow.store.db.utils", "mlflow.system_metrics", "faiss.loader")


def quiet_library_loggers() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def prepare_environment(data_root: Path) -> None:
    """Keep Prefect's state under the data root unless the user chose otherwise, then start
    Prefect's temporary API server (unless ``PREFECT_API_URL`` names a real one)."""
    os.environ.setdefault("PREFECT_HOME", str(Path(data_root) / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    # Machines without internet: analytics would only time out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server takes 9–17 s to start on 2 cores; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Stage logs (training progress, torchrun output) reach the Prefect UI's flow-run page too; the
    # same loggers used outside a flow run (preflight, the lock) stay terminal-only without a warning.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "patchflow")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Started here rather than lazily by Prefect's client: Prefect would start it where a
    # terminal's Ctrl-C reaches it too (see flows/prefect_server.py).
    from flows.prefect_server import start_temporary_server

    start_temporary_server()

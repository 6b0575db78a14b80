"""Process-wide defaults that must be set before Prefect is imported."""

from __future__ import annotations

import os
from pathlib import Path


def prepare_environment(data_root: Path) -> None:
    """Keep Prefect's state under the data root unless the user chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(Path(data_root) / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    # Machines without internet: analytics would only time out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server takes 9–17 s to start on 2 cores; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

"""Locate the shared read-only data folder (real weights, real images) for tests.

Real-data tests skip when the folder is missing on a developer machine, but fail under ``CI=true``:
a CI run that silently skips them would prove nothing about the real data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA_ENV = "PATCHFLOW_SHARED_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``$PATCHFLOW_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    override = os.environ.get(SHARED_DATA_ENV)
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_shared(relpath: str) -> Path:
    """Path of ``relpath`` under the shared data folder; skip the test if it is missing (fail under CI=true).

    Args:
        relpath: path relative to the shared data folder, e.g. ``"taesd/taef2_encoder.pth"``.
    """
    path = shared_data_dir() / relpath
    if not path.exists():
        reason = f"shared data file {path} is missing (set ${SHARED_DATA_ENV} to the shared data folder)"
        if _in_ci():
            pytest.fail(f"{reason}; CI=true, so this real-data test must not be skipped", pytrace=False)
        pytest.skip(reason)
    return path

"""Checks and clean-up before a run touches its data root.

A read-only or full data root, or a broken MLflow store, fails at once with a message that names
the path, instead of hanging on Prefect's server or failing deep inside a stage. Leftovers of a
killed run (staging folders, MLflow runs still marked RUNNING) are cleaned up, but only while no
other live run uses the data root.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

from flows.interrupts import exit_on_signals
from flows.lock import hold_for_process
from tasks.config import ConfigError

MIN_FREE_ENV = "PATCHFLOW_MIN_FREE_GIB"
DEFAULT_MIN_FREE_GIB = 1.0

log = logging.getLogger("patchflow.preflight")


class PreflightError(ConfigError):
    """The data root cannot hold a run; the CLI prints the message and exits 2."""


def preflight(data_root: str | Path, wait_for_lock: bool = False) -> None:
    """Ready this process and its data root for a run; raises :class:`PreflightError` when the root is
    unusable, :class:`flows.lock.DataRootBusy` when another run holds it (unless ``wait_for_lock``).
    Run before anything else writes under the root."""
    exit_on_signals()
    root = Path(data_root).expanduser()
    check_writable(root)
    hold_for_process(root, wait=wait_for_lock)  # before the clean-up: leftovers are then a dead run's
    check_free_space(root, min_free_bytes())
    check_tracking_store(root)
    clean_up_after_killed_runs(root, started_before=psutil.Process().create_time())


def check_writable(root: Path) -> None:
    """Create the root if needed and prove a file can be written in it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root, prefix=".preflight-"):
            pass
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise PreflightError(f"data root {root} is read-only: cannot create files in it ({exc.strerror}); "
                                 "choose a writable folder with --data-root") from None
        raise PreflightError(f"data root {root} cannot be used: {exc.strerror}") from None


def min_free_bytes() -> int:
    """The free space a run needs, from ``PATCHFLOW_MIN_FREE_GIB`` (default 1 GiB)."""
    value = os.environ.get(MIN_FREE_ENV, str(DEFAULT_MIN_FREE_GIB))
    try:
        return int(float(value) * 2**30)
    except ValueError:
        raise PreflightError(f"{MIN_FREE_ENV}={value!r} is not a number of GiB") from None


def check_free_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise PreflightError(f"data root {root} has only {_gib(free)} free; a run needs at least {_gib(needed)} "
                             f"(free some space, choose another --data-root, or lower {MIN_FREE_ENV})")


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def check_tracking_store(root: Path) -> None:
    """Set aside a half-initialised MLflow store that holds no runs; name the fix when it holds runs."""
    from tasks.tracking import USER_TRACKING_URI, inspect_store, set_store_aside, store_path

    if USER_TRACKING_URI:
        return  # a tracking server the user runs; its health is the server's business
    path = store_path(root)
    health = inspect_store(path)
    if health.problem is None:
        return
    if health.runs == 0:
        moved = set_store_aside(path)
        log.warning("MLflow store %s was half-initialised (%s) and held no runs: moved it to %s; "
                    "this run starts a fresh store", path, health.problem, moved)
        return
    raise PreflightError(
        f"MLflow store {path} cannot be opened: {health.problem}. It holds {health.runs} run(s). To keep them: "
        f"back it up (cp {path} {path}.bak), drop any _alembic_tmp_* table (sqlite3 {path} 'DROP TABLE <name>'), then "
        f"run: mlflow db upgrade sqlite:///{path}. To start a fresh store instead: mv {path} {path}.broken")


def clean_up_after_killed_runs(root: Path, started_before: float) -> None:
    """Remove staging leftovers and end RUNNING MLflow runs that predate ``started_before``.

    Called only while this process holds the data root's lock (flows/lock.py), so no live run can
    own them: they are a killed run's.
    """
    from tasks.tracking import end_stale_runs

    removed = remove_stale_staging(root, started_before)
    if removed:
        log.warning("removed %d unfinished staging folder(s)/file(s) left by an interrupted run under %s",
                    removed, root / "stages")
    ended = end_stale_runs(root, started_before)
    if ended:
        log.warning("marked %d MLflow run(s) left RUNNING by an interrupted run as KILLED: %s", len(ended), ", ".join(ended))


def remove_stale_staging(root: Path, started_before: float) -> int:
    """Delete ``.*.partial`` folders and files (atomic_directory, latents) and ``.*.tmp`` files
    (write_bytes_atomic) under ``<root>/stages`` last changed before ``started_before``; returns
    how many. Nothing else ever has these names there: finished outputs are renamed into place."""
    removed = 0
    for folder, dirs, files in os.walk(root / "stages"):
        for name in [d for d in dirs if _is_staging(d, is_dir=True)]:
            path = Path(folder) / name
            dirs.remove(name)  # not walked into, whether removed or not
            if path.lstat().st_mtime < started_before:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        for name in files:
            path = Path(folder) / name
            if _is_staging(name, is_dir=False) and path.lstat().st_mtime < started_before:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _is_staging(name: str, is_dir: bool) -> bool:
    return name.startswith(".") and (name.endswith(".partial") or (not is_dir and name.endswith(".tmp")))

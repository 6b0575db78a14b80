"""One pipeline run per data root at a time.

Two runs writing one data root would race on the same stage folders, checkpoints and MLflow runs.
A run holds an exclusive ``flock`` on ``<data root>/run.lock`` for as long as it lives. The kernel
drops the lock when the holding process dies, however it dies, so a lock left by a killed run is
never stale: the next run simply takes it, and notices from the holder record still in the file
that its predecessor did not end cleanly. The record (pid, host, start time, command) is what a
refused or waiting run prints to name the holder.

``flock`` works across processes on one machine and, on Linux, across machines on NFSv4 (where the
kernel maps it onto byte-range locks); other shared filesystems may not honour it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from data_shards.errors import PatchflowError

LOCK_NAME = "run.lock"
POLL_SECONDS = 1.0

log = logging.getLogger("patchflow.lock")

# Locks this process holds, by lock-file path: [file descriptor, how many holders in this process].
# flock is per open file, so a second open-and-lock in the same process would wait on itself; the
# CLI takes the lock in preflight and the flow takes it again, and the second is a no-op.
_held: dict[Path, list[int]] = {}


class DataRootBusy(PatchflowError):
    """Another live run holds the data root."""

    default_hint = "wait for it to finish, run with --wait to queue behind it, or choose another --data-root"


def lock_path(data_root: str | Path) -> Path:
    return Path(data_root).expanduser().resolve() / LOCK_NAME


def read_holder(path: Path) -> dict | None:
    """The holder record in a lock file, or None when it holds none (free, or being written)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


def describe(holder: dict | None) -> str:
    if holder is None:
        return "a run that has not written its record yet"
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"


def acquire(data_root: str | Path, wait: bool = False) -> None:
    """Take the data root's lock for this process. Refuses with :class:`DataRootBusy` naming the
    holder, or with ``wait`` blocks until the holder ends. Reentrant within a process."""
    path = lock_path(data_root)
    if path in _held:
        _held[path][1] += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock(fd, path, wait)
    except BaseException:
        os.close(fd)
        raise
    previous = read_holder(path)
    if previous is not None:  # a clean exit empties the record; this one's process died holding the lock
        log.warning("took over the lock on %s from a run that did not exit cleanly (%s)", path.parent, describe(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[path] = [fd, 1]


def _lock(fd: int, path: Path, wait: bool) -> None:
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = describe(read_holder(path))
            if not wait:
                raise DataRootBusy(f"data root {path.parent} is in use by another patchflow run ({holder})") from None
            if not announced:
                log.warning("data root %s is in use by another patchflow run (%s); waiting for it to finish",
                            path.parent, holder)
                announced = True
            time.sleep(POLL_SECONDS)


def release(data_root: str | Path) -> None:
    """Drop one hold of this process on the data root's lock; the last one empties the record (so
    the next run knows this one ended cleanly) and unlocks."""
    path = lock_path(data_root)
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[path]
    fd = entry[0]
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def hold_for_process(data_root: str | Path, wait: bool = False) -> None:
    """Take the lock until this process exits (the CLI's run)."""
    acquire(data_root, wait)
    atexit.register(release, data_root)


@contextlib.contextmanager
def data_root_lock(data_root: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold the data root's lock for a block (the flow; a no-op hold when the CLI already has it)."""
    acquire(data_root, wait)
    try:
        yield
    finally:
        release(data_root)

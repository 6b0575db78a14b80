"""Stopping a run on Ctrl-C, SIGTERM or a closed terminal: unwind, clean up, exit 128 + signal."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_stopping: int | None = None  # the exit code, once a stop signal arrived


def exit_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the main thread.

    SystemExit is a BaseException, so Prefect records the flow run as crashed instead of retrying
    the task, ``run_torchrun`` stops every rank, ``with`` blocks close their MLflow runs and
    partial files, and the interpreter then exits with the shell's code for the signal (130, 143,
    129) after running its atexit handlers, among them the one that stops Prefect's temporary
    server. Python's default SIGTERM action would kill the process before any of that; Prefect's
    own SIGTERM bridge re-sends the signal to whatever handler was installed before it, i.e. this one.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_exit)
    # Registered before Prefect, MLflow and torch load, so it runs after their atexit handlers.
    atexit.register(_skip_finalization)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    global _stopping
    if _stopping is not None:
        # A second Ctrl-C must not abort the clean-up half-way and leave children running; the
        # clean-up is bounded (torchrun ranks get 20 s, Prefect's server 5 s).
        _say(f"patchflow: {signal.Signals(signum).name} again; still stopping child processes\n")
        return
    _stopping = 128 + signum
    _say(f"patchflow: {signal.Signals(signum).name} received; stopping (finished stages and checkpoints are kept)\n")
    raise SystemExit(_stopping)


def _skip_finalization() -> None:
    """After a stop signal, exit without the interpreter's final garbage collection.

    With torch, Prefect and MLflow loaded that collection took ten of the twelve seconds between a
    SIGTERM and the exit on a busy 2-core machine. Nothing is lost: the unwinding closed every file
    a stage writes, and the atexit handlers that ran before this one stopped Prefect's server and
    flushed its logs; the log handlers are flushed here.
    """
    if _stopping is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_stopping)


def _say(message: str) -> None:
    # os.write, not print: a handler can run in the middle of another print to the same stream.
    try:
        os.write(2, message.encode())
    except OSError:  # the terminal is gone (SIGHUP)
        pass

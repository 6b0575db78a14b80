"""Prefect's temporary API server, started so that a terminal's Ctrl-C does not kill it mid-run.

Import only after :func:`flows.environment.prepare_environment` has set Prefect's environment.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL


class ShieldedServer(SubprocessASGIServer):
    """Prefect's temporary server, started with SIGINT blocked in its process.

    Prefect starts the server in our process group, so the SIGINT a terminal sends to the whole
    foreground group on Ctrl-C killed it at once, and the flow then retried the dead API for minutes
    while recording the crash. A blocked signal survives fork and exec (uvicorn installs handlers but
    never unblocks), so the server keeps serving while the run winds down. It still stops on the
    SIGTERM that ``stop()`` sends at exit and on a closed terminal's SIGHUP, and it stays in our
    process group, so whoever stops the group stops it too.
    """

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super()._run_uvicorn_command()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_temporary_server() -> str | None:
    """Start the temporary server now, unless ``PREFECT_API_URL`` names a real one; returns its API URL.

    The instance registers under Prefect's default key, so every Prefect client in this process
    (flow engine, log and event workers) talks to it, and Prefect's atexit hook stops it.
    """
    if PREFECT_API_URL.value():
        return None
    server = ShieldedServer()
    server.start()
    return server.api_url

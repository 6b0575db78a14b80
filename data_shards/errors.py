"""The error hierarchy: what is the user's to fix (bad input) and what may pass on a retry (transient).

Every layer raises these (data_shards is the lowest that does, so the classes live here). The
pipeline retries a stage only when :func:`is_transient` says so, and the CLI prints a
:class:`PatchflowError` as one line plus its ``hint`` instead of a traceback.
"""

from __future__ import annotations

import errno
import sqlite3
import sys

# Errnos a network filesystem or a lost socket raises; the same call may well succeed a moment later.
NETWORK_ERRNOS = frozenset({
    errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET,
})
_CHAIN_LIMIT = 16  # causes followed at most (a chain is short; this only guards against cycles)


class PatchflowError(Exception):
    """An expected failure. The message says what is wrong and names the file, field or stage;
    ``hint`` (one line) says what the user should do about it."""

    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # Pickled with its hint: a stage run in a process of its own hands its error back this way.
        return type(self), (str(self), self.hint)


class BadInputError(PatchflowError, ValueError):
    """The config, source, shards or a saved file are wrong: retrying cannot help. A ValueError too,
    since that is what such checks raised before there was a hierarchy."""


class TransientError(PatchflowError):
    """A fault outside the input (a lost connection, a busy database) that a retry may get past."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or the fault it was raised from) may pass if the same work is tried again.

    A :class:`PatchflowError` says so by its class. Third-party faults count when they are a lost
    connection to the Prefect or MLflow API, an MLflow server error (5xx), a locked SQLite
    database, or a network-filesystem errno. Anything else is not: retrying a bug or a NaN loss
    with the same seed only fails the same way again.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < _CHAIN_LIMIT:
        if isinstance(current, PatchflowError):
            return isinstance(current, TransientError)
        if _is_transient_fault(current):
            return True
        seen += 1
        # Libraries wrap the fault (SQLAlchemy wraps sqlite3, MLflow wraps requests); follow the cause,
        # and the context unless the raiser suppressed it on purpose (``raise ... from None``).
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _is_transient_fault(exc: BaseException) -> bool:
    if _is_locked_database(exc) or _is_lost_connection(exc) or _is_mlflow_server_error(exc):
        return True
    return isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS


def _is_locked_database(exc: BaseException) -> bool:
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    operational = (sqlite3.OperationalError,) + ((sqlalchemy_exc.OperationalError,) if sqlalchemy_exc else ())
    return isinstance(exc, operational) and "database is locked" in str(exc)


def _is_lost_connection(exc: BaseException) -> bool:
    # Look the libraries up only if they are loaded: an exception of a module never imported cannot exist.
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadTimeout,
                                              httpx.ConnectTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
        return True
    requests_exc = sys.modules.get("requests.exceptions")
    # RetryError: the server kept answering 5xx/429 until the client's own retries ran out (MLflow's client).
    return requests_exc is not None and isinstance(exc, (requests_exc.ConnectionError, requests_exc.Timeout,
                                                         requests_exc.RetryError))


def _is_mlflow_server_error(exc: BaseException) -> bool:
    mlflow_exc = sys.modules.get("mlflow.exceptions")
    if mlflow_exc is None or not isinstance(exc, mlflow_exc.RestException):
        return False
    status = exc.get_http_status_code()
    return status >= 500 and status != 501  # 501: the server will never implement it

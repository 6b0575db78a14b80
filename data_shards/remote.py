"""Shards beyond the local disk: opening a shard or its manifest by path, URL or command.

A shard path may be a local path, an ``http(s)://`` URL, an fsspec URI (``s3://``, ``gs://``: with the
``remote`` extra, i.e. s3fs/gcsfs, installed), or a WebDataset ``pipe:COMMAND`` whose standard output
is the tar. Every shard has its ``manifest.json`` beside it (the same folder, bucket prefix or URL
directory; for a command, the same command with the shard's name replaced by ``manifest.json``): the
loader reads sample counts from it, so a shorter shard is an error, never a shorter epoch.

Remote reads fail in ways local ones do not: a dropped connection, a server error, a timeout. The
loader retries a remote shard :data:`ATTEMPTS` times in all, with exponential backoff, re-reading it
from its start and skipping what it already delivered (so batches and resume positions are the same as
on disk); then it fails naming the shard. A missing file or a refused request fails at once.
"""

from __future__ import annotations

import http.client
import io
import logging
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from typing import IO, Callable, TypeVar

from data_shards.errors import BadInputError, TransientError

log = logging.getLogger("patchflow.loader")

URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://")
PIPE = "pipe:"
ATTEMPTS = 4  # one read and three retries
BACKOFF_S = 0.5  # before retry n: BACKOFF_S * 2**(n-1)
TIMEOUT_S = 60.0  # per HTTP connection attempt and read
T = TypeVar("T")


class PermanentReadError(BadInputError, OSError):
    """A remote file that is not there or not readable: retrying cannot help."""


def is_remote(path: str) -> bool:
    return str(path).startswith(URL_SCHEMES + (PIPE,))


def file_name(path: str) -> str:
    """The shard's file name: the last path segment of a path or URL, or of a command's shard argument."""
    target = _pipe_target(path)[1] if str(path).startswith(PIPE) else str(path)
    return target.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def sibling(path: str, name: str) -> str:
    """The file ``name`` beside the shard ``path`` (its manifest): same folder, prefix or URL directory;
    for a ``pipe:`` command, the same command reading ``name`` instead of the shard."""
    text = str(path)
    if text.startswith(PIPE):
        words, target = _pipe_target(text)
        return PIPE + shlex.join(word if word != target else _beside(target, name) for word in words)
    return _beside(text, name)


def _beside(path: str, name: str) -> str:
    head = path.split("?", 1)[0]
    return f"{head.rsplit('/', 1)[0]}/{name}" if "/" in head else name


def _pipe_target(path: str) -> tuple[list[str], str]:
    words = shlex.split(path[len(PIPE):])
    target = next((w for w in reversed(words) if w.split("?", 1)[0].endswith(".tar")), None)
    if target is None:
        raise BadInputError(f"{path}: a pipe: shard command must name the .tar it reads (its manifest.json is "
                            f"read by the same command with that name replaced)")
    return words, target


def open_stream(path: str) -> IO[bytes]:
    """A binary stream of the file at ``path`` (local, URL or ``pipe:`` command), read front to back.

    Raises:
        PermanentReadError: the file is missing or refused (HTTP 4xx, no such key, no such file).
        OSError or http.client.HTTPException: a fault a retry may get past.
    """
    text = str(path)
    try:
        if text.startswith(PIPE):
            return _CommandStream(text[len(PIPE):])
        if text.startswith(("http://", "https://")):
            return urllib.request.urlopen(text, timeout=TIMEOUT_S)  # noqa: S310 - the user's own shard URL
        if text.startswith(URL_SCHEMES):
            return _fsspec_open(text)
        return open(text, "rb")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise
        raise PermanentReadError(f"{text}: HTTP {exc.code} {exc.reason}") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise PermanentReadError(f"{text}: {exc.strerror or exc}") from None


def _fsspec_open(url: str) -> IO[bytes]:
    fs, path = _filesystem(url)
    return fs.open(path, "rb")  # type: ignore[attr-defined]


class _CommandStream(io.RawIOBase):
    """The standard output of a shell command; a failed command raises OSError at its end."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S602

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        assert self.process.stdout is not None
        count = self.process.stdout.readinto(buffer)
        if count == 0:
            self._check_exit()
        return count

    def _check_exit(self) -> None:
        code = self.process.wait()
        if code != 0:
            error = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace").strip()
            raise OSError(f"pipe:{self.command} exited with code {code}: {error[-300:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        super().close()


def read_bytes(path: str) -> bytes:
    """The whole file at ``path`` (a manifest), with :func:`with_retries` for a remote one."""
    def read() -> bytes:
        with open_stream(path) as stream:
            return stream.read()

    return with_retries(path, read) if is_remote(path) else read()


# Faults a retry cannot get past: the object, bucket, permission or credentials are not there.
PERMANENT_FAULTS = (PermanentReadError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError"})  # botocore's, not imported here


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_FAULTS) or type(exc).__name__ in _PERMANENT_NAMES


def with_retries(path: str, attempt: Callable[[], T], action: str = "read") -> T:
    """``attempt()``, tried up to :data:`ATTEMPTS` times while it fails with anything but one of
    :data:`PERMANENT_FAULTS`; the last failure is raised."""
    for number in range(1, ATTEMPTS + 1):
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - any other fault of a remote call may be the connection's
            if number == ATTEMPTS or is_permanent(exc):
                raise
            pause_before_retry(path, number, exc, action)
    raise AssertionError("unreachable")


def pause_before_retry(path: str, failed_attempt: int, exc: BaseException, action: str = "read") -> None:
    """Say what failed and wait before the next attempt (exponential backoff)."""
    delay = BACKOFF_S * 2 ** (failed_attempt - 1)
    log.warning("%s: %s failed (%s: %s); retry %d of %d in %.1f s", path, action, type(exc).__name__, exc,
                failed_attempt, ATTEMPTS - 1, delay)
    time.sleep(delay)


# ----------------------------------------------------------------------------- listing remote sources

_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard-list notation: ``train-{000000..000009}.tar`` (a zero-padded range) or
    ``{train,val}-000000.tar`` (alternatives), any number of times, expanded in order."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        first, last = body.split("..", 1)
        if not (first.isdigit() and last.isdigit()) or int(last) < int(first):
            raise BadInputError(f"{pattern}: {{{body}}} is not a range like {{000000..000009}}")
        choices = [f"{n:0{len(first)}d}" for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(f"{head}{choice}{tail}")]


def list_tars(location: str) -> list[str]:
    """The tar shards at a remote ``location``: a brace pattern, one ``.tar`` URL or ``pipe:`` command,
    or (object stores, which can list) a prefix whose ``*.tar`` objects are taken in name order."""
    if location.startswith(PIPE) or "{" in location or location.split("?", 1)[0].endswith(".tar"):
        return [location] if location.startswith(PIPE) else expand_braces(location)
    if location.startswith(("http://", "https://")):
        raise BadInputError(f"{location}: an HTTP server cannot list a folder; name the shards, e.g. "
                            f"{location.rstrip('/')}/train-{{000000..000009}}.tar")
    fs, root = _filesystem(location)
    found = sorted(fs.glob(f"{root.rstrip('/')}/*.tar"))  # type: ignore[attr-defined]
    protocol = location.split("://", 1)[0]
    return [f"{protocol}://{path}" for path in found]


def stat_entry(path: str) -> list[object]:
    """``[name, size, version]`` of a remote file without reading it (an HTTP HEAD: its length and
    ETag or Last-Modified; an object store's size and ETag or modification time), for source
    fingerprints. A ``pipe:`` command is only its text: nothing tells when its output changes."""
    name = file_name(path) if not path.startswith(PIPE) else path
    if path.startswith(PIPE):
        return [name, "command"]
    try:
        if path.startswith(("http://", "https://")):
            request = urllib.request.Request(path, method="HEAD")
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
                headers = response.headers
                return [name, headers.get("Content-Length"), headers.get("ETag") or headers.get("Last-Modified")]
        fs, root = _filesystem(path)
        info = fs.info(root)  # type: ignore[attr-defined]
        return [name, info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))]
    except (OSError, http.client.HTTPException, ValueError):
        return [name, "missing"]


# ----------------------------------------------------------------------------- writing, and reading a byte range

def _filesystem(url: str) -> tuple[object, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise BadInputError(f"{url}: {url.split('://')[0]}:// needs its fsspec driver ({exc})",
                            hint="pip install 'patchflow[remote]' (s3fs, gcsfs)") from None


def upload(local: str, url: str) -> None:
    """Copy the local file to ``url`` (an object-store URL), with :func:`with_retries`.

    Raises:
        BadInputError: the bucket is missing or refuses these credentials (names the URL).
        TransientError: the store kept failing (a stage failing so is retried by the pipeline).
    """
    fs, path = _filesystem(url)
    try:
        with_retries(url, lambda: fs.put_file(str(local), path), action="upload")  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - named, as bad input or as worth another try
        if is_permanent(exc):
            raise BadInputError(f"{url}: cannot upload: {exc}", hint="check that the bucket exists and that these "
                                "credentials may write to it (shard.output, pairs.output)") from None
        raise TransientError(f"{url}: upload failed {ATTEMPTS} times: {type(exc).__name__}: {exc}") from exc


def check_bucket(url: str) -> None:
    """Fail now, naming it, when the bucket of an output prefix is missing or refuses these credentials
    (before the shard stage encodes a single image); a store that does not answer is left to the
    uploads' retries."""
    hint = "create the bucket, or set credentials that may write to it (shard.output, pairs.output)"
    fs, path = _filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - sorted below
        if is_permanent(exc):
            raise BadInputError(f"{url}: {exc}", hint=hint) from None
        return
    if not found:
        raise BadInputError(f"{url}: bucket {bucket!r} does not exist or cannot be seen with these credentials", hint=hint)


def exists(url: str) -> bool | None:
    """Whether the object at ``url`` (an object-store URL, as ``shard.output`` is) exists; None when the
    store cannot be asked (unreachable, no driver)."""
    try:
        fs, path = _filesystem(url)
        return bool(fs.exists(path))  # type: ignore[attr-defined]
    except (OSError, BadInputError):
        return None


def read_range(url: str, start: int, size: int) -> bytes:
    """``size`` bytes of ``url`` from ``start`` (an HTTP Range request, or the object store's), retried."""
    def read() -> bytes:
        if url.startswith(("http://", "https://")):
            request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + size - 1}"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
                data = response.read()
                return data if response.status == 206 else data[start:start + size]
        fs, path = _filesystem(url)
        return fs.cat_file(path, start=start, end=start + size)  # type: ignore[attr-defined]

    return with_retries(url, read)

"""Write-to-temporary-then-rename helpers, so a reader never sees a half-written file or folder.

Every output (checkpoint, shard, latent shard, index, manifest) is written through these, so a full
disk is handled in one place: the temporary file or folder is removed, whatever the path held
before is left as it was, and :class:`DiskFullError` names the path, the free space there and the
size being written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from data_shards.errors import PatchflowError

# A full disk and an exhausted quota: the same write fails again until space is freed.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(PatchflowError):
    """A write ran out of space (or quota). Nothing half-written is left and the file it would have
    replaced is intact. Not transient: retrying at once fails the same way."""

    default_hint = ("free space on that disk or choose another --data-root, then run the same command again: finished "
                    "stages are reused and training resumes from its newest checkpoint")

    def __init__(self, path: Path, reason: str, free_bytes: int | None, size: int | None, size_known: bool) -> None:
        if size is None:
            wanted = "size being written unknown"
        elif size_known:
            wanted = f"{format_bytes(size)} to write"
        else:
            wanted = f"at least {format_bytes(size)}: that much was written when it failed"
        free = "free space unknown" if free_bytes is None else f"{format_bytes(free_bytes)} free there"
        super().__init__(f"{path}: {reason} ({wanted}; {free})")
        self.path, self.free_bytes, self.size = Path(path), free_bytes, size


def format_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value /= 1024
    else:
        unit = "TiB"
    return f"{value:.1f} {unit}"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds ``path`` (or its nearest existing folder)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _disk_full(exc: OSError, path: Path, size: int | None, size_known: bool) -> DiskFullError:
    """Build the error after the temporary output is removed, so the free space reported is what the
    user has to work with."""
    reason = (exc.strerror or "no space left on device").lower()
    return DiskFullError(path, reason, free_bytes(path.parent), size, size_known)


def _bytes_in(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # data on disk before the rename makes it visible: a crash leaves old or new, never half
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a writer that needs a file name (torch, FAISS, tar);
    on success it is synced and renamed onto ``path`` in one step, on any failure removed.

    Args:
        path: the file to (re)place.
        size: the bytes about to be written, if known, for the message of a full disk.

    Raises:
        DiskFullError: the filesystem (or quota) ran out of space; ``path`` keeps its old content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise _disk_full(exc, path, size, size_known=size is not None) from exc
        raise
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        written = _bytes_in(tmp)
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise _disk_full(exc, path, size if size is not None else written, size_known=size is not None) from exc
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` in one step.

    On any exception the temporary folder is removed, so an interrupted stage leaves nothing that
    looks finished. An existing ``final`` is replaced only after the new one is complete.

    Raises:
        DiskFullError: a write into the folder ran out of space (the message says how much the
            folder held by then).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException as exc:
        written = _bytes_in(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise _disk_full(exc, final, written, size_known=False) from exc
        raise


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()

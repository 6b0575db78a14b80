"""Cheap fingerprints of files a stage reads from outside the data root (a source folder, pretrained
weights), for stage keys: a changed file changes the key, an unchanged one keeps it.

Bulk files (images, tar shards) are fingerprinted by name, size and modification time: stat calls,
never a read, so a run over an unchanged folder of a million images still decides in seconds. Small
files whose bytes matter (a caption table, weights) are hashed, so a rewrite that keeps size and
time still counts and a touch that keeps the bytes does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from data_shards.atomic import sha256_file

_CONTENT_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def stat_entry(path: Path, name: str) -> list[Any]:
    """``[name, size, mtime_ns]``, or ``[name, "missing"]`` (a missing file is a state, not an error:
    the stage reports it when it reads the file)."""
    try:
        stat = path.stat()
    except OSError:
        return [name, "missing"]
    return [name, stat.st_size, stat.st_mtime_ns]


def tree_entries(root: Path, exclude: Iterable[Path] = ()) -> list[list[Any]]:
    """A stat entry for every file under ``root``, named relative to it, in name order."""
    skip = {Path(p) for p in exclude}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p not in skip)
    return [stat_entry(p, p.relative_to(root).as_posix()) for p in files]


def content_entry(path: Path, name: str) -> list[Any]:
    """``[name, sha256]`` of the file's bytes, hashed once per process while its stat is unchanged (the
    change time too: a rewrite that restores size and modification time still moves it)."""
    try:
        stat = path.stat()
    except OSError:
        return [name, "missing"]
    memo_key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo_key not in _CONTENT_DIGESTS:
        _CONTENT_DIGESTS[memo_key] = sha256_file(path)
    return [name, _CONTENT_DIGESTS[memo_key]]


def fingerprint(kind: str, entries: list[list[Any]]) -> str:
    """One short string for a list of entries: what and how many (readable in a manifest), and their digest."""
    digest = hashlib.sha256(json.dumps([kind, entries], sort_keys=True).encode()).hexdigest()[:16]
    return f"{kind}: {len(entries)} files, sha256 {digest}"

"""Is a finished stage's folder still what its manifest says it wrote?

A stage's manifest records every file it leaves behind (``files``: relative path -> bytes, plus
sha256 for shards, weights and indexes, the files later stages load and trust whole). Verifying a
folder checks existence and size of every file, always, and the sha256 of the hashed ones. Hashes
are cached per (path, size, mtime) for the life of the process, so the manifest writer's hashes and
a second check of the same folder cost nothing. Manifests written before ``files`` existed are
checked for the existence of the files their outputs name.

Torch- and Prefect-free: ``patchflow verify`` runs it over a whole data root in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from data_shards import remote
from data_shards.atomic import sha256_file

MANIFEST_NAME = "manifest.json"
# Shards, weights and indexes are read whole by later stages (or queries) and trusted: hash them.
# Other files (JSON summaries, cached embeddings, features) are checked by size only.
HASHED_SUFFIXES = frozenset({".tar", ".pt", ".pth", ".safetensors", ".faiss"})
# Training state for resuming an unfinished stage; a finished stage never reads it again.
UNRECORDED_DIRS = frozenset({"checkpoints"})

_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


def describe_files(output_dir: Path) -> dict[str, dict[str, Any]]:
    """Every file a stage leaves in ``output_dir`` (but its manifest, hidden temporaries and
    checkpoints): relative path -> ``{"bytes": n}``, plus ``"sha256"`` for shards, weights, indexes."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(output_dir).rglob("*")):
        relative = path.relative_to(output_dir)
        if (not path.is_file() or relative.as_posix() == MANIFEST_NAME
                or any(part.startswith(".") or part in UNRECORDED_DIRS for part in relative.parts)):
            continue
        record: dict[str, Any] = {"bytes": path.stat().st_size}
        if path.suffix in HASHED_SUFFIXES:
            record["sha256"] = file_sha256(path)
        records[relative.as_posix()] = record
    return records


def _named_in_outputs(outputs: Any) -> dict[str, dict[str, Any]]:
    """Files an old manifest's outputs name (``{"path": ...}`` weights, ``{"name": ...}`` shards):
    without a ``files`` record, existence is all that can be checked."""
    found: dict[str, dict[str, Any]] = {}
    if isinstance(outputs, dict):
        for key in ("path", "name"):
            if isinstance(outputs.get(key), str) and "sha256" in outputs:
                found[outputs[key]] = {}
        for value in outputs.values():
            found.update(_named_in_outputs(value))
    elif isinstance(outputs, list):
        for value in outputs:
            found.update(_named_in_outputs(value))
    return found


def _file_problem(path: Path, record: dict[str, Any], relative: str) -> str | None:
    if not path.is_file():
        return f"{relative}: missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"{relative}: {size} bytes, the manifest says {record['bytes']}"
    if "sha256" in record and file_sha256(path) != record["sha256"]:
        return f"{relative}: sha256 differs from the manifest (contents changed since the stage finished)"
    return None


def verify_stage(output_dir: str | os.PathLike[str]) -> list[str]:
    """Problems with a finished stage's folder, each naming the file; empty when it is intact.

    Args:
        output_dir: a stage folder, ``<data_root>/stages/<stage>/<key>``.
    """
    folder = Path(output_dir)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"{MANIFEST_NAME}: missing (the stage did not finish, or its folder was removed)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        records = manifest["files"] if "files" in manifest else _named_in_outputs(manifest.get("outputs"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
        return [f"{MANIFEST_NAME}: unreadable ({exc})"]
    problems = [_file_problem(folder / relative, record, relative) for relative, record in sorted(records.items())]
    location = manifest.get("outputs", {}).get("location") if isinstance(manifest.get("outputs"), dict) else None
    if location and remote.exists(f"{location}/{MANIFEST_NAME}") is False:  # None: the store did not answer
        problems.append(f"{location}/{MANIFEST_NAME}: missing (the uploaded shards were removed)")
    return [problem for problem in problems if problem]


def discard_stage(output_dir: str | os.PathLike[str]) -> None:
    """Remove a stage folder so its stage computes afresh: first renamed aside in one step (a reader
    never sees half a folder that still has its manifest), then deleted."""
    folder = Path(output_dir)
    if not folder.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".discarded"))
    os.replace(folder, aside / folder.name)
    shutil.rmtree(aside, ignore_errors=True)

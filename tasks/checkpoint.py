"""Training checkpoints: everything needed to continue the same trajectory, written atomically."""

from __future__ import annotations

import io
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.atomic import write_bytes_atomic
from data_shards.errors import BadInputError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.pt$")
log = logging.getLogger("patchflow.checkpoint")


class CheckpointMismatch(BadInputError, ValueError):
    """A checkpoint written for another model config than the one asked to resume."""


class DamagedFileError(BadInputError, ValueError):
    """A weights or checkpoint file that torch cannot load (truncated, overwritten, not a torch file)."""


def load_torch_file(path: Path, weights_only: bool = True) -> Any:
    """``torch.load`` onto the CPU, but a damaged file raises :class:`DamagedFileError` naming it.

    torch's own message ("PytorchStreamReader failed reading zip archive…") never says which file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError… for a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A finished stage is reused while its manifest exists: deleting its folder is what rebuilds the file.
        hint = f"delete the folder {Path(path).parent} and run `patchflow run` again to rebuild it"
        raise DamagedFileError(f"{path}: damaged or not a torch file ({reason})", hint=hint) from None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary files never match the pattern)."""
    if not Path(folder).is_dir():
        return []
    found = [p for p in Path(folder).iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_torch_atomic(path: Path, obj: Any) -> None:
    """``torch.save`` through a temporary file and a rename: readers never see half a file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` (temp file + rename), then drop all but the newest ``keep``.

    Raises:
        DiskFullError: no space for the new checkpoint; the older ones are all still there.
    """
    path = checkpoint_path(folder, step)
    save_torch_atomic(path, state)
    # Pruning only after the new file is in place: a failed save (a full disk) never costs the
    # checkpoint a rerun resumes from.
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint that loads, after checking it was written for the same model ``signature``.

    A damaged newest checkpoint (a disk that filled, a copy cut short) is named in a warning and
    the next older one is tried, so a run resumes from the last good state instead of failing forever.

    Raises:
        DamagedFileError: every checkpoint in ``folder`` is damaged.
        CheckpointMismatch: the newest loadable checkpoint belongs to another model config.
    """
    checkpoints = list_checkpoints(folder)
    damaged = []
    for path in reversed(checkpoints):
        try:
            state = load_torch_file(path, weights_only=False)
        except DamagedFileError as exc:
            log.warning("%s; trying the next older checkpoint", exc)
            damaged.append(path.name)
            continue
        _check_signature(path, state.get("signature", {}), signature)
        return state
    if damaged:
        raise DamagedFileError(f"{folder}: every checkpoint is damaged ({', '.join(damaged)})",
                               hint=f"delete the folder {folder} to train from step 0")
    return None


def _check_signature(path: Path, saved: dict[str, Any], signature: dict[str, Any]) -> None:
    if saved != signature:
        differing = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {signature.get(k)!r}" for k in differing)
        hint = f"delete the folder {Path(path).parent} to train from step 0, or restore the config it was written with"
        raise CheckpointMismatch(f"{path} was written for another model ({details})", hint=hint)

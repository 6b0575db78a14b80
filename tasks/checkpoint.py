"""Training checkpoints: everything needed to continue the same trajectory, written atomically."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.atomic import write_bytes_atomic

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointMismatch(ValueError):
    """A checkpoint written for another model config than the one asked to resume."""


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
    """Write ``state`` for ``step`` (temp file + rename), then drop all but the newest ``keep``."""
    path = checkpoint_path(folder, step)
    save_torch_atomic(path, state)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint, after checking it was written for the same model ``signature``."""
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return None
    path = checkpoints[-1]
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("signature", {})
    if saved != signature:
        differing = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {signature.get(k)!r}" for k in differing)
        raise CheckpointMismatch(f"{path} was written for another model ({details}); delete it or restore the config")
    return state

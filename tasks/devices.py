"""Which device a stage computes on: the first GPU when there is one, unless the context names one.

A torchrun rank takes its device from :func:`tasks.distributed.init_distributed`; this is for the work
a stage does in its own process (VAE training and encoding, features, sampling, scoring).
"""

from __future__ import annotations

import torch

from tasks.stage import StageContext

DEVICE_KEY = "device"  # StageContext.extra["device"] overrides the default, e.g. "cpu" on a GPU host


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_device(context: StageContext) -> str:
    return str(context.extra.get(DEVICE_KEY) or default_device())


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device

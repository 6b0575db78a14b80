"""Helpers the benchmark scripts share: device sync and the machine's achievable matmul rate."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved FLOP/s of a large square matmul, best of three: a practical peak for MFU."""
    n, iterations = (8192, 20) if device.type == "cuda" else (1024, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: kernel selection and thread-pool start
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(3):  # the peak is what the hardware can do, not what a busy moment gave
        start = time.perf_counter()
        for _ in range(iterations):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * iterations / best

"""patchflow's MAE and DiT training steps against independent implementations, in one run.

MAE: ViT-Tiny encoder (192 wide, 12 deep, 3 heads), decoder 128 x 4, 32 px RGB, patch 4, batch 64,
mask 0.75, per-patch normalised pixel loss; against ``TimmMAE`` (facebookresearch/mae's model on
timm's blocks, plain ``torch.optim.AdamW``). DiT: DiT-S/2 on 32 x 8 x 8 latents, 10 classes, batch
32, noise-prediction MSE; against ``PlainDiT``. See ``benchmarks/reference_models.py``. Each side runs
in fp32 and under bf16 autocast, so the bf16 columns compare like with like; ratios are against the
reference in fp32.

patchflow's step is the engine's: its AdamW (``tasks.engine.make_optimizer``) and its precision
(``fp32``, or ``bf16`` autocast on a CPU with native bf16). Steps alternate between the
implementations and the median is reported, so a busy machine slows both alike.

    python benchmarks/bench_reference_steps.py [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_models import PlainDiT, TimmMAE  # noqa: E402
from models.dit import dit_from_name  # noqa: E402
from models.mae import MaskedAutoencoder  # noqa: E402
from tasks.engine import autocast_context, make_optimizer  # noqa: E402

Step = Callable[[], None]


def make_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> Step:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            value = loss()
        value.backward()
        optimizer.step()
    return step


def race(steps: dict[str, Step], count: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per step of each, alternating step by step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def plain_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


def mae_steps(batch: int) -> dict[str, Step]:
    imgs = torch.randn(batch, 3, 32, 32)
    steps = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        reference = TimmMAE(32, 4, 3, 192, 12, 3, 128, 4, 4)
        steps[f"reference {precision}"] = make_step(reference, lambda m=reference: m(imgs), plain_adamw(reference),
                                                    lambda p=precision: autocast_context(p, "cpu"))
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = MaskedAutoencoder(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                                  decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)
        steps[f"patchflow {precision}"] = make_step(model, lambda m=model: m(imgs)[0], make_optimizer(
            [{"params": list(model.parameters()), "weight_decay": 0.05}], 1e-4, (0.9, 0.95)),
            lambda p=precision: autocast_context(p, "cpu"))
    return steps


def dit_steps(batch: int) -> dict[str, Step]:
    x, y = torch.randn(batch, 32, 8, 8), torch.randint(0, 10, (batch,))
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x)
    steps = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        reference = PlainDiT(8, 2, 32, 384, 12, 6, 10)
        steps[f"reference {precision}"] = make_step(
            reference, lambda m=reference: F.mse_loss(m(x, t, y)[:, :32], noise), plain_adamw(reference),
            lambda p=precision: autocast_context(p, "cpu"))
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = dit_from_name("DiT-S/2", input_size=8, in_channels=32, num_classes=10)
        steps[f"patchflow {precision}"] = make_step(
            model, lambda m=model: F.mse_loss(m(x, t, y)[:, :32], noise),
            make_optimizer([{"params": list(model.parameters()), "weight_decay": 0.0}], 1e-4, (0.9, 0.999)),
            lambda p=precision: autocast_context(p, "cpu"))
    return steps


def report(title: str, batch: int, seconds: dict[str, float]) -> None:
    reference = next(iter(seconds.values()))
    print(f"\n{title}")
    for name, value in seconds.items():
        print(f"  {name:<26}{value * 1e3:9.1f} ms/step {batch / value:9.1f} samples/s {reference / value:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16: "
          f"{torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    report("MAE ViT-Tiny/4, 32 px, batch 64", 64, race(mae_steps(64), args.steps))
    report("DiT-S/2, 32 x 8 x 8 latents, batch 32", 32, race(dit_steps(32), args.steps))


if __name__ == "__main__":
    main()

"""CLIP: pairs/s of one training step, and peak memory of the contrastive loss as the global batch grows.

1. One step (forward both towers, symmetric InfoNCE, backward, AdamW) of the `demo` and `small`
   presets' CLIP models on random images and captions, batch from the preset, in process.
2. Memory of the loss for a global batch N spread over W ranks: what autograd keeps for backward when
   one process scores the full N×N matrix (gathering everything to one place) against the n×N rows
   each rank scores with OpenCLIP's local loss (n = N / W). Measured with saved-tensor hooks.

    python benchmarks/bench_clip_step.py --steps 10 --global-batches 2048,4096,8192 --ranks 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from models.clip import clip_loss  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from tasks.clip_train import build_model  # noqa: E402
from tasks.config import load_config  # noqa: E402


def step_rate(preset: str, steps: int) -> tuple[float, int, int]:
    """(pairs/s, batch size, parameters) of the preset's CLIP training step on random data."""
    config = load_config(preset).clip
    model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = config.train.batch_size
    images = torch.randn(batch, config.channels, config.image_size, config.image_size)
    tokens = Tokenizer(config.context_length).encode([f"an emoji of caption number {i}" for i in range(batch)])
    times = []
    for _ in range(steps + 2):  # the first two warm up the thread pool and the allocator
        start = time.perf_counter()
        image_features, text_features, scale = model(images, tokens)
        clip_loss(image_features, text_features, scale, gathered=False).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    median = sorted(times[2:])[len(times[2:]) // 2]
    return batch / median, batch, sum(p.numel() for p in model.parameters())


def loss_memory(global_batch: int, rows: int, dim: int) -> int:
    """Bytes autograd keeps for the backward pass of one rank's loss: ``rows`` local features scored
    against ``global_batch`` columns (the softmax inputs and outputs dominate: they grow as rows × N).
    Measured with saved-tensor hooks on the real ``clip_loss`` graph, not computed from a formula."""
    generator = torch.Generator().manual_seed(0)
    local_images = torch.randn(rows, dim, generator=generator, requires_grad=True)
    local_texts = torch.randn(rows, dim, generator=generator, requires_grad=True)
    others = global_batch - rows  # the other ranks' features, as all_gather hands them over
    all_images = torch.cat([local_images, torch.randn(others, dim, generator=generator)])
    all_texts = torch.cat([local_texts, torch.randn(others, dim, generator=generator)])
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits_per_image = 14.3 * local_images @ all_texts.T  # (rows, N), as clip_loss builds per rank
        logits_per_text = 14.3 * local_texts @ all_images.T
        labels = torch.arange(rows)
        loss = (torch.nn.functional.cross_entropy(logits_per_image, labels)
                + torch.nn.functional.cross_entropy(logits_per_text, labels)) / 2
    loss.backward()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="demo,small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batches", default="2048,4096,8192")
    parser.add_argument("--ranks", type=int, default=8, help="ranks sharing the global batch for the local loss")
    parser.add_argument("--embed-dim", type=int, default=128)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"\n{'preset':8s} {'batch':>6s} {'params':>10s} {'pairs/s':>9s}")
    for preset in args.presets.split(","):
        rate, batch, params = step_rate(preset, args.steps)
        print(f"{preset:8s} {batch:6d} {params:10,d} {rate:9.0f}")

    print(f"\nloss memory kept for backward, {args.ranks} ranks, dim {args.embed_dim}")
    print(f"{'global N':>9s} {'full N×N MiB':>13s} {'local n×N MiB':>14s} {'ratio':>6s}")
    for global_batch in (int(n) for n in args.global_batches.split(",")):
        full = loss_memory(global_batch, global_batch, args.embed_dim)
        local = loss_memory(global_batch, global_batch // args.ranks, args.embed_dim)
        print(f"{global_batch:9d} {full / 2**20:13.1f} {local / 2**20:14.1f} {full / max(local, 1):6.1f}")


if __name__ == "__main__":
    main()

"""Throughput of one MAE training step (forward, backward, AdamW) for a few encoder sizes.

Each size is timed twice in the same run, on the same model and data:

* ``visible-only``: the real MAE step; the encoder sees the ~25% visible patches (mask ratio 0.75).
* ``all-patches``: what the step would cost if the encoder ran on every patch, as in models that keep
  hidden positions in the encoder (BEiT/SimMIM-style). The model forbids mask_ratio 0, so this path
  calls the parts directly: ``encoder.forward_features`` on all patches, the decoder with an identity
  ``ids_restore`` (no mask tokens needed), and the loss over every patch. The decoder work is the same
  in both paths (it always sees all L positions), so the speed-up isolates the encoder saving.

FLOPs are counted analytically (matmuls only, training = 3 x forward) rather than with
``torch.utils.flop_counter``, which misses the CPU attention kernel. On CUDA the step runs under bf16
autocast and MFU is taken against a bf16 matmul rate measured here; on CPU it is against fp32.

    python benchmarks/bench_mae_step.py --sizes nano,micro,tiny --img-size 32 --patch-size 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.mae import MaskedAutoencoder, mae_from_name  # noqa: E402
from models.vit import param_count  # noqa: E402
from benchmarks._common import measure_matmul_rate, synchronize  # noqa: E402


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Matmul FLOPs of ``depth`` pre-LN blocks on one sequence: qkv + proj + MLP, plus QK^T and AV."""
    linear = 2 * tokens * width * width * (4 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * width
    return depth * (linear + attention)


def mae_step_flops(model: MaskedAutoencoder, batch_size: int, encoder_tokens: int) -> float:
    """Training FLOPs of one step when the encoder sees ``encoder_tokens`` patches (class token extra)."""
    encoder = model.encoder
    width, depth = encoder.embed_dim, len(encoder.blocks)
    mlp_ratio = encoder.blocks[0].mlp.fc1.out_features / width
    num_patches = encoder.patch_embed.num_patches
    patch_dim = model.decoder_pred.out_features
    decoder_width, decoder_depth = model.decoder_embed.out_features, len(model.decoder_blocks)

    forward = (
        2 * num_patches * patch_dim * width  # patch embedding runs on every patch before masking
        + transformer_forward_flops(1 + encoder_tokens, width, depth, mlp_ratio)
        + 2 * (1 + encoder_tokens) * width * decoder_width  # decoder_embed
        + transformer_forward_flops(1 + num_patches, decoder_width, decoder_depth, mlp_ratio)
        + 2 * (1 + num_patches) * decoder_width * patch_dim  # decoder_pred
    )
    return 3.0 * batch_size * forward  # backward costs about twice the forward


def all_patches_loss(model: MaskedAutoencoder, imgs: torch.Tensor) -> torch.Tensor:
    """The MAE loss with no masking in the encoder: every patch encoded, every patch reconstructed."""
    latent = model.encoder.forward_features(imgs)  # (N, 1 + L, D)
    N, L = imgs.shape[0], model.num_patches
    ids_restore = torch.arange(L, device=imgs.device).expand(N, L)  # (N, L): nothing was shuffled
    pred = model.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
    mask = torch.ones(N, L, device=imgs.device)  # (N, L): score every patch
    return model.forward_loss(imgs, pred, mask)


def train_step(
    model: MaskedAutoencoder,
    optimizer: torch.optim.Optimizer,
    imgs: torch.Tensor,
    encode_all: bool,
    mask_ratio: float,
    autocast: contextlib.AbstractContextManager,
) -> None:
    """One optimiser step: forward (under autocast), backward, AdamW."""
    with autocast:
        loss = all_patches_loss(model, imgs) if encode_all else model(imgs, mask_ratio=mask_ratio)[0]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_paths(
    model: MaskedAutoencoder,
    optimizer: torch.optim.Optimizer,
    imgs: torch.Tensor,
    mask_ratio: float,
    steps: int,
    warmup: int,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, float]:
    """Median seconds per step of each path, after ``warmup`` untimed steps of each.

    The paths alternate step by step, and the median is reported, so that load from other processes
    on a shared machine hits both paths alike instead of skewing their ratio.
    """
    paths = {"visible-only": False, "all-patches": True}
    for _ in range(warmup):
        for encode_all in paths.values():
            train_step(model, optimizer, imgs, encode_all, mask_ratio, autocast)
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(steps):
        for path, encode_all in paths.items():
            synchronize(imgs.device)
            start = time.perf_counter()
            train_step(model, optimizer, imgs, encode_all, mask_ratio, autocast)
            synchronize(imgs.device)
            times[path].append(time.perf_counter() - start)
    return {path: statistics.median(seconds) for path, seconds in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="nano,micro,tiny", help="comma-separated VIT_SIZES names")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    compute_dtype = torch.bfloat16 if on_cuda else torch.float32
    torch.manual_seed(args.seed)

    peak = measure_matmul_rate(device, compute_dtype)
    print(
        f"device={device} dtype={str(compute_dtype).removeprefix('torch.')} threads={torch.get_num_threads()} "
        f"img={args.img_size} patch={args.patch_size} batch={args.batch_size} steps={args.steps} "
        f"warmup={args.warmup} mask_ratio={args.mask_ratio} matmul_peak={peak / 1e12:.3f} TFLOP/s"
    )
    header = f"{'size':<7}{'enc params':>12}  {'path':<13}{'tokens':>7}{'img/s':>10}{'ms/step':>10}"
    header += f"{'GFLOP/step':>12}{'TFLOP/s':>10}{'MFU':>8}"
    print(header)
    print("-" * len(header))

    speedups = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        model = mae_from_name(
            size, img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
            mask_ratio=args.mask_ratio,
        ).to(device)
        model.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05
        )
        imgs = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        num_patches = model.num_patches
        kept = max(1, int(num_patches * (1 - args.mask_ratio)))  # as random_masking counts

        seconds_per_step = time_paths(model, optimizer, imgs, args.mask_ratio, args.steps, args.warmup, autocast)
        rates = {}
        for path, tokens in (("visible-only", kept), ("all-patches", num_patches)):
            seconds = seconds_per_step[path]
            flops = mae_step_flops(model, args.batch_size, tokens)
            rates[path] = args.batch_size / seconds
            print(
                f"{size:<7}{param_count(model.encoder):>12,}  {path:<13}{1 + tokens:>7}{rates[path]:>10.1f}"
                f"{seconds * 1e3:>10.1f}{flops / 1e9:>12.2f}{flops / seconds / 1e12:>10.3f}"
                f"{flops / seconds / peak:>8.1%}"
            )
        flop_ratio = mae_step_flops(model, 1, num_patches) / mae_step_flops(model, 1, kept)
        speedups.append((size, rates["visible-only"] / rates["all-patches"], flop_ratio))
        del model, optimizer

    print()
    print("speed-up of visible-only over all-patches (img/s ratio; FLOP ratio for reference):")
    for size, measured, flop_ratio in speedups:
        print(f"  {size:<7} {measured:5.2f}x measured   {flop_ratio:5.2f}x by FLOPs")


if __name__ == "__main__":
    main()

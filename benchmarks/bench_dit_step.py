"""Throughput of one DiT training step (forward, diffusion loss, backward, AdamW) and of TAEF2 encoding.

DiT runs on random latents shaped like cached TAEF2 latents (default 32 x 8 x 8, i.e. 64 px images).
FLOPs are counted analytically (matmuls only, training = 3 x forward). On CUDA the step runs under
bf16 autocast and MFU is taken against a bf16 matmul rate measured here; on CPU against fp32.
TAEF2 encode throughput (images/s at 32 and 64 px) is measured when the shared weights exist.

    python benchmarks/bench_dit_step.py --sizes DiT-N/2,DiT-T/2,DiT-S/2 --batch-size 16 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from models.diffusion import GaussianDiffusion  # noqa: E402
from models.dit import DiT, dit_from_name  # noqa: E402
from models.vae import load_pretrained_tiny_autoencoder  # noqa: E402
from benchmarks._common import measure_matmul_rate, synchronize  # noqa: E402


def dit_forward_flops(model: DiT) -> float:
    """Matmul FLOPs of one DiT forward on one latent: patch embed, blocks (with attention), final layer."""
    width = model.pos_embed.shape[-1]
    tokens = model.x_embedder.num_patches
    depth = len(model.blocks)
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / width
    patch_in = model.patch_size**2 * model.in_channels
    patch_out = model.patch_size**2 * model.out_channels
    per_block = 2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width
    conditioning = 2 * (256 * width + width * width) + depth * 2 * width * 6 * width + 2 * width * 2 * width
    return 2 * tokens * patch_in * width + depth * per_block + 2 * tokens * width * patch_out + conditioning


def bench_dit(name: str, args: argparse.Namespace, device: torch.device, peak: float) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    model = dit_from_name(
        name, input_size=args.latent_size, in_channels=args.latent_channels, num_classes=args.num_classes
    ).to(device)
    diffusion = GaussianDiffusion()
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-4, weight_decay=0.0)
    latents = torch.randn(args.batch_size, args.latent_channels, args.latent_size, args.latent_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def step() -> torch.Tensor:
        with autocast:
            loss, _ = diffusion.training_loss(model, latents, y=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    latents_per_s = args.batch_size * args.steps / seconds
    achieved = 3.0 * dit_forward_flops(model) * latents_per_s
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": model.x_embedder.num_patches,
        "ms_per_step": 1000 * seconds / args.steps,
        "latents_per_s": latents_per_s,
        "TFLOP/s": achieved / 1e12,
        "MFU": achieved / peak,
        "loss": float(loss),
    }


def bench_taef2(shared: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    encoder_path, decoder_path = shared / "taesd/taef2_encoder.pth", shared / "taesd/taef2_decoder.pth"
    if not (encoder_path.exists() and decoder_path.exists()):
        print(f"TAEF2 weights not found under {shared / 'taesd'}; skipping the encode benchmark")
        return []
    vae = load_pretrained_tiny_autoencoder(
        torch.load(encoder_path, map_location="cpu", weights_only=True),
        torch.load(decoder_path, map_location="cpu", weights_only=True),
    ).to(device)
    results = []
    for size in (32, 64):
        images = torch.rand(args.vae_batch_size, 3, size, size, device=device)
        with torch.inference_mode():
            vae.encode(images)  # warm-up
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.vae_repeats):
                vae.encode(images)
            synchronize(device)
        seconds = time.perf_counter() - start
        results.append({"image_size": size, "images_per_s": args.vae_batch_size * args.vae_repeats / seconds})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="DiT-N/2,DiT-T/2,DiT-S/2", help="comma-separated DiT names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per size")
    parser.add_argument("--latent-channels", type=int, default=32, help="TAEF2 latents have 32")
    parser.add_argument("--latent-size", type=int, default=8, help="8 = 64 px images through TAEF2")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--shared-data",
        default=os.environ.get("PATCHFLOW_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data")),
        help="folder holding taesd/taef2_{encoder,decoder}.pth",
    )
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--vae-repeats", type=int, default=2)
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_matmul_rate(device, peak_dtype)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"matmul peak ({str(peak_dtype).removeprefix('torch.')})={peak / 1e12:.3f} TFLOP/s")
    print(f"latents {args.latent_channels}x{args.latent_size}x{args.latent_size}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")

    header = f"{'model':<10} {'params':>8} {'tokens':>6} {'ms/step':>9} {'latents/s':>10} {'TFLOP/s':>8} {'MFU':>7}"
    print(header)
    for name in args.sizes.split(","):
        r = bench_dit(name.strip(), args, device, peak)
        print(f"{r['model']:<10} {r['params_M']:>7.2f}M {r['tokens']:>6} {r['ms_per_step']:>9.1f} "
              f"{r['latents_per_s']:>10.1f} {r['TFLOP/s']:>8.4f} {r['MFU']:>7.1%}")

    if not args.skip_vae:
        for r in bench_taef2(Path(args.shared_data), args, device):
            print(f"TAEF2 encode {r['image_size']:>2}px: {r['images_per_s']:.1f} images/s "
                  f"(batch {args.vae_batch_size})")


if __name__ == "__main__":
    main()

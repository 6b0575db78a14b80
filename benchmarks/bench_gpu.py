"""The CUDA path, measured on a GPU: fused attention, bf16 autocast, fused AdamW, torch.compile, nccl.

Every training step here runs through ``tasks.engine.train``, the loop every stage runs (its
``autocast_context``, fused AdamW, lr schedule, non-finite-loss check, per-window ``images_per_s``),
on one in-memory batch repeated: the model's own speed under the engine, without a loader. Rates are
the median of the engine's logged windows after the first (which pays for warm-up and compilation).

1. attention: ``models.layers.Attention`` in bf16 with only the flash kernel allowed, then only the
   memory-efficient one, against the math kernel (max difference), and the time of each.
2. MAE ViT-B/16 at 224 px (mask 0.75, decoder 512 x 8), eager and with ``train.compile``: images/s,
   TFLOP/s and MFU. FLOPs are counted analytically as in ``bench_mae_step.py`` (matmuls, training = 3 x
   forward); MFU is against the H100/H200 SXM dense bf16 peak (989 TFLOP/s) and against the bf16
   matmul rate measured here. 30 steps at batch 64 in bf16 and in fp32 (TF32 off) give the loss curves' distance.
3. the ``base`` preset's training stages, models and batches read from its YAML (MAE ViT-S/4 and fine-tuning at 32 px, the
   64 px VAE, DiT-S/1 on 8 x 8 x 8 latents, batch 256 each): images/s, eager and compiled.
4. nccl: a one-rank nccl process group, an all-reduce, and a DistributedDataParallel step.

    python benchmarks/bench_gpu.py [--steps 40] [--mae-batches 256,1024] [--no-compile] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks._common import measure_matmul_rate  # noqa: E402
from benchmarks.bench_mae_step import mae_step_flops  # noqa: E402
from models.diffusion import GaussianDiffusion  # noqa: E402
from models.dit import dit_from_name  # noqa: E402
from models.layers import Attention  # noqa: E402
from models.mae import mae_from_name  # noqa: E402
from models.vae import TinyAutoencoder, autoencoder_loss  # noqa: E402
from models.vit import vit_from_name  # noqa: E402
from tasks.config import OptimConfig, TrainConfig, load_config  # noqa: E402
from tasks.distributed import DistInfo  # noqa: E402
from tasks.engine import TrainJob, train  # noqa: E402

H100_BF16_DENSE_PEAK = 989.4e12  # FLOP/s, H100/H200 SXM datasheet (dense, no sparsity)
LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]


def engine_rate(model: torch.nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor], steps: int,
                compile_model: bool = False, precision: str = "auto") -> dict[str, Any]:
    """``steps`` engine steps on one repeated batch: median images/s of the windows after the first."""
    windows: list[float] = []
    config = TrainConfig(batch_size=len(batch["image"]), steps=steps + 1, log_every=10, eval_every=10**9,
                         checkpoint_every=10**9, precision=precision, compile=compile_model,
                         optim=OptimConfig(base_lr=1.5e-4, warmup_steps=0, weight_decay=0.05))
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as scratch:
        job = TrainJob(model=model, loss_fn=loss_fn, batches=lambda epoch, skip: itertools.repeat((0, 0, batch)),
                       config=config, checkpoint_dir=Path(scratch), signature={}, dist=DistInfo(device="cuda"),
                       log_metrics=lambda metrics, step: windows.append(metrics["images_per_s"]),
                       stop_after=steps)
        started = time.perf_counter()
        summary = train(job)
        wall = time.perf_counter() - started
    return {"images_per_s": statistics.median(windows[1:]), "first_window_images_per_s": windows[0],
            "wall_s": wall, "losses": summary.losses, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def check_attention(results: dict[str, Any]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attention = Attention(768, 12).cuda()
    x = torch.randn(256, 197, 768, device="cuda", requires_grad=True)
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "memory_efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}
    outputs = {}
    for name, backend in kernels.items():
        try:
            with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    attention(x).float().sum().backward()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(10):
                    out = attention(x)
                    out.float().sum().backward()
                torch.cuda.synchronize()
            outputs[name] = out.float().detach()
            results[f"attention_{name}_ms"] = (time.perf_counter() - started) / 10 * 1e3
        except RuntimeError as exc:  # sdpa_kernel raises when the only allowed kernel cannot run
            results[f"attention_{name}_error"] = str(exc).splitlines()[0]
    for name in ("flash", "memory_efficient"):
        if name in outputs and "math" in outputs:
            results[f"attention_{name}_max_abs_diff_vs_math"] = float((outputs[name] - outputs["math"]).abs().max())
    print("attention (ViT-B block, batch 256 x 197 tokens, bf16, forward+backward):",
          {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items() if k.startswith("attention")})


def _mae_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    # tasks.mae_pretrain.mae_loss, restated: that module imports the shard loader (webdataset), which
    # a bare GPU machine may not have.
    return model(batch["image"])[0], {}


def _mae_b16() -> torch.nn.Module:
    torch.manual_seed(0)
    return mae_from_name("base", img_size=224, patch_size=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def _images224(batch_size: int) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(batch_size, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(0))}


def mae_b16(args: argparse.Namespace, batch_size: int, peak: float, results: dict[str, Any], compiled: bool) -> None:
    model = _mae_b16()
    flops_per_image = mae_step_flops(model, 1, int(model.num_patches * (1 - 0.75)))
    measured = engine_rate(model, _mae_loss, _images224(batch_size), args.steps, compile_model=compiled)
    rate, mode = measured["images_per_s"], "compiled" if compiled else "eager"
    tflops = rate * flops_per_image / 1e12
    results[f"mae_b16_batch{batch_size}_{mode}"] = {
        "images_per_s": rate, "tflops": tflops, "mfu_h100_peak": tflops * 1e12 / H100_BF16_DENSE_PEAK,
        "mfu_measured_matmul": tflops * 1e12 / peak, "first_window_images_per_s": measured["first_window_images_per_s"],
        "wall_s": measured["wall_s"], "peak_memory_gib": measured["peak_memory_gib"],
        "gflop_per_image": flops_per_image / 1e9}
    print(f"MAE ViT-B/16 224px batch {batch_size:5d} {mode:8s}: {rate:8.0f} img/s  {tflops:6.1f} TFLOP/s  "
          f"MFU {tflops * 1e12 / H100_BF16_DENSE_PEAK:5.1%} of 989 TFLOP/s, {tflops * 1e12 / peak:5.1%} of the "
          f"measured matmul rate; first window {measured['first_window_images_per_s']:.0f} img/s; "
          f"{measured['wall_s']:.0f} s in all; {measured['peak_memory_gib']:.1f} GiB")


def mae_precision(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """bf16 autocast against fp32 (TF32 off) from the same init and batch: how far the loss curves drift."""
    steps, batch = min(args.steps, 30), _images224(64)
    bf16 = engine_rate(_mae_b16(), _mae_loss, batch, steps)["losses"]
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = engine_rate(_mae_b16(), _mae_loss, batch, steps, precision="fp32")["losses"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
    drift = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32))
    results["mae_b16_bf16_vs_fp32"] = {"steps": steps, "batch": 64, "max_relative_loss_diff": drift,
                                       "fp32_first_last": [fp32[0], fp32[-1]], "bf16_first_last": [bf16[0], bf16[-1]]}
    print(f"MAE ViT-B/16 bf16 vs fp32 (batch 64, {steps} steps): max relative loss difference {drift:.2%} "
          f"(fp32 {fp32[0]:.4f} -> {fp32[-1]:.4f}, bf16 {bf16[0]:.4f} -> {bf16[-1]:.4f})")


def base_preset_stages(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The models, losses and batch sizes of configs/presets/base.yaml's training stages, read from it."""
    base = load_config("base")
    mae, evaluation, vae, dit = base.mae, base.evaluate, base.vae, base.dit
    labels = torch.randint(0, 10, (mae.train.batch_size,), device="cuda")
    images = torch.rand(mae.train.batch_size, 3, mae.image_size, mae.image_size, device="cuda")
    diffusion = GaussianDiffusion(dit.num_timesteps, dit.schedule)
    latent = vae.image_size // 8

    def classify(model, b):
        return F.cross_entropy(model(b["image"]), b["label"], label_smoothing=evaluation.label_smoothing), {}

    stages: dict[str, tuple[Callable[[], torch.nn.Module], LossFn, dict[str, torch.Tensor]]] = {
        f"mae_pretrain (ViT-{mae.encoder_size}/{mae.patch_size} MAE, {mae.image_size} px)": (
            lambda: mae_from_name(mae.encoder_size, img_size=mae.image_size, patch_size=mae.patch_size,
                                  decoder_embed_dim=mae.decoder_embed_dim, decoder_depth=mae.decoder_depth,
                                  decoder_num_heads=mae.decoder_num_heads),
            _mae_loss, {"image": images}),
        f"evaluate fine-tune (ViT-{mae.encoder_size}/{mae.patch_size})": (
            lambda: vit_from_name(mae.encoder_size, img_size=mae.image_size, patch_size=mae.patch_size, num_classes=10,
                                  global_pool=evaluation.finetune_pool, drop_path_rate=evaluation.drop_path),
            classify, {"image": images[:evaluation.finetune_train.batch_size], "label": labels}),
        f"vae (width {vae.width}, {vae.image_size} px)": (
            lambda: TinyAutoencoder(latent_channels=vae.latent_channels, width=vae.width, midblock_gn=False),
            lambda m, b: autoencoder_loss(m, b["image"]),
            {"image": torch.rand(vae.train.batch_size, 3, vae.image_size, vae.image_size, device="cuda")}),
        f"dit_train ({dit.model}, {latent}x{latent}x{vae.latent_channels} latents)": (
            lambda: dit_from_name(dit.model, input_size=latent, in_channels=vae.latent_channels, num_classes=10,
                                  learn_sigma=dit.learn_sigma),
            lambda m, b: diffusion.training_loss(m, b["image"], y=b["label"]),
            {"image": torch.randn(dit.train.batch_size, vae.latent_channels, latent, latent, device="cuda"),
             "label": torch.randint(0, 10, (dit.train.batch_size,), device="cuda")}),
    }
    for name, (build, loss_fn, data) in stages.items():
        row: dict[str, Any] = {}
        for mode, compiled in [("eager", False)] + ([("compiled", True)] if args.compile else []):
            torch.manual_seed(0)
            try:
                row[mode] = engine_rate(build(), loss_fn, data, args.steps, compile_model=compiled)["images_per_s"]
            except Exception as exc:  # report and go on: one stage's failure must not hide the others
                row[f"{mode}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results[f"base/{name}"] = row
        print(f"base preset, {name:38s} batch {len(data['image'])}, bf16: " + "  ".join(
            f"{mode} {value:,.0f} img/s" if isinstance(value, float) else f"{mode}: {value}" for mode, value in row.items()))


def check_nccl(results: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    value = torch.full((4,), 3.0, device="cuda")
    dist.all_reduce(value)
    model = DistributedDataParallel(torch.nn.Linear(64, 64).cuda(), device_ids=[0])
    loss = model(torch.randn(8, 64, device="cuda")).pow(2).mean()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
    results["nccl"] = {"backend": dist.get_backend(), "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
                       "all_reduce_ok": bool((value == 3.0).all()), "ddp_step_grads_finite": bool(grads_finite)}
    dist.destroy_process_group()
    print("nccl:", results["nccl"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="engine steps per measurement (windows of 10)")
    parser.add_argument("--mae-batches", default="256,1024", help="comma-separated MAE ViT-B/16 batch sizes")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile run")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file (after each part)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    peak = measure_matmul_rate(torch.device("cuda"), torch.bfloat16)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "measured_bf16_matmul_tflops": peak / 1e12}
    print(f"{results['device']}, torch {torch.__version__}, bf16 8192^3 matmul {peak / 1e12:.0f} TFLOP/s")
    # Cheap parts first, torch.compile (minutes) last: a run cut short still reports the rest.
    batches = [int(b) for b in args.mae_batches.split(",")]
    parts = [check_attention, check_nccl]
    parts += [lambda r, b=b: mae_b16(args, b, peak, r, compiled=False) for b in batches]
    parts += [lambda r: mae_precision(args, r)]
    parts += [lambda r, b=b: mae_b16(args, b, peak, r, compiled=True) for b in batches] if args.compile else []
    parts += [lambda r: base_preset_stages(args, r)]
    for part in parts:
        try:
            part(results)
        except Exception as exc:  # a failed part is a printed result, and the rest still runs
            results.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
            print(f"FAILED: {type(exc).__name__}: {exc}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

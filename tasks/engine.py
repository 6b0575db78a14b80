"""The one training engine every training stage uses (MAE, fine-tuning, VAE, DiT).

A stage supplies the model, a loss over a batch, the batch stream and its config; the engine owns
the loop: DDP wrapping, AdamW with warmup + cosine, autocast, accumulation, clipping, EMA,
checkpoint/resume to the step, throughput and metric logging (rank 0 only).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from data_shards.errors import BadInputError
from tasks.checkpoint import load_latest, restore_rng_state, rng_state, save_checkpoint
from tasks.config import OptimConfig, TrainConfig
from tasks.distributed import DistInfo

log = logging.getLogger("patchflow.engine")

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, Any]]]
BatchStream = Callable[[int, int], Iterator[tuple[int, int, Batch]]]  # (start_epoch, skip) → (epoch, index, batch)
MetricLogger = Callable[[dict[str, float], int], None]


class NonFiniteLossError(BadInputError, RuntimeError):
    """The loss became NaN or infinite; training stops rather than writing a broken checkpoint.

    Not transient: with a fixed seed a retry diverges at the same step again."""

    default_hint = ("lower the stage's train.optim.base_lr or set train.optim.clip_grad "
                    "(e.g. --set mae.train.optim.clip_grad=1.0)")


@dataclass
class TrainJob:
    """Everything that differs between training stages."""

    model: nn.Module
    loss_fn: LossFn
    batches: BatchStream
    config: TrainConfig
    checkpoint_dir: Path
    signature: dict[str, Any]
    dist: DistInfo = field(default_factory=DistInfo)
    log_metrics: MetricLogger | None = None
    on_eval: Callable[[nn.Module, int], None] | None = None
    param_groups: Callable[[nn.Module, float], list[dict[str, Any]]] | None = None
    stop_after: int | None = None  # end this process early at this step (tests simulate a kill with it)


def _job_label(checkpoint_dir: Path) -> str:
    """"mae_pretrain" or "evaluate/finetune": what the log line is about, read off the run directory
    (``<root>/stages/<stage>/<key>/[<part>/]checkpoints``)."""
    parts = Path(checkpoint_dir).parts
    if "stages" not in parts or len(parts) < parts.index("stages") + 3:
        return "train"
    stage_at = parts.index("stages") + 1
    return "/".join([parts[stage_at], *parts[stage_at + 2:-1]])


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    losses: list[float]
    images_per_s: float
    wall_s: float
    ema: nn.Module | None = None

    def record(self, world_size: int) -> dict[str, Any]:
        """What a stage keeps of a run (JSON-ready): everything but the EMA model, plus the world size."""
        return {"steps": self.steps, "resumed_from": self.resumed_from, "losses": self.losses,
                "images_per_s": self.images_per_s, "wall_s": self.wall_s, "world_size": world_size}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW must not decay: every norm weight and bias (ndim <= 1), plus
    the names the model declares in its own ``no_weight_decay()`` (positions, class and mask
    tokens), as timm does. A name is never guessed from how it is spelled.

    Raises:
        ValueError: the model declares a name it has no parameter for (a typo would decay it silently).
    """
    params = dict(model.named_parameters())
    declared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    unknown = declared - params.keys()
    if unknown:
        raise ValueError(f"{type(model).__name__}.no_weight_decay() names no parameter: {sorted(unknown)}")
    return declared | {name for name, param in params.items() if param.ndim <= 1}


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    plain_names = no_weight_decay(model)
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in plain_names else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def peak_learning_rate(optim: OptimConfig, global_batch: int) -> float:
    """MAE's linear scaling rule, lr = base_lr × global batch / 256; or base_lr as it is (DiT's recipe)."""
    if optim.lr_scaling == "none":
        return optim.base_lr
    return optim.base_lr * global_batch / 256


def lr_factor(step: int, total_steps: int, optim: OptimConfig, peak_lr: float) -> float:
    """Per-step multiplier of the peak lr: linear warmup, then cosine decay to ``min_lr`` (or flat)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    floor = optim.min_lr / peak_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay_at(step: int, config: TrainConfig) -> float:
    """EMA decay for the update after ``step`` optimizer steps; with warm-up, min(decay, (1 + t) / (10 + t)),
    so the average forgets the random init within the first few hundred steps of any budget."""
    decay = float(config.ema_decay or 0.0)
    return min(decay, (1 + step) / (10 + step)) if config.ema_warmup else decay


def make_optimizer(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one pass over all parameters per step instead of
    the default's Python loop over each tensor, which on these small models is a large share of a step."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX); elsewhere bf16 is emulated and slow."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_context(precision: str, device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for "auto" and "bf16"; on the CPU for "bf16" where the CPU has native bf16
    (elsewhere fp32, said once in the log: emulated bf16 would be several times slower, not faster)."""
    if device.startswith("cuda") and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and not device.startswith("cuda"):
        if cpu_has_native_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        _warn_no_bf16()
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def _warn_no_bf16() -> None:
    log.warning("precision bf16 asked for, but this CPU has no native bf16 (avx512_bf16 or AMX): training in fp32")


def wrap_model(model: nn.Module, dist: DistInfo) -> nn.Module:
    """Move to the device and, with several processes, wrap in DistributedDataParallel."""
    model.to(dist.device)
    if not dist.distributed:
        return model
    device_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        # One multi-tensor lerp (as timm's ModelEmaV3): a per-tensor loop costs DiT-S about 200 tiny ops a step.
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def _to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _scalar(value: Any) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def train(job: TrainJob) -> TrainSummary:
    """Run (or resume) ``job.config.steps`` optimizer steps; returns the loss of every step."""
    cfg, dist = job.config, job.dist
    seed_everything(cfg.seed + dist.rank)
    model = wrap_model(job.model, dist)
    core = job.model  # checkpoints, EMA and exports use the plain module, never the compiled wrapper
    if cfg.compile:
        # Static shapes: a short last batch compiles once more instead of switching every later step to
        # symbolic sizes, which MAE's masking (torch.rand with a generator argument) cannot trace.
        model = torch.compile(model, dynamic=False)
    global_batch = cfg.batch_size * dist.world_size * cfg.optim.accum_steps
    peak_lr = peak_learning_rate(cfg.optim, global_batch)
    groups = (job.param_groups or default_param_groups)(core, cfg.optim.weight_decay)
    for group in groups:  # layer-wise lr decay and the like scale the peak lr per group
        group["lr"] = peak_lr * group.pop("lr_scale", 1.0)
    optimizer = make_optimizer(groups, peak_lr, cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.steps, cfg.optim, peak_lr))
    ema = copy.deepcopy(core).eval().requires_grad_(False) if cfg.ema_decay else None

    state = load_latest(job.checkpoint_dir, job.signature)
    step, epoch, position, losses = 0, 0, 0, []
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        saved_rng = _this_rank(state["rng"], dist)
        if saved_rng is not None:
            restore_rng_state(saved_rng)
        # Each rank resumes its own data position (older checkpoints kept rank 0's only).
        epoch, position = _this_rank(state.get("data_positions"), dist) or (state["epoch"], state["position"])
        step, losses = state["step"], list(state["losses"])
        log.info("resuming from step %d (epoch %d, batch %d) in %s", step, epoch, position, job.checkpoint_dir)
    resumed_from = step

    def checkpoint() -> None:
        rngs, positions = _gather_from_ranks(rng_state(), dist), _gather_from_ranks((epoch, position), dist)
        if dist.is_main:
            save_checkpoint(job.checkpoint_dir, step, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": rngs, "step": step, "epoch": epoch,
                "position": position, "data_positions": positions, "losses": losses, "signature": job.signature,
            }, keep=cfg.keep_checkpoints)

    stream = job.batches(epoch, position)
    model.train()
    started, window_start, window_images, images = time.perf_counter(), time.perf_counter(), 0, 0
    while step < cfg.steps and (job.stop_after is None or step < job.stop_after):
        optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        step_loss = 0.0
        for micro in range(cfg.optim.accum_steps):
            epoch, index, batch = next(stream)
            batch = _to_device(batch, dist.device)
            sync = micro == cfg.optim.accum_steps - 1 or not dist.distributed
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast_context(cfg.precision, dist.device):
                loss, extra = job.loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step} (epoch {epoch}, batch {index})")
            (loss / cfg.optim.accum_steps).backward()
            step_loss += float(loss.detach()) / cfg.optim.accum_steps
            metrics.update({k: _scalar(v) for k, v in extra.items()})
            window_images += len(batch["image"]) * dist.world_size
            position = index + 1
        if cfg.optim.clip_grad:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.optim.clip_grad))
        optimizer.step()
        scheduler.step()
        if ema is not None:
            _update_ema(ema, core, ema_decay_at(step, cfg))
        step += 1
        losses.append(step_loss)
        if dist.is_main and job.log_metrics and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            rate = window_images / max(now - window_start, 1e-9)
            images += window_images
            window_start, window_images = now, 0
            lr = max(group["lr"] for group in optimizer.param_groups)
            job.log_metrics({"loss": step_loss, "lr": lr, "images_per_s": rate, **metrics}, step)
            eta = (now - started) / max(step - resumed_from, 1) * (cfg.steps - step)
            log.info("%s rank %d/%d: step %d/%d  loss %.4f  lr %.2e  %.0f images/s  ETA %s", _job_label(job.checkpoint_dir),
                     dist.rank, dist.world_size, step, cfg.steps, step_loss, lr, rate, _clock(eta))
        if job.on_eval and dist.is_main and (step % cfg.eval_every == 0 or step == cfg.steps):
            job.on_eval(ema if ema is not None else core, step)
            model.train()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    wall = time.perf_counter() - started
    images += window_images
    return TrainSummary(steps=step, resumed_from=resumed_from, losses=losses,
                        images_per_s=images / max(wall, 1e-9), wall_s=wall, ema=ema)


def _gather_from_ranks(value: Any, dist: DistInfo) -> list[Any]:
    """Every rank's ``value`` (RNG states, data positions), in rank order, on every rank."""
    if not dist.distributed:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _this_rank(saved: Any, dist: DistInfo) -> Any:
    """This rank's entry of a per-rank list saved by a run of the same world size, else None
    (another world size cannot replay the same streams). A bare value is a single-process save."""
    if not isinstance(saved, list):
        return saved if not dist.distributed else None
    if len(saved) != dist.world_size:
        log.warning("checkpoint was written by %d process(es), this run has %d: data order and random streams "
                    "continue from rank 0's position, not bit-identically", len(saved), dist.world_size)
        return None
    return saved[dist.rank]

"""Stage efficiency: each training stage's real loop against its bare model step, in one run.

1. stage: ``patchflow run`` trains every training stage of a preset in a fresh data root (the
   training stages and what they need; no index). Each stage's images/s is the one its train summary
   records: the engine's whole loop, first batch to last checkpoint, with the real loader, metric
   logging to MLflow, evaluation hooks and checkpoints.
2. bare: for every training job that run left behind (its ``job.json``), the stage's own
   ``training_job`` rebuilds the same model, loss, optimizer and EMA, and the engine runs it on one
   batch of that stage's data repeated from memory: no loader, no logging, no hooks, no checkpoints.
   Same process layout (one), same thread count as the stage.

The ratio stage / bare is the share of the model's own speed the stage keeps (goal: at least 90%).
``--bf16`` adds the bare step under bf16 autocast (``train.precision: bf16``) beside the stage's own
precision, alternating the two, to show what that setting buys each stage on this CPU.
The demo preset takes about 10 minutes on 2 cores; ``--preset small`` with its full budgets over an
hour, so shorten them with ``--set`` or time an existing data root's jobs with ``--reuse``.

    python benchmarks/bench_stage_efficiency.py [--preset demo] [--set mae.train.steps=300 ...]
    python benchmarks/bench_stage_efficiency.py --reuse DATA_ROOT [--bf16]   # bare steps only, against its summaries
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.distributed import DistInfo  # noqa: E402
from tasks.engine import train  # noqa: E402

TRAINING_STAGES = "[shard,mae_pretrain,evaluate,vae,encode_latents,dit_train,clip_train]"
BARE_STEPS = 40


@dataclasses.dataclass(frozen=True)
class StageJob:
    """One training job a run left behind: the module that builds it and where its summary is."""

    label: str
    module: str
    job_path: Path
    summary_path: Path


def training_jobs(root: Path) -> list[StageJob]:
    stages = root / "stages"
    found = [StageJob("mae_pretrain", "tasks.mae_pretrain", job, job.parent / "train_summary.json")
             for job in sorted(stages.glob("mae_pretrain/*/job.json"))]
    for job in sorted(stages.glob("evaluate/*/*/job.json")):
        weights = Path(json.loads(job.read_text())["weights_path"])
        found.append(StageJob(f"evaluate/{job.parent.name}", "tasks.finetune", job, weights.with_suffix(".summary.json")))
    found += [StageJob(f"clip_train/{job.parent.name}", "tasks.clip_train", job, job.parent / "train_summary.json")
              for job in sorted(stages.glob("clip_train/*/*/job.json"))]
    found += [StageJob("vae", "tasks.vae_train", job, job.parent / "train_summary.json")
              for job in sorted(stages.glob("vae/*/job.json"))]
    found += [StageJob("dit_train", "tasks.dit_stage", job, job.parent / "train_summary.json")
              for job in sorted(stages.glob("dit_train/*/job.json"))]
    return [job for job in found if job.summary_path.is_file()]


def bare_images_per_s(stage: StageJob, scratch: Path, precisions: tuple[str | None, ...] = (None,)
                      ) -> tuple[list[float], int]:
    """The engine on one in-memory batch of the stage's data, per precision (None: the stage's own): best
    of two timed runs after a warm-up, the precisions alternating so a busy machine slows them alike."""
    job = importlib.import_module(stage.module).training_job(stage.job_path, DistInfo())
    _, _, batch = next(job.batches(0, 0))
    rates: list[list[float]] = [[] for _ in precisions]
    for attempt, steps in enumerate((3, BARE_STEPS, BARE_STEPS)):
        for index, precision in enumerate(precisions):
            # steps + 1 with stop_after=steps: the loop ends before the final-step checkpoint.
            config = job.config.model_copy(update={
                "steps": steps + 1, "log_every": 10**9, "checkpoint_every": 10**9, "eval_every": 10**9,
                "precision": precision or job.config.precision})
            bare = dataclasses.replace(job, batches=lambda epoch, skip: itertools.repeat((0, 0, batch)),
                                       config=config, log_metrics=None, on_eval=None, stop_after=steps,
                                       checkpoint_dir=scratch / f"{stage.label.replace('/', '-')}-{attempt}-{index}")
            summary = train(bare)
            if attempt:
                rates[index].append(summary.images_per_s)
    return [max(found) for found in rates], len(batch["image"])


def run_pipeline(preset: str, root: Path, sets: list[str]) -> float:
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--data-root", str(root),
               "--set", f"stages={TRAINING_STAGES}"]
    for value in sets:
        command += ["--set", value]
    started = time.perf_counter()
    with (root.parent / f"{root.name}.log").open("w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO), "PATCHFLOW_PROGRESS": "off"})
    if code != 0:
        sys.exit(f"patchflow run exited {code}; see {root.parent / f'{root.name}.log'}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override passed to patchflow run")
    parser.add_argument("--reuse", type=Path, default=None, help="time the bare steps of this data root's finished jobs")
    parser.add_argument("--keep", type=Path, default=None, help="keep the fresh data root here")
    parser.add_argument("--bf16", action="store_true", help="also time each bare step under bf16 autocast")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-efficiency-"))
    root = args.reuse or args.keep or work / "root"
    if args.reuse is None:
        root.parent.mkdir(parents=True, exist_ok=True)
        wall = run_pipeline(args.preset, root, args.sets)
        print(f"patchflow run --preset {args.preset} (training stages{', ' + ' '.join(args.sets) if args.sets else ''}): "
              f"{wall:.0f} s")
    jobs = training_jobs(root)
    if not jobs:
        sys.exit(f"{root}: no finished training job (job.json with a train summary) under stages/")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} compute threads\n")
    precisions = (None, "bf16") if args.bf16 else (None,)
    bf16_columns = f"{'bare bf16':>11}{'gain':>7}" if args.bf16 else ""
    print(f"{'stage':<34}{'batch':>6}{'stage img/s':>13}{'bare img/s':>12}{'ratio':>8}{bf16_columns}")
    for stage in jobs:
        in_stage = json.loads(stage.summary_path.read_text())
        rates, batch = bare_images_per_s(stage, work, precisions)
        bare = rates[0]
        bf16 = f"{rates[1]:>11.0f}{rates[1] / bare:>6.2f}x" if args.bf16 else ""
        print(f"{stage.label:<34}{batch:>6}{in_stage['images_per_s']:>13.0f}{bare:>12.0f}"
              f"{in_stage['images_per_s'] / bare:>8.0%}{bf16}   ({in_stage['steps']} steps in the stage)", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

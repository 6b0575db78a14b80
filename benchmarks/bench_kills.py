"""Kills at any point: SIGKILL a stage's process at seeded random moments, rerun until it finishes,
and check the result is what an uninterrupted run gives.

1. One uninterrupted run of every stage (the ``smoke`` preset's sizes, training stages at 24 steps
   with a checkpoint every 5) in a data root of its own: the reference.
2. For each training stage (MAE pretraining, the evaluate stage's fine-tuning, DiT, CLIP), a fresh
   data root holding copies of the reference's upstream stage folders; the stage runs in a child
   process that is SIGKILLed (its whole process group: loader workers too) at seeded points, 5 kills
   in all: before the first checkpoint, while a checkpoint is being written (its temporary file seen
   in the checkpoint folder), at a random step of the fine-tune or scratch phase, at a random time
   from DiT's first step to its stage's end (training, or sampling and scoring after the export),
   at a random step between CLIP checkpoints. After each kill: no ``manifest.json``
   for the stage (nothing looks finished), then a rerun; the last run must end with every exported
   tensor ``torch.equal`` to the reference and the same per-step losses.
3. SIGKILL during sharding (a random moment of the stage), latent encoding (once the first latent
   shard is done) and index building (once the first embedding file is written): no manifest for the
   stage, the rerun finishes, ``tasks.verify.verify_stage`` finds no problem, and the files whose
   hashes the manifest records (shards, latents, indexes) are byte-identical to the reference.

Why a runner and not ``patchflow run``: the child runs ``python -m benchmarks.bench_kills --child``,
which applies the CLI's own preflight (clean-up after killed runs) and calls each stage's plain
``run(config, inputs, context)`` in the pipeline's order and wiring, without Prefect. Prefect's
temporary server costs 9–17 s per start here and 16 runs are needed; what a kill tests (the
engine's checkpoint/resume, atomic writes, reuse of a finished folder) lives in the stage functions,
and with one process per stage the training runs inside the killed child either way. Prefect's own
caching and retries are covered by tests/test_pipeline.py. Takes about 8 minutes on 2 busy cores.

    cd REPO && PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_kills.py [--seed 0] [--keep DIR]

Prints a table and the wall time; exits 1 when a resumed run differs or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

PRESET = "smoke"
ORDER = ("shard", "mae_pretrain", "evaluate", "vae", "encode_latents", "dit_train", "shard_pairs", "clip_train", "index")
STEPS, EVERY = 24, 5
TRAINING = {  # stage -> (config section of its train settings, exported files compared tensor by tensor)
    "mae_pretrain": ("mae.train", ["mae.pt", "encoder.pt"]),
    "evaluate": ("evaluate.finetune_train", ["classifier.pt", "scratch/model.pt"]),
    "dit_train": ("dit.train", ["dit.pt"]),
    "clip_train": ("clip.train", ["main/weights.pt", "clip.pt"]),
}
SUMMARIES = {"mae_pretrain": ["train_summary.json"], "evaluate": ["classifier.summary.json", "scratch/model.summary.json"],
             "dit_train": ["train_summary.json"], "clip_train": ["main/train_summary.json"]}


def overrides(steps: int = STEPS, every: int = EVERY) -> list[str]:
    """CPU-sized training: 24 steps of batch 16 with a checkpoint every 5, every step logged (the
    kill triggers read the step lines). MAE's loader runs one worker process, so a kill takes one."""
    sets = ["clip.baseline=false", "mae.train.num_workers=1"]
    for section, _ in TRAINING.values():
        sets += [f"{section}.steps={steps}", f"{section}.checkpoint_every={every}", f"{section}.batch_size=16",
                 f"{section}.log_every=1"]
    return sets


# ----------------------------------------------------------------------------- the child (runner)

def _child(root: str, until: str, sets: list[str]) -> None:
    import logging

    from flows.preflight import preflight
    from tasks import clip_train, dit_stage, evaluate, index, latents, mae_pretrain, shard, vae_train
    from tasks.config import load_config
    from tasks.stage import StageContext

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s", force=True)
    config = load_config(PRESET, sets, root)
    preflight(config.data_root)  # as `patchflow run`: clean up what a killed run left
    context = StageContext(data_root=Path(config.data_root))
    r: dict = {}

    def index_stage():  # flows/pipeline.py's wiring of the index stage
        datasets = {"images": r["shard"], "pairs": r.get("shard_pairs")}
        encoders = {"mae": r.get("mae_pretrain"), "clip": r.get("clip_train")}
        targets = [t for t in config.index.targets if datasets[t.dataset] and encoders[t.encoder]]
        used = [datasets[t.dataset] for t in targets] + [encoders[t.encoder] for t in targets]
        upstream = list({x.digest: x for x in used if x is not None}.values())
        roles = {name: x.digest for name, x in datasets.items() if x is not None and x in upstream}
        return index.run(config.index.model_copy(update={"targets": targets}), upstream,
                         StageContext(data_root=context.data_root, extra={"index_datasets": roles}))

    stages: dict[str, Callable] = {
        "shard": lambda: shard.run(config.shard, [], context),
        "mae_pretrain": lambda: mae_pretrain.run(config.mae, [r["shard"]], context),
        "evaluate": lambda: evaluate.run(config.evaluate, [r["shard"], r["mae_pretrain"]], context),
        "vae": lambda: vae_train.run(config.vae, [r["shard"]], context),
        "encode_latents": lambda: latents.run(config.latents, [r["shard"], r["vae"]], context),
        "dit_train": lambda: dit_stage.run(config.dit, [r[n] for n in ("shard", "vae", "encode_latents", "evaluate")], context),
        "shard_pairs": lambda: shard.run(config.pairs, [], context),
        "clip_train": lambda: clip_train.run(config.clip, [r["shard_pairs"]] + [r["mae_pretrain"]] * (config.clip.image_init == "mae"),
                                             context),
        "index": index_stage,
    }
    for name in ORDER[:ORDER.index(until) + 1]:
        print(f"@@start {name}", flush=True)
        r[name] = stages[name]()
        print(f"@@end {name} {r[name].output_dir}", flush=True)


# ----------------------------------------------------------------------------- watching and killing

STEP_LINE = re.compile(r"^patchflow\.engine \S+ rank \d+/\d+: step (\d+)/(\d+) ")
RESUME_LINE = re.compile(r"^patchflow\.engine resuming from step (\d+) .* in (\S+)$")


@dataclass
class Watch:
    """What the parent sees of one child run: its output lines (with arrival times) and its files."""

    root: Path
    stage: str
    folder: Path  # the stage's output folder in this root (the same key as in the reference)
    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float | None = None  # when the stage's @@start arrived
    first_step: float | None = None
    ended: bool = False
    step: int = 0
    phase: int = 0  # trainings of this stage that reached their last step in this run

    def feed(self, stamp: float, line: str) -> None:
        self.lines.append((stamp, line))
        if line == f"@@start {self.stage}":
            self.started = stamp
        elif line.startswith(f"@@end {self.stage} "):
            self.ended = True
        elif self.started is not None and (m := STEP_LINE.match(line)):
            self.step = int(m.group(1))
            self.first_step = self.first_step or stamp
            if m.group(1) == m.group(2):
                self.phase += 1


# A trigger looks at the watch and returns a description of the kill point once it should fire.
Trigger = Callable[[Watch], "str | None"]


def at_step(step: int, phase: int = 0) -> Trigger:
    names = {0: "", 1: "scratch "}
    return lambda w: f"{names.get(phase, '')}step {step}" if w.step == step and w.phase == phase else None


def checkpoint_write(subdir: str, step: int) -> Trigger:
    """While step's checkpoint is being written (its temp file exists), or just after (the file)."""
    def trigger(w: Watch) -> str | None:
        folder, name = w.folder / subdir, f"step-{step:08d}.pt"
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return None
        if any(n.startswith(f".{name}.") for n in names):
            return f"in ckpt {step} write"
        return f"just after ckpt {step}" if name in names else None
    return trigger


def after_seconds(seconds: float, since: str = "first_step") -> Trigger:
    def trigger(w: Watch) -> str | None:
        start = getattr(w, since)
        if start is None or time.perf_counter() - start < seconds:
            return None
        if since == "first_step":
            where = "after training" if w.phase else f"step {w.step}" if w.step else "before training"
            return f"t+{seconds:.1f}s ({where})"
        staging = any(w.folder.parent.glob(f".{w.folder.name}.*.partial"))  # data_shards.atomic.atomic_directory
        return f"t+{seconds:.2f}s ({'writing shards' if staging else 'before writing shards'})"
    return trigger


def first_file(pattern: str, label: str) -> Trigger:
    return lambda w: label if w.folder.is_dir() and any(w.folder.rglob(pattern)) else None


@dataclass
class Outcome:
    code: int | None  # None: killed by us
    kill_point: str | None
    watch: Watch
    manifest_after_kill: bool = False


def run_child(root: Path, stage: str, folder_rel: str, sets: list[str], log: Path,
              trigger: Trigger | None = None, timeout: float = 900) -> Outcome:
    """Run the pipeline up to ``stage`` in ``root``; SIGKILL the child's process group when ``trigger`` fires."""
    command = [sys.executable, "-u", "-m", "benchmarks.bench_kills", "--child", str(root), stage, *sets]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    watch = Watch(root=root, stage=stage, folder=root / folder_rel if folder_rel else root / "stages" / "_none")
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=env)
    reader = threading.Thread(target=_read, args=(process, watch, log), daemon=True)
    reader.start()
    deadline, fired = time.perf_counter() + timeout, None
    try:
        while process.poll() is None:
            if trigger is not None and not watch.ended and (fired := trigger(watch)):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{stage} run in {root} took over {timeout} s; log: {log}")
            time.sleep(0.002 if trigger else 0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(timeout=10)
    outcome = Outcome(code=None if fired else process.returncode, kill_point=fired, watch=watch)
    if fired:
        _reap_group(process.pid)
        outcome.manifest_after_kill = (watch.folder / "manifest.json").is_file()
    return outcome


def _read(process: subprocess.Popen, watch: Watch, log: Path) -> None:
    with open(log, "a") as out:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            out.write(line + "\n")
            watch.feed(time.perf_counter(), line)


def _reap_group(pgid: int) -> None:
    """Wait until nothing of the killed group is left (loader workers die with it)."""
    for _ in range(500):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


# ----------------------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    stage: str
    triggers: list[Trigger]


def plan(seed: int, reference: dict[str, dict]) -> tuple[list[Scenario], list[Scenario]]:
    """Five seeded kills over the training stages, and one kill in each data stage."""
    rng = random.Random(seed)
    # From DiT's first step to the stage's end: training, or sampling and scoring after the export.
    dit_span = reference.get("dit_train", {}).get("after_first_step_s", 1.0)  # absent when --only leaves DiT out
    training = [
        Scenario("mae_pretrain", [at_step(rng.randint(1, EVERY - 1)),  # before the first checkpoint
                                  checkpoint_write("checkpoints", EVERY * rng.randint(1, STEPS // EVERY))]),
        Scenario("evaluate", [at_step(rng.randint(1, STEPS - 1), phase=rng.randint(0, 1))]),
        Scenario("dit_train", [after_seconds(round(rng.uniform(0.1, 0.9) * dit_span, 2))]),
        Scenario("clip_train", [at_step(rng.randint(EVERY + 1, STEPS - 1))]),
    ]
    shard_s = reference["shard"]["stage_s"]
    data = [
        Scenario("shard", [after_seconds(round(rng.uniform(0.1, 0.8) * shard_s, 2), since="started")]),
        Scenario("encode_latents", [first_file("*.tar.done.json", "after 1st latent shard")]),
        Scenario("index", [first_file("*/embeddings/*.npy", "after 1st embedding file")]),
    ]
    return training, data


def reference_run(root: Path, until: str, sets: list[str], logs: Path) -> dict[str, dict]:
    """The uninterrupted run of the stages up to ``until``; per stage its folder and timings (for the time triggers)."""
    outcome = run_child(root, until, "", sets, logs / "reference.log")
    if outcome.code != 0:
        raise RuntimeError(f"the reference run failed (exit {outcome.code}); see {logs / 'reference.log'}")
    found, current = {}, None
    for stamp, line in outcome.watch.lines:
        if line.startswith("@@start "):
            current = {"start": stamp, "steps": []}
            found[line.split()[1]] = current
        elif line.startswith("@@end "):
            _, name, folder = line.split(" ", 2)
            found[name].update(folder=str(Path(folder).relative_to(root)), stage_s=stamp - found[name]["start"])
        elif current is not None and STEP_LINE.match(line):
            current["steps"].append(stamp)
    for info in found.values():
        info["after_first_step_s"] = info["start"] + info["stage_s"] - (info["steps"] or [info["start"]])[0]
    return found


def fresh_root(reference_root: Path, reference: dict[str, dict], stage: str, root: Path) -> None:
    """A new data root holding copies of the reference's finished folders of the stages before ``stage``."""
    for name in ORDER[:ORDER.index(stage)]:
        folder = reference[name]["folder"]
        shutil.copytree(reference_root / folder, root / folder, ignore=shutil.ignore_patterns("checkpoints"))


def run_with_kills(scenario: Scenario, reference_root: Path, reference: dict[str, dict], root: Path, sets: list[str],
                   logs: Path, max_reruns: int = 2) -> dict:
    """Kill at each trigger in turn (each in a rerun of the killed run), then rerun until the stage finishes."""
    fresh_root(reference_root, reference, scenario.stage, root)
    folder = reference[scenario.stage]["folder"]
    kills, resumes, problems, runs = [], [], [], iter(range(1000))

    def attempt(trigger: Trigger | None) -> Outcome:
        log = logs / f"{scenario.stage}-{next(runs)}.log"
        outcome = run_child(root, scenario.stage, folder, sets, log, trigger)
        if kills:  # every run after a kill says where it resumed
            resumes.append(_resumed_from(outcome.watch, root / folder))
        if outcome.code not in (0, None):
            problems.append(f"a run exited {outcome.code}: see {log}")
        return outcome

    for trigger in scenario.triggers:
        outcome = attempt(trigger)
        kills.append(outcome.kill_point or f"missed (run ended {outcome.code})")
        if outcome.kill_point is None:
            problems.append("a kill trigger never fired: the run ended first")
        if outcome.manifest_after_kill:
            problems.append(f"{folder}/manifest.json exists after the kill at {outcome.kill_point}")
    for _ in range(max_reruns):
        if attempt(None).code == 0:
            break
    else:
        problems.append(f"no rerun finished in {max_reruns} tries")
    return {"kills": kills, "resumes": resumes, "problems": problems, "folder": root / folder}


def _resumed_from(watch: Watch, folder: Path) -> str:
    """'@N' per training that resumed in this run (named by its subfolder when it has one), '0' if none did."""
    found = []
    for _, line in watch.lines:
        if m := RESUME_LINE.match(line):
            owner = Path(m.group(2)).parent
            found.append((f"{owner.name}@" if owner != folder else "@") + m.group(1))
    return " ".join(found) or "0"


def _redone(stage: str, folder: Path) -> str:
    """How much of a data stage its rerun redid (the rest it took from the killed run's finished files)."""
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    if stage == "encode_latents":
        return f"re-encoded {metrics['encoded_now']:.0f}/{metrics['latents']:.0f} latents"
    if stage == "index":
        return f"re-embedded {sum(v for k, v in metrics.items() if k.endswith('/shards_embedded')):.0f} shards"
    return "rebuilt from scratch"


# ----------------------------------------------------------------------------- comparisons

def _tensors(obj, prefix: str = "") -> dict:
    import torch

    if torch.is_tensor(obj):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _tensors(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _tensors(value, f"{prefix}{i}.").items()}
    return {prefix: obj}


def compare_training(stage: str, reference: Path, resumed: Path) -> list[str]:
    """Differences between two runs' exported weights (tensor by tensor) and per-step losses."""
    import torch

    differences = []
    for name in TRAINING[stage][1]:
        if not (resumed / name).is_file():
            differences.append(f"{name} missing")
            continue
        a, b = (_tensors(torch.load(p / name, map_location="cpu", weights_only=False)) for p in (reference, resumed))
        if a.keys() != b.keys():
            differences.append(f"{name}: other keys")
        for key in sorted(a.keys() & b.keys()):
            same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) and torch.is_tensor(b[key]) else a[key] == b[key]
            if not same:
                differences.append(f"{name}: {key.rstrip('.')} differs")
    for name in SUMMARIES[stage]:
        losses = [json.loads((p / name).read_text())["losses"] for p in (reference, resumed)]
        if losses[0] != losses[1]:
            first = next(i for i, (x, y) in enumerate(zip(*losses)) if x != y) if len(losses[0]) == len(losses[1]) else -1
            differences.append(f"{name}: losses differ from step {first + 1}")
    return differences


def compare_data(reference: Path, rerun: Path) -> list[str]:
    """Verification problems of the rerun's folder, and hashed files that differ from the reference."""
    from tasks.verify import verify_stage

    problems = verify_stage(rerun)
    if problems:
        return problems
    files = [json.loads((p / "manifest.json").read_text())["files"] for p in (reference, rerun)]
    hashed = lambda f: {k: v["sha256"] for k, v in f.items() if "sha256" in v}  # noqa: E731
    return [f"{k}: differs from the uninterrupted run" for k in sorted(hashed(files[0]).keys() | hashed(files[1]).keys())
            if hashed(files[0]).get(k) != hashed(files[1]).get(k)]


# ----------------------------------------------------------------------------- main

def run_benchmark(workdir: Path, seed: int = 0, sets: list[str] | None = None, only: list[str] | None = None,
                  scenarios: list[Scenario] | None = None) -> tuple[list[dict], bool]:
    """The reference run, then the planned scenarios (those of the stages in ``only``, or ``scenarios``
    as given); returns the table's rows and whether every one ended identical."""
    sets = overrides() if sets is None else sets
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    reference_root = workdir / "reference"
    stages = [s.stage for s in scenarios] if scenarios else (only or ORDER)
    reference = reference_run(reference_root, max(stages, key=ORDER.index), sets, logs)
    if scenarios is None:
        scenarios = [s for s in sum(plan(seed, reference), []) if not only or s.stage in only]
    rows = []
    for scenario in scenarios:
        result = run_with_kills(scenario, reference_root, reference, workdir / f"killed-{scenario.stage}", sets, logs)
        ref_folder = reference_root / reference[scenario.stage]["folder"]
        if not (result["folder"] / "manifest.json").is_file():
            result["problems"].append("the stage never finished")
        elif scenario.stage in TRAINING:
            result["problems"] += compare_training(scenario.stage, ref_folder, result["folder"])
            result["problems"] += [f"verify: {p}" for p in _verify(result["folder"])]
        else:
            result["problems"] += compare_data(ref_folder, result["folder"])
            result["resumes"] = [_redone(scenario.stage, result["folder"])]
        rows.append({"stage": scenario.stage, "kills": result["kills"], "resumes": result["resumes"],
                     "identical": not result["problems"], "problems": result["problems"]})
    return rows, all(row["identical"] for row in rows)


def _verify(folder: Path) -> list[str]:
    from tasks.verify import verify_stage

    return verify_stage(folder)


def print_table(rows: list[dict]) -> None:
    header = f"{'stage':15s} {'kill points':48s} {'resumed from (per rerun)':32s} identical"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['stage']:15s} {'; '.join(row['kills']):48s} {' | '.join(row['resumes']):32s} "
              f"{'yes' if row['identical'] else 'NO'}")
        for problem in row["problems"]:
            print(f"{'':16s}! {problem}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--only", nargs="*", help="run only these stages' scenarios")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    workdir = (args.keep or Path(tempfile.mkdtemp(prefix="bench-kills-"))).resolve()
    try:
        rows, ok = run_benchmark(workdir, args.seed, only=args.only)
        print_table(rows)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwall time {time.perf_counter() - started:.0f} s (seed {args.seed}); "
          f"{'every killed run ended identical and verified' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

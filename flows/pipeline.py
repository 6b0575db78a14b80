"""The whole patchflow DAG as one Prefect flow.

Each stage is a Prefect task wrapping the stage's plain ``run`` function. The cache key is the
stage's output-folder key (stage, a hash of its code, config, upstream output digests, fingerprints of
files read from outside the data root); a cache hit whose outputs were deleted or damaged since
(tasks/verify.py) is recomputed, so a hit never hands a broken folder downstream; ``rerun`` forces
named stages and their dependants to recompute. One MLflow parent run spans the flow run; each stage
opens a nested run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from data_shards.errors import is_transient
from flows.headlines import headlines, markdown_table, wall_times
from flows.lock import data_root_lock
from flows.schedule import StageJob, run_jobs
from flows.stage_process import run_in_process
from tasks import clip_train, dit_stage, evaluate, index, latents, mae_pretrain, shard, tracking, vae_train
from tasks.config import STAGES, ConfigError, PipelineConfig, load_config
from tasks.distributed import stop_process_groups
from tasks.registry import register_models
from tasks.stage import StageContext, StageResult, stage_output_dir
from tasks.verify import discard_stage, verify_stage

StageFn = Callable[[Any, list[StageResult], StageContext], StageResult]


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache on what the stage's output depends on, per data root: the stage's output folder name, so
    the files it reads from outside the data root are fingerprinted before Prefect looks up its cache."""
    stage = context.task.name
    config, inputs, stage_context = parameters["config"], parameters["inputs"], parameters["context"]
    root = hashlib.sha256(str(Path(stage_context.data_root).resolve()).encode()).hexdigest()[:12]
    key = stage_output_dir(stage_context.data_root, stage, config, inputs).name
    return f"patchflow-{stage}-{key}-{root}"


@dataclass
class Reruns:
    """Stages the user asked to recompute (``patchflow run --rerun STAGE``), and the output folders
    recomputed for them in this flow run: a stage reruns when it is named or when one of its inputs
    was rerun, so everything downstream of a named stage recomputes and the rest stays cached."""

    stages: frozenset[str] = frozenset()
    recomputed: set[str] = field(default_factory=set)

    def forces(self, stage: str, inputs: list[StageResult]) -> bool:
        return stage in self.stages or any(result.output_dir in self.recomputed for result in inputs)


def _recompute(stage: Any, config: Any, inputs: list[StageResult], context: StageContext) -> StageResult:
    # The folder goes first: the stage's own run() reuses any folder that still has its manifest.
    discard_stage(stage_output_dir(context.data_root, stage.name, config, inputs))
    result = stage.with_options(refresh_cache=True)(config, inputs, context)
    problems = verify_stage(result.output_dir)  # cheap: the manifest writer's hashes are cached in this process
    if problems:  # a fresh folder that fails its own manifest points at the disk, not the cache
        raise RuntimeError(f"{stage.name}: freshly written outputs in {result.output_dir} fail verification: "
                           f"{'; '.join(problems)}")
    return result


def run_stage(stage: Any, config: Any, inputs: list[StageResult], context: StageContext,
              reruns: Reruns | None = None, name: str | None = None) -> StageResult:
    """Call a stage task and record on the pipeline's MLflow run how it went (``stage.<name>``:
    running, then ran, reused or failed with the error's first line; its wall time; the MLflow run
    that produced its outputs). ``name`` tells two runs of one task apart (``shard_pairs``)."""
    name = name or stage.name
    tracking.tag_run(context.parent_run_id, {f"stage.{name}": "running"})
    started, started_s = time.monotonic(), time.time()
    try:
        result, reused = _call_stage(stage, config, inputs, context, reruns)
    except BaseException as exc:
        state = f"failed: {_first_line(exc)}" if isinstance(exc, Exception) else "killed"
        tracking.tag_run(context.parent_run_id, {f"stage.{name}": state,
                                                 f"stage.{name}.seconds": f"{time.monotonic() - started:.1f}"})
        raise
    wall = time.monotonic() - started
    tracking.tag_run(context.parent_run_id, {f"stage.{name}": "reused" if reused else "ran",
                                             f"stage.{name}.seconds": f"{wall:.1f}",
                                             f"stage.{name}.mlflow_run": result.mlflow_run_id or ""})
    if not reused and result.mlflow_run_id:  # the stage's own run keeps the record of what it wrote
        tracking.log_artifact_to(result.mlflow_run_id, result.manifest_path)
    return result.model_copy(update={"reused": reused, "wall_s": wall, "started_s": started_s})


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text[:480]


def _call_stage(stage: Any, config: Any, inputs: list[StageResult], context: StageContext,
                reruns: Reruns | None) -> tuple[StageResult, bool]:
    """The stage's result and whether it was reused (a Prefect cache hit, or a finished folder the
    stage found). A stage named by ``--rerun`` (or downstream of one) recomputes; a reused result
    whose folder fails verification (manifest gone, a file missing, resized or with another sha256)
    is recomputed with the cache refreshed rather than passed downstream."""
    if reruns is not None and reruns.forces(stage.name, inputs):
        get_run_logger().info("%s: recomputing (--rerun %s)", stage.name, ", ".join(sorted(reruns.stages)))
        result = _recompute(stage, config, inputs, context)
        reruns.recomputed.add(result.output_dir)
        return result, False
    state = stage(config, inputs, context, return_state=True)
    result = state.result()  # raises the stage's error when it failed
    problems = verify_stage(result.output_dir)
    if problems:
        get_run_logger().warning("%s: reused outputs in %s are damaged (%s); recomputing the stage", result.stage,
                                 result.output_dir, "; ".join(problems))
        return _recompute(stage, config, inputs, context), False
    # A Prefect cache hit hands back the result persisted when the stage first ran, reused=False and all.
    return result, result.reused or state.name == "Cached"


def _summarise(result: StageResult) -> None:
    rows = [{"metric": name, "value": round(value, 6)} for name, value in sorted(result.metrics.items())]
    rows.append({"metric": "output_dir", "value": result.output_dir})
    create_table_artifact(table=rows, key=f"{result.stage.replace('_', '-')}-summary",
                          description=f"patchflow stage {result.stage}")


def flow_summary(results: dict[str, StageResult], pipeline_run: Any) -> str:
    """The flow run's Prefect artifact: each stage's outcome and numbers, linked to its MLflow run."""
    link = lambda run_id: tracking.run_link(pipeline_run.info.experiment_id, run_id)  # noqa: E731
    lines = [f"# patchflow run ([MLflow]({link(pipeline_run.info.run_id)}))", "",
             "## Headline numbers", "", markdown_table(headlines(results)), "", f"Wall time: {wall_times(results)}", "",
             "## Every stage", "", "| stage | outcome | metrics | MLflow run |", "|---|---|---|---|"]
    for name, result in results.items():
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
        run = f"[{result.mlflow_run_id[:8]}]({link(result.mlflow_run_id)})" if result.mlflow_run_id else ""
        lines.append(f"| {name} | {'reused' if result.reused else 'ran'} | {numbers} | {run} |")
    return "\n".join(lines)


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed stage only for a fault a retry may get past
    (a lost API connection, a locked database); bad input fails the stage at once."""
    # The engine hands the exception over as the Failed state's data; state.result() would re-raise it
    # through Prefect's async machinery and add those frames to the stage's traceback.
    return isinstance(state.data, BaseException) and is_transient(state.data)


def stage_task(name: str, run: StageFn) -> Any:
    """Wrap a stage's plain function as a cached Prefect task, retried (after 2 s, then 10 s) for transient faults."""

    @task(name=name, cache_key_fn=stage_cache_key, persist_result=True, retries=2, retry_delay_seconds=[2, 10],
          retry_condition_fn=retry_if_transient)
    def run_stage(config: Any, inputs: list[StageResult], context: StageContext) -> StageResult:
        if context.process_threads is None:
            result = run(config, inputs, context)
        else:  # beside other stages: in a process of its own (see flows/stage_process.py)
            result = run_in_process(name, config, inputs, context)
        get_run_logger().info("%s %s -> %s", name, "reused" if result.reused else "finished", result.output_dir)
        _summarise(result)
        return result

    return run_stage


shard_task = stage_task("shard", shard.run)
mae_task = stage_task("mae_pretrain", mae_pretrain.run)
evaluate_task = stage_task("evaluate", evaluate.run)
vae_task = stage_task("vae", vae_train.run)
latents_task = stage_task("encode_latents", latents.run)
dit_task = stage_task("dit_train", dit_stage.run)
clip_task = stage_task("clip_train", clip_train.run)
index_task = stage_task("index", index.run)


def _pairs_found(config: PipelineConfig) -> bool:
    """The pairs dataset is optional data (the demo's Twemoji pairs ship beside the repo, not in it):
    without it the CLIP branch is skipped with a warning that says how to enable it, rather than
    failing a run whose other stages have all finished."""
    path = config.pairs.source.path if config.pairs else None
    if path is None or Path(path).expanduser().exists():
        return True
    get_run_logger().warning("clip_train skipped: the pairs source %s does not exist (set pairs.source.path to a "
                             "caption table, e.g. the Twemoji pairs of the shared data folder)", path)
    tracking.set_tag("stage.clip_train", f"skipped: no pairs source at {path}")
    return False


@flow(name="patchflow", log_prints=True)
def pipeline(
    preset: str = "demo", overrides: list[str] | None = None, data_root: str | None = None,
    rerun: list[str] | None = None, wait_for_lock: bool = False,
) -> dict[str, StageResult]:
    """Run every enabled stage of the preset, reusing what finished before (and is intact), except
    the stages named in ``rerun`` and everything downstream of them. One run per data root at a
    time: another run's lock refuses this one, or with ``wait_for_lock`` queues it."""
    config: PipelineConfig = load_config(preset, overrides, data_root)
    unknown = sorted(set(rerun or []) - set(STAGES))
    if unknown:
        raise ConfigError(f"rerun: unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
    # What `patchflow resume` needs to run this again exactly (the preset as given: a name or a path).
    launch = {"patchflow.preset": preset, "patchflow.overrides": json.dumps(list(overrides or [])),
              "patchflow.data_root": str(Path(config.data_root).resolve())}
    with data_root_lock(config.data_root, wait=wait_for_lock):
        return _run_stages(config, Reruns(frozenset(rerun or [])), launch)


def process_threads(slots: int) -> int | None:
    """Compute threads for each stage when ``slots`` stages run side by side (None: one at a time,
    in this process, with all of them)."""
    return None if slots == 1 else max(1, len(os.sched_getaffinity(0)) // slots)


def _run_stages(config: PipelineConfig, reruns: Reruns, launch: dict[str, str]) -> dict[str, StageResult]:
    root = Path(config.data_root)
    run_name = f"{config.preset}-{flow_run.get_name() or 'local'}"
    tags = {**launch, "patchflow.stage": "pipeline", "prefect.flow_run_id": str(flow_run.get_id())}
    with tracking.stage_run("pipeline", root, None, params=config.model_dump(mode="json"), run_name=run_name,
                            tags=tags) as parent:
        context = StageContext(data_root=root, parent_run_id=parent.info.run_id,
                               process_threads=process_threads(config.concurrent_stages))
        jobs = stage_jobs(config, context, reruns)
        tracking.tag_run(parent.info.run_id, {"patchflow.planned": ",".join(job.name for job in jobs)})
        if config.concurrent_stages > 1:
            get_run_logger().info("up to %d stages at once, each in its own process with %d compute thread(s)",
                                  config.concurrent_stages, context.process_threads)
        results = run_jobs(jobs, config.concurrent_stages, on_stop=stop_process_groups)
        for name, result in results.items():  # the runs table compares pipeline runs on these
            tracking.log_metrics({f"{name}.{k}": v for k, v in result.metrics.items()})
        create_markdown_artifact(markdown=flow_summary(results, parent), key="patchflow-run-summary",
                                 description=f"patchflow {config.preset}: what each stage did and measured")
    return results


def stage_jobs(config: PipelineConfig, context: StageContext, reruns: Reruns) -> list[StageJob[StageResult]]:
    """The DAG: each enabled stage with the stages it reads, listed in the order one slot runs them."""

    def job(name: str, task: Any, stage_config: Any, needs: list[str]) -> StageJob[StageResult]:
        return StageJob(name, tuple(needs), lambda done: _run_and_register(
            name, task, stage_config, [done[need] for need in needs], context, reruns, done))

    jobs = [job("shard", shard_task, config.shard, [])]
    if "mae_pretrain" in config.stages:
        jobs.append(job("mae_pretrain", mae_task, config.mae, ["shard"]))
    if "evaluate" in config.stages and "mae_pretrain" in config.stages:
        jobs.append(job("evaluate", evaluate_task, config.evaluate, ["shard", "mae_pretrain"]))
    # The latent-diffusion branch needs only the shards: it scores its samples with a classifier of
    # its own, so probe or fine-tune settings never retrain the DiT, and it runs beside MAE → evaluate.
    if "vae" in config.stages:
        jobs.append(job("vae", vae_task, config.vae, ["shard"]))
    if "encode_latents" in config.stages and "vae" in config.stages:
        jobs.append(job("encode_latents", latents_task, config.latents, ["shard", "vae"]))
    if "dit_train" in config.stages and "encode_latents" in config.stages:
        jobs.append(job("dit_train", dit_task, config.dit, ["shard", "vae", "encode_latents"]))
    # CLIP trains on the pairs dataset (its own shard run, cached on its own key); its image tower
    # starts from the MAE encoder when clip.image_init is mae. A preset without pairs runs no CLIP.
    if "clip_train" in config.stages and config.pairs is not None and _pairs_found(config):
        jobs.append(job("shard_pairs", shard_task, config.pairs, []))
        mae = ["mae_pretrain"] if config.clip.image_init == "mae" and "mae_pretrain" in config.stages else []
        jobs.append(job("clip_train", clip_task, config.clip, ["shard_pairs", *mae]))
    if "index" in config.stages and config.index.targets:
        jobs += _index_job(config, context, reruns, {job.name for job in jobs})
    return jobs


def _index_job(config: PipelineConfig, context: StageContext, reruns: Reruns,
               planned: set[str]) -> list[StageJob[StageResult]]:
    """Indexes come after the encoders: each target names a dataset and an encoder of this run
    (checked when the config loads), and the stage reads only what its targets need."""
    datasets = {"images": "shard", "pairs": "shard_pairs"}
    encoders = {"mae": "mae_pretrain", "clip": "clip_train"}
    # Only a skipped optional branch (no pairs source) leaves a target's inputs unplanned here.
    targets = [t for t in config.index.targets if datasets[t.dataset] in planned and encoders[t.encoder] in planned]
    for dropped in (t for t in config.index.targets if t not in targets):
        get_run_logger().warning("index target %s skipped: its %s encoder does not run", dropped.name, dropped.encoder)
    if not targets:
        return []
    used = [datasets[t.dataset] for t in targets] + [encoders[t.encoder] for t in targets]
    needs = list(dict.fromkeys(used))
    index_config = config.index.model_copy(update={"targets": targets})

    def start(done: dict[str, StageResult]) -> StageResult:
        upstream = list({done[name].digest: done[name] for name in used}.values())
        roles = {dataset: done[stage].digest for dataset, stage in datasets.items() if stage in needs}
        index_context = dataclasses.replace(context, extra={"index_datasets": roles})
        return _run_and_register("index", index_task, index_config, upstream, index_context, reruns, done)

    return [StageJob("index", tuple(needs), start)]


def _run_and_register(name: str, task: Any, stage_config: Any, inputs: list[StageResult], context: StageContext,
                      reruns: Reruns, done: dict[str, StageResult]) -> StageResult:
    result = run_stage(task, stage_config, inputs, context, reruns, name=name)
    if not result.reused:  # a reused model was registered when it was trained
        register_models(name, {**done, name: result})
    return result

"""Running the pipeline's stages in dependency order, one at a time or several side by side.

A stage starts once every stage it ``needs`` has finished. With one slot the stages run in the
order listed, in the calling thread, exactly as a plain loop would. With more, independent branches
overlap (the latent-diffusion branch beside MAE → evaluate): at most ``slots`` stages run at once,
each in a worker thread that carries the flow run's context (so Prefect records its task runs in this
flow run), and when several stages are ready, the one listed first starts first. A stage that fails
stops new stages from starting; the ones running finish, and the first failure, in list order, is raised.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

Result = TypeVar("Result")


@dataclass(frozen=True)
class StageJob(Generic[Result]):
    """One stage run of the plan: its name, the jobs it needs, and how to run it given their results."""

    name: str
    needs: tuple[str, ...]
    start: Callable[[dict[str, Result]], Result]


def check_plan(jobs: list[StageJob[Result]]) -> None:
    """Every job needs only jobs listed before it (so the list order is a valid order to run them)."""
    seen: set[str] = set()
    for job in jobs:
        missing = [name for name in job.needs if name not in seen]
        if missing or job.name in seen:
            raise ValueError(f"stage plan: {job.name} needs {missing} before it, or is listed twice")
        seen.add(job.name)


def run_jobs(jobs: list[StageJob[Result]], slots: int, on_stop: Callable[[], None] = lambda: None) -> dict[str, Result]:
    """Run ``jobs`` and return their results in list order. ``on_stop`` runs when this thread is
    interrupted (Ctrl-C, SIGTERM) while stages run in worker threads: it must make them end (stop the
    processes they wait on), since the interrupt reaches only this thread."""
    check_plan(jobs)
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    if slots == 1:
        results: dict[str, Result] = {}
        for job in jobs:
            results[job.name] = job.start(dict(results))
        return results
    return _run_side_by_side(jobs, slots, on_stop)


def _run_side_by_side(jobs: list[StageJob[Result]], slots: int, on_stop: Callable[[], None]) -> dict[str, Result]:
    results: dict[str, Result] = {}
    failures: dict[str, BaseException] = {}
    waiting = list(jobs)
    running: dict[Future[Result], StageJob[Result]] = {}
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="patchflow-stage") as pool:
        try:
            while waiting or running:
                ready = [job for job in waiting if all(name in results for name in job.needs)]
                for job in ready[: slots - len(running)] if not failures else []:
                    waiting.remove(job)
                    # Each job gets its own copy of this thread's context: Prefect's flow-run context lives there.
                    future = pool.submit(contextvars.copy_context().run, job.start, dict(results))
                    running[future] = job
                if not running:
                    break  # a failure stopped the rest (the plan itself is checked above)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    try:
                        results[job.name] = future.result()
                    except Exception as exc:  # noqa: BLE001 - raised below, once the running stages ended
                        failures[job.name] = exc
        except BaseException:
            on_stop()
            raise
    for job in jobs:
        if job.name in failures:
            raise failures[job.name]
    return {job.name: results[job.name] for job in jobs}

"""Process-group setup from torchrun's environment, and launching torchrun from a task."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import mlflow
import torch
import torch.distributed as dist

from data_shards.atomic import write_bytes_atomic, write_json_atomic
from data_shards.errors import BadInputError, PatchflowError, TransientError, is_transient
from tasks.config import TrainConfig
from tasks.tracking import detach_run, tracking_uri


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class TrainingStopped(PatchflowError, RuntimeError):
    """Training ended before its last step (killed, or its process failed); a rerun resumes it.
    Not transient: the stage is not retried in-process, since a kill is usually the user's choice."""


def init_distributed() -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(
    module: str, module_args: list[str], nproc_per_node: int, nnodes: int = 1,
    rdzv_endpoint: str | None = None, node_rank: int | None = None,
) -> list[str]:
    """The torchrun command line for ``python -m module``; several nodes rendezvous over c10d."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise BadInputError("train.rdzv_endpoint (host:port) is required when train.nnodes > 1")
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        if node_rank is not None:
            command.append(f"--node-rank={node_rank}")
    else:
        command.append("--standalone")
    return command + ["-m", module, *module_args]


def write_join_script(job_path: Path, command: list[str], env: dict[str, str]) -> Path:
    """``<job>.join.sh`` beside the job file: the torchrun agent another node starts to join this
    stage's training (same rendezvous, same job; whichever node's rank 0 it gets logs to the run)."""
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    script = job_path.with_suffix(".join.sh")
    write_bytes_atomic(script, f"#!/bin/sh\n# joins {job_path.parent.name}'s training as one more node\n"
                               f"{exports}exec {shlex.join(command)}\n".encode())
    return script


# Child process groups started by run_process_group and still running: a stop signal that arrives in
# another thread (concurrent stages wait in worker threads) stops them through stop_process_groups.
_live_groups: set[subprocess.Popen] = set()
_live_lock = threading.Lock()
STOP_GRACE_S = 20  # SIGTERM, then this long for the group to unwind, then SIGKILL


def run_process_group(command: list[str], log: Callable[[str], None], env: dict[str, str] | None = None,
                      tail_lines: int = 120) -> tuple[int, list[str]]:
    """Run ``command`` in a session of its own, passing each output line to ``log``; return its exit
    code and last ``tail_lines`` lines. On any exception here (Ctrl-C included) the whole group is stopped.

    A new session means a cancelled or timed-out task can stop every process the command started
    (torchrun's ranks), not just the command itself, and a terminal's Ctrl-C reaches only patchflow,
    which then stops the group in order.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, **(env or {})})
    with _live_lock:
        _live_groups.add(process)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            log(line)
        return process.wait(), list(tail)
    except BaseException:
        _stop_groups([process])
        raise
    finally:
        with _live_lock:
            _live_groups.discard(process)


def stop_process_groups() -> None:
    """Stop every group :func:`run_process_group` is running, from any thread (a stop signal reaches
    only the main thread; the threads waiting on these groups then see them exit)."""
    with _live_lock:
        running = list(_live_groups)
    _stop_groups(running)


def _stop_groups(processes: list[subprocess.Popen]) -> None:
    for process in processes:  # all signalled first, so their clean-ups overlap
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_torchrun(command: list[str], log: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> None:
    """Run torchrun in its own process group, streaming its output; stop all of it on interrupt."""
    # torchrun's own traceback takes ~40 lines; keep enough to show the failing rank's output above it.
    code, tail = run_process_group(command, log or logging.getLogger("patchflow.torchrun").info, env, tail_lines=120)
    if code != 0:
        raise RuntimeError(f"torchrun exited with code {code}; last output:\n" + "\n".join(tail))


def launch_training(module: str, worker: Callable[[Path], Any], job_path: Path, train: TrainConfig, run_id: str,
                    data_root: Path, exported: Path, summary_path: Path, checkpoint_dir: Path,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a stage's ``worker(job_path)`` in this process for one rank, else on every torchrun rank,
    and return the training summary rank 0 wrote beside its export.

    ``module`` must call :func:`run_rank` with the same worker under ``__main__``; rank 0 then logs
    into the stage's MLflow run ``run_id``.

    Raises:
        RuntimeError: no export, i.e. training stopped before its last step; the message names the
            checkpoint folder a rerun resumes from.
    """
    if train.nproc_per_node * train.nnodes == 1:
        worker(job_path)
    else:
        command = torchrun_command(module, [str(job_path)], train.nproc_per_node, train.nnodes, train.rdzv_endpoint)
        for stale in rank_error_paths(job_path):
            stale.unlink()
        env = {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": tracking_uri(data_root)}
        if train.nnodes > 1:
            join = write_join_script(job_path, command, env)
            (log or logging.getLogger("patchflow.torchrun").info)(
                f"waiting for {train.nnodes - 1} more node(s) to join the rendezvous at {train.rdzv_endpoint}: on each, "
                f"with the data root mounted at the same path, run: sh {join}")
        try:
            run_torchrun(command, log=log, env=env)
        except RuntimeError as exc:
            failure = rank_failure(job_path)
            if failure is None:
                raise
            raise failure from exc
    if not exported.is_file():
        raise TrainingStopped(f"{module}: training stopped before step {train.steps}; run again to resume from the "
                              f"newest checkpoint in {checkpoint_dir}", hint="run the same command again: finished "
                              "stages are reused and training resumes from its newest checkpoint")
    return json.loads(summary_path.read_text())


def loss_ends(losses: list[float], max_window: int) -> dict[str, float]:
    """Mean loss over the first and the last few steps (a quarter of them, at most ``max_window``)."""
    window = max(1, min(max_window, len(losses) // 4))
    return {"first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window}


def rank_error_paths(job_path: Path) -> list[Path]:
    return sorted(job_path.parent.glob(f"{job_path.stem}.error-rank*.json"))


def rank_failure(job_path: Path) -> PatchflowError | None:
    """The first rank's expected failure, rebuilt in the launcher from the file the rank left, so a
    damaged shard read by rank 1 reaches the user as that error (class, message, fix), not as
    "torchrun exited with code 1"; None when no rank left one (a crash or a kill)."""
    for path in rank_error_paths(job_path):
        error = json.loads(path.read_text())
        kind = TransientError if error["transient"] else BadInputError
        return kind(f"{error['type']} on rank {error['rank']}: {error['message']}", hint=error["hint"])
    return None


def run_rank(worker: Callable[[Path], Any], job_path: str) -> NoReturn:
    """A torchrun rank's entry point: rank 0 attaches to the launching stage's MLflow run; an expected
    failure is also written beside the job file for the launcher (torchrun passes on only an exit code).
    The rank then leaves without interpreter finalization (see :func:`leave_process`)."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(name)s %(message)s")
    try:
        if rank == "0" and os.environ.get("MLFLOW_RUN_ID"):
            mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
            try:
                worker(Path(job_path))
            finally:
                detach_run()  # a server lost mid-training must not fail the rank as it leaves the run
        else:
            worker(Path(job_path))
    except BaseException as exc:
        # Ctrl-C and sys.exit keep their codes; whatever happens while reporting, the rank still leaves here.
        code = 130 if isinstance(exc, KeyboardInterrupt) else _exit_code(exc) if isinstance(exc, SystemExit) else 1
        try:
            if isinstance(exc, PatchflowError):
                job = Path(job_path)
                write_json_atomic(job.with_name(f"{job.stem}.error-rank{rank}.json"),
                                  {"rank": rank, "type": type(exc).__name__, "message": str(exc), "hint": exc.hint,
                                   "transient": is_transient(exc)})
            if code not in (0, 130):
                traceback.print_exc()
        finally:
            leave_process(code)
    leave_process(0)


def _exit_code(exc: SystemExit) -> int:
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def leave_process(code: int) -> NoReturn:
    """Exit a rank without Python's finalization. A gloo worker thread can still be dropping the last
    finished collective, whose saved thread-local state holds a Python object; a thread that takes the
    GIL during finalization is ended with pthread_exit, which a C++ thread turns into std::terminate:
    the rank died of SIGABRT after its last step (seen in CI, about one 2-rank run in three here).
    Everything a rank writes is already on disk (atomic renames) and the MLflow run is detached."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

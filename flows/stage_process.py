"""A stage run in a process of its own, for stages that run side by side.

Stages lean on process-wide state: torch's global seed (model initialisation), its thread count,
MLflow's active run. Two stages computing at once in one process would change each other's results
and oversubscribe the cores, so when the pipeline runs branches concurrently every stage runs here:
``python -m flows.stage_process JOB_DIR`` reads the stage's arguments, runs the stage module's ``run``
with the thread count it was given, and writes back its result or its error. Its log records come
back as JSON lines and are logged again in the pipeline's process under their own logger names, so
they reach the terminal, the command log and the Prefect UI as any stage's do.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, NoReturn

from data_shards.atomic import write_bytes_atomic, write_json_atomic
from data_shards.errors import TransientError, is_transient
from tasks.distributed import leave_process, run_process_group
from tasks.stage import PROJECT_ROOT, STAGE_MODULES, StageContext, StageResult

JOB_FILE, RESULT_FILE, ERROR_FILE = "job.pkl", "result.json", "error.json"
LOG_MARK = "\x1epatchflow-log "  # starts a relayed log record; any other output line is relayed as it is


def run_in_process(stage: str, config: Any, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Run ``stage`` in a child process with ``context.process_threads`` compute threads; return its
    result, or raise its error (the same exception class and hint; its traceback as a note).
    Stopping this thread's caller stops the child through ``stop_process_groups``."""
    threads = str(context.process_threads or 1)
    with tempfile.TemporaryDirectory(prefix=f"patchflow-{stage}-") as tmp:
        job_dir = Path(tmp)
        (job_dir / JOB_FILE).write_bytes(pickle.dumps((stage, config, inputs, context)))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        code, tail = run_process_group([sys.executable, "-m", "flows.stage_process", str(job_dir)],
                                       log=_relay(stage), env=env, tail_lines=40)
        if code == 0 and (job_dir / RESULT_FILE).is_file():
            return StageResult.model_validate_json((job_dir / RESULT_FILE).read_text())
        raise _child_error(stage, job_dir, code, tail)


def _relay(stage: str) -> Any:
    plain = logging.getLogger(f"patchflow.{stage}")

    def log(line: str) -> None:
        if line.startswith(LOG_MARK):
            try:
                record = json.loads(line[len(LOG_MARK):])
                logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
                return
            except (ValueError, KeyError, TypeError):
                pass
        if line.strip():
            plain.info("%s", line)

    return log


def _child_error(stage: str, job_dir: Path, code: int, tail: list[str]) -> BaseException:
    path = job_dir / ERROR_FILE
    if not path.is_file():  # killed (a stop signal, the OOM killer) before it could say why
        return RuntimeError(f"{stage}: its process exited with code {code} before finishing; last output:\n"
                            + "\n".join(tail))
    report = json.loads(path.read_text())
    error: BaseException | None = None
    if report["pickled"]:
        try:
            error = pickle.loads(base64.b64decode(report["pickled"]))
        except Exception:  # noqa: BLE001 - a library exception that does not unpickle: described below
            error = None
    if error is None or (report["transient"] and not is_transient(error)):
        # Its cause chain stays behind, so keep what the retry policy reads from it.
        error = (TransientError if report["transient"] else RuntimeError)(report["message"])
    error.add_note(f"raised in {stage}'s own process:\n{report['traceback'].rstrip()}")
    return error


# ----------------------------------------------------------------------------- the child's side

class _JsonLines(logging.Handler):
    """Each record as one marked JSON line on stdout, for the parent to log again."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line = json.dumps({"name": record.name, "level": record.levelno, "message": message})
            sys.stdout.write(f"{LOG_MARK}{line}\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never fail the stage
            self.handleError(record)


def _report_error(job_dir: Path, exc: BaseException) -> None:
    try:
        pickled: str | None = base64.b64encode(pickle.dumps(exc)).decode()
        pickle.loads(base64.b64decode(pickled))
    except Exception:  # noqa: BLE001 - not every library exception round-trips
        pickled = None
    write_json_atomic(job_dir / ERROR_FILE, {
        "message": f"{type(exc).__name__}: {exc}", "pickled": pickled,
        "transient": is_transient(exc), "traceback": "".join(traceback.format_exception(exc)),
    })


def main(job_dir: Path) -> NoReturn:
    from flows.environment import quiet_library_loggers
    from flows.interrupts import exit_on_signals

    exit_on_signals()  # the parent stops this process with SIGTERM: unwind, end the MLflow run KILLED
    root = logging.getLogger()
    root.handlers[:] = [_JsonLines()]
    root.setLevel(logging.INFO)
    quiet_library_loggers()
    code = 1
    try:
        stage, config, inputs, context = pickle.loads((job_dir / JOB_FILE).read_bytes())
        run = importlib.import_module(STAGE_MODULES[stage]).run
        result: StageResult = run(config, inputs, context)
        write_bytes_atomic(job_dir / RESULT_FILE, result.model_dump_json().encode())
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _report_error(job_dir, exc)
    leave_process(code)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

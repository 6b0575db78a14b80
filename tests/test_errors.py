"""What is transient and what is bad input: real faults classified, stages retried only for transient
ones, and the CLI's one-line failures with the traceback in a log file."""

from __future__ import annotations

import errno
import http.server
import io
import json
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from PIL import Image

from data_shards.errors import BadInputError, PatchflowError, TransientError, is_transient
from data_shards.loader import ShardError, read_shard
from data_shards.samples import SourceError
from tasks.checkpoint import CheckpointMismatch, DamagedFileError, load_torch_file
from tasks.config import ConfigError
from tasks.engine import NonFiniteLossError
from tasks.search import SearchError

REPO = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the hierarchy -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ConfigError, SourceError, ShardError, CheckpointMismatch, DamagedFileError,
                                 SearchError, NonFiniteLossError])
def test_existing_errors_are_bad_input_and_keep_their_builtin_base(cls):
    error = cls("message", hint="do this")
    assert isinstance(error, BadInputError) and not is_transient(error)
    assert isinstance(error, (ValueError, RuntimeError))  # code that catches the builtin still does
    copy = pickle.loads(pickle.dumps(error))  # Prefect persists a failed state's exception
    assert (type(copy), str(copy), copy.hint) == (cls, "message", "do this")


def test_a_classified_error_wins_over_the_fault_it_was_raised_from():
    try:
        try:
            raise OSError(errno.ETIMEDOUT, "timed out")
        except OSError as exc:
            raise SourceError("/data/train-images: cannot read IDX file") from exc
    except SourceError as exc:
        assert not is_transient(exc)  # the raiser decided: a retry cannot make the file readable
    assert is_transient(TransientError("lost the API"))
    assert not is_transient(NonFiniteLossError("loss is nan at step 3"))  # a fixed seed diverges again
    assert not is_transient(ValueError("a bug")) and not is_transient(FileNotFoundError(errno.ENOENT, "gone"))


@pytest.mark.parametrize("code,transient", [(errno.ESTALE, True), (errno.ETIMEDOUT, True), (errno.ECONNRESET, True),
                                            (errno.EHOSTDOWN, True), (errno.ENETDOWN, True), (errno.ENOSPC, False),
                                            (errno.EACCES, False)])
def test_network_filesystem_errnos_are_transient(code, transient):
    assert is_transient(OSError(code, os.strerror(code), "/nfs/shards/train-000000.tar")) is transient


def test_locked_sqlite_is_transient_through_sqlite3_and_sqlalchemy(tmp_path):
    import sqlalchemy

    path = tmp_path / "store.db"
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    holder.execute("create table runs (id integer)")
    holder.execute("begin exclusive")  # as a second writer (MLflow, Prefect's server) holds it
    with pytest.raises(sqlite3.OperationalError, match="database is locked") as raw:
        sqlite3.connect(path, timeout=0).execute("select * from runs")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked") as wrapped:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select * from runs"))
    with pytest.raises(sqlite3.OperationalError, match="no such table") as missing:
        sqlite3.connect(":memory:").execute("select * from absent")
    holder.close()
    engine.dispose()
    assert is_transient(raw.value) and is_transient(wrapped.value)
    assert not is_transient(missing.value)


def test_lost_api_connections_are_transient(monkeypatch):
    import httpx
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(httpx.ConnectError) as prefect_style:  # Prefect's client speaks httpx
        httpx.get(url + "/api/health", timeout=2)
    with pytest.raises(requests.ConnectionError) as requests_style:
        requests.get(url, timeout=2)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match="API request to .* failed") as mlflow_style:
        MlflowClient(tracking_uri=url).get_experiment("0")  # MLflow rewraps the requests error
    assert is_transient(prefect_style.value) and is_transient(requests_style.value)
    assert is_transient(mlflow_style.value)


class _Status(http.server.BaseHTTPRequestHandler):
    status, error_code = 503, "TEMPORARILY_UNAVAILABLE"

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"error_code": self.error_code, "message": "from the test server"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,error_code,transient", [(503, "TEMPORARILY_UNAVAILABLE", True),
                                                         (500, "INTERNAL_ERROR", True),
                                                         (404, "RESOURCE_DOES_NOT_EXIST", False)])
def test_mlflow_server_errors_are_transient_only_for_5xx(monkeypatch, status, error_code, transient):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    handler = type("Handler", (_Status,), {"status": status, "error_code": error_code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # 5xx: MLflow's client retries, then wraps requests' RetryError; 4xx: a RestException from the body.
        with pytest.raises(MlflowException) as info:
            MlflowClient(tracking_uri=f"http://127.0.0.1:{server.server_port}").get_experiment("0")
    finally:
        server.shutdown()
    assert is_transient(info.value) is transient


@pytest.mark.parametrize("error_code,transient", [("TEMPORARILY_UNAVAILABLE", True), ("INTERNAL_ERROR", True),
                                                  ("NOT_IMPLEMENTED", False), ("INVALID_PARAMETER_VALUE", False)])
def test_mlflow_rest_exceptions_are_transient_for_5xx_codes(error_code, transient):
    from mlflow.exceptions import RestException

    assert is_transient(RestException({"error_code": error_code, "message": "from a tracking server"})) is transient


# --- hints that say what to do ----------------------------------------------------------------------

def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _stage_folder_with_a_short_shard(folder: Path) -> Path:
    """A shard stage folder whose manifest lists 3 samples in a tar that holds 2."""
    folder.mkdir(parents=True)
    shard = folder / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(_png())
            tar.addfile(info, io.BytesIO(_png()))
    splits = {"train": {"shards": [{"name": shard.name, "samples": 3}]}}
    (folder / "manifest.json").write_text(json.dumps({"outputs": {"splits": splits}}))
    return shard


def test_a_damaged_or_missing_shard_says_which_folder_to_delete(tmp_path):
    folder = tmp_path / "stages" / "shard" / "0123abcd"
    shard = _stage_folder_with_a_short_shard(folder)
    with pytest.raises(ShardError, match="lists 3 samples but the tar ends after 2") as short:
        list(read_shard(str(shard)))
    shard.unlink()
    with pytest.raises(ShardError, match="train-000000.tar") as missing:
        list(read_shard(str(shard)))
    for error in (short.value, missing.value):
        assert error.hint == f"delete the shard stage folder {folder} and run `patchflow run` again to rebuild it"


def test_a_damaged_weights_file_names_the_folder_to_delete(tmp_path):
    damaged = tmp_path / "stages" / "mae_pretrain" / "feedbeef" / "encoder.pt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DamagedFileError, match=r"encoder\.pt: damaged or not a torch file") as info:
        load_torch_file(damaged)
    assert str(damaged.parent) in info.value.hint and "patchflow run" in info.value.hint


# --- retries only for transient faults (real Prefect task runs) -------------------------------------

def _counting_stage(name: str, failures: list[Exception], calls: list[int], result_dir: Path):
    """A stage that raises the given exceptions one call after another, then succeeds."""
    from flows.pipeline import stage_task
    from tasks.stage import StageResult

    def run(config, inputs, context):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return StageResult(stage=name, output_dir=str(result_dir), manifest_path=str(result_dir / "manifest.json"),
                           digest="0" * 16, metrics={"calls": float(len(calls))})

    return stage_task(name, run)


def _run_in_flow(stage, config, context):
    from prefect import flow

    @flow(name="errors-test")
    def one_stage():
        return stage(config, [], context)

    return one_stage()


@pytest.mark.slow
def test_bad_input_in_a_stage_runs_once_and_reaches_the_caller_with_its_hint(prefect_harness, tmp_path):
    from tasks import shard
    from tasks.config import ShardConfig, SourceConfig
    from tasks.stage import StageContext
    from flows.pipeline import stage_task

    calls = []

    def counted_shard(config, inputs, context):  # the real shard stage, counted
        calls.append(1)
        return shard.run(config, inputs, context)

    config = ShardConfig(source=SourceConfig(kind="image_folder", path=str(tmp_path / "nope")))
    with pytest.raises(SourceError, match="nope: image folder does not exist") as info:
        _run_in_flow(stage_task("shard", counted_shard), config, StageContext(data_root=tmp_path))
    assert len(calls) == 1
    assert "shard.source.path" in info.value.hint


@pytest.mark.slow
def test_a_transient_fault_is_retried_and_the_second_try_succeeds(prefect_harness, tmp_path):
    from tasks.config import ShardConfig
    from tasks.stage import StageContext

    calls: list[int] = []
    stage = _counting_stage("flaky", [TransientError("lost the MLflow API")], calls, tmp_path)
    result = _run_in_flow(stage, ShardConfig(), StageContext(data_root=tmp_path))
    assert len(calls) == 2 and result.metrics == {"calls": 2.0}

    # A third-party fault counts too; a NaN loss (same seed, same divergence) does not.
    calls.clear()
    locked = sqlite3.OperationalError("database is locked")
    result = _run_in_flow(_counting_stage("locked", [locked], calls, tmp_path), ShardConfig(seed=1),
                          StageContext(data_root=tmp_path))
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(NonFiniteLossError):
        _run_in_flow(_counting_stage("diverged", [NonFiniteLossError("loss is nan at step 4")], calls, tmp_path),
                     ShardConfig(seed=2), StageContext(data_root=tmp_path))
    assert len(calls) == 1


# --- the CLI: one line, a fix, a log with the traceback ---------------------------------------------

def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=environment,
                           capture_output=True, text=True, timeout=600)


def _only_log(data_root: Path, command: str) -> str:
    logs = sorted((data_root / "logs").glob(f"*-{command}.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def test_a_bad_config_value_fails_in_one_line_with_a_fix_and_a_log(tmp_path):
    done = _cli(["run", "--preset", "smoke", "--data-root", str(tmp_path), "--set", "mae.mask_ratio=1.5"])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("patchflow: invalid config") and "mae.mask_ratio" in lines[0]
    assert lines[1].startswith("fix: ") and lines[2].startswith("details: ") and len(lines) == 3
    assert "Traceback" not in done.stderr + done.stdout
    log = _only_log(tmp_path, "run")
    assert lines[2] == f"details: {next((tmp_path / 'logs').iterdir())}"
    assert "Traceback (most recent call last)" in log and "tasks.config.ConfigError" in log


@pytest.mark.slow  # the query command imports faiss and torch: 5-30 s on a busy machine
def test_query_errors_take_the_same_path(tmp_path):
    done = _cli(["query", "--text", "a red heart", "--data-root", str(tmp_path)])
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == f"patchflow: no finished index under {tmp_path} (available: none)"
    assert done.stderr.splitlines()[1].startswith("fix: ") and "Traceback" not in done.stderr
    assert "SearchError" in _only_log(tmp_path, "query")


def test_an_unexpected_error_names_its_type_and_exits_1(tmp_path):
    # A preset file that is not UTF-8: reading it raises UnicodeDecodeError, which no code expects.
    (tmp_path / "odd.yaml").write_bytes(b"mae: {mask_ratio: 0.5}\n\xff\xfe")
    done = _cli(["config", "--preset", str(tmp_path / "odd.yaml"), "--data-root", str(tmp_path)])
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("patchflow: unexpected UnicodeDecodeError: ") and lines[1].startswith("details: ")
    assert len(lines) == 2 and "Traceback" not in done.stderr
    assert "UnicodeDecodeError" in _only_log(tmp_path, "config")


@pytest.mark.slow
def test_a_missing_source_inside_the_flow_fails_cleanly_and_is_not_retried(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    # The subprocess talks to the session's Prefect server instead of starting its own (15-50 s here).
    done = _cli(["run", "--preset", "smoke", "--data-root", str(tmp_path), "--set", "shard.source.kind=image_folder",
                 "--set", f"shard.source.path={tmp_path / 'nope'}"], env={"PREFECT_API_URL": PREFECT_API_URL.value()})
    assert done.returncode == 2, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith(("patchflow:", "fix:", "details:"))]
    assert ours[0] == f"patchflow: {tmp_path / 'nope'}: image folder does not exist"
    assert ours[1].startswith("fix: ") and "shard.source.path" in ours[1] and ours[2].startswith("details: ")
    assert "Traceback" not in done.stderr + done.stdout
    assert "Beginning flow run" in done.stderr  # Prefect's progress lines stay on the console
    assert "Retry 1/" not in done.stderr  # bad input: the stage ran once
    log = _only_log(tmp_path, "run")
    # Prefect's own failure records landed here with their tracebacks, and so did the CLI's.
    assert log.count("Traceback (most recent call last)") >= 2 and "prefect.flow_runs" in log
    assert "SourceError: " in log

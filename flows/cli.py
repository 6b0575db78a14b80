"""``patchflow`` command line: run the pipeline, show presets and configs, open the dashboards."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

from data_shards.errors import PatchflowError
from flows.environment import quiet_library_loggers
from flows.preflight import preflight
from tasks.config import STAGES, available_presets, load_config, resolve_data_root


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help=f"one of {available_presets()} or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set mae.train.steps=50 (repeatable)")
    parser.add_argument("--data-root", default=None, help="outputs go here (env PATCHFLOW_DATA_ROOT; default ./.patchflow)")


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.overrides, args.data_root)  # fail fast on a bad config
    # read-only/full root, another run on it, broken MLflow store, leftovers of a killed run; Ctrl-C
    preflight(config.data_root, wait_for_lock=args.wait)
    from flows.environment import prepare_environment

    prepare_environment(config.data_root)
    from flows.pipeline import pipeline  # imports Prefect: after the environment is set

    results = pipeline(preset=args.preset, overrides=args.overrides, data_root=config.data_root, rerun=args.rerun)
    from flows.headlines import headlines, text_table, wall_times

    print("\nOutputs (every metric is in each folder's manifest.json and in MLflow):")
    for name, result in results.items():
        print(f"  {name:14s} {result.output_dir}")
    rows = headlines(results)
    if rows:  # stages such as shard or mae_pretrain alone have no headline number
        print(f"\nWhat this run measured, each beside its baseline:\n{text_table(rows)}")
    print(f"\nWall time: {wall_times(results)}")
    print(f"\nMLflow UI:  patchflow ui --data-root {config.data_root}")
    _print_query_commands(results, config.data_root)
    return 0


def _status(args: argparse.Namespace) -> int:
    from flows.status import format_runs, recent_runs, runs_as_json

    root = resolve_data_root(args.data_root)
    runs = recent_runs(root, limit=args.n)
    print(runs_as_json(runs) if args.json else format_runs(runs, root))
    return 0


def _resume(args: argparse.Namespace) -> int:
    """Run a failed or killed run again with its exact preset and overrides: finished stages come
    back cached, and the stage that failed continues from its newest checkpoint."""
    from flows.status import find_run

    run = find_run(resolve_data_root(args.data_root), args.run)
    print(f"resuming run {run.short_id} ({run.status}, started {run.started}): --preset {run.preset} "
          + " ".join(f"--set {o}" for o in run.overrides))
    return _run(argparse.Namespace(preset=run.preset, overrides=run.overrides, data_root=run.data_root, rerun=[],
                                   wait=args.wait))


def _verify(args: argparse.Namespace) -> int:
    """One line per finished stage folder under the data root: ok, or what is damaged."""
    from tasks.verify import MANIFEST_NAME, verify_stage

    stages = resolve_data_root(args.data_root) / "stages"
    folders = sorted(f for f in stages.glob("*/*") if f.is_dir() and not f.name.startswith("."))
    finished = [f for f in folders if (f / MANIFEST_NAME).is_file()]
    damaged = 0
    for folder in finished:
        problems = verify_stage(folder)
        damaged += bool(problems)
        print(f"{folder.parent.name}/{folder.name}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
    unfinished = len(folders) - len(finished)
    print(f"{len(finished)} finished stage folder(s) under {stages}, {damaged} damaged"
          + (f"; {unfinished} unfinished (no manifest) not checked" if unfinished else "")
          + ("; `patchflow run` recomputes damaged stages" if damaged else ""))
    return 1 if damaged else 0


def _print_query_commands(results: dict, data_root: str) -> None:
    """The exact query and serve commands that work on the indexes this run built."""
    if "index" not in results:
        return
    root = f"--data-root {shlex.quote(str(data_root))}"
    summaries = results["index"].manifest()["outputs"]["targets"]
    for target in results["index"].manifest()["config"]["targets"]:
        example = summaries[target["name"]].get("example_text_query")
        if target["encoder"] != "clip" or example is None:
            continue
        if example["text"] is None:
            print(f"Text query: patchflow query --index {target['name']} --text TEXT -k 5 {root}   (none of "
                  f"{example['tried']} indexed captions found its own image in the top 5)")
            continue
        print(f"Text query: patchflow query --index {target['name']} --text {shlex.quote(example['text'])} -k 5 {root}"
              f"   (its image ranks #{example['rank']}; {example['recall_at_5']:.0%} of {example['tried']} indexed "
              f"captions find their own image in the top 5)")
    first = results["index"].manifest()["config"]["targets"][0]["name"]
    print(f"Image query: patchflow query --index {first} --image PATH.png -k 5 {root}")
    print(f"Search page and HTTP API: patchflow serve {root}   (then open http://127.0.0.1:8000)")


def _show_config(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.overrides, args.data_root)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from tasks.tracking import tracking_uri

    root = resolve_data_root(args.data_root)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(root),
               "--host", args.host, "--port", str(args.port)]
    print("starting:", " ".join(command))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.call(command, env=env)


def _read_query_image(path: str | None) -> bytes | None:
    from tasks.search import SearchError

    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SearchError(f"cannot read image {path}: {exc.strerror}") from None


def _save_grid(index, hits: list[dict], out: str) -> None:
    """The result thumbnails side by side (one row), best first."""
    import io

    from PIL import Image

    from tasks.search import thumbnail

    tiles = [Image.open(io.BytesIO(thumbnail(index, hit["key"])[0])).convert("RGB").resize((64, 64)) for hit in hits]
    grid = Image.new("RGB", (64 * max(len(tiles), 1), 64), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (64 * i, 0))
    grid.save(out)


def _query(args: argparse.Namespace) -> int:
    from tasks.search import open_index, search

    index = open_index(resolve_data_root(args.data_root), args.index)  # a SearchError fails in main()
    hits = search(index, text=args.text, image=_read_query_image(args.image), key=args.key, k=args.k)
    if args.grid:
        _save_grid(index, hits, args.grid)
    if args.json:
        print(json.dumps({"index": index.name, "results": hits}, indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>7}  {'key':24s}  {'label':>5}  caption")
    for hit in hits:
        print(f"{hit['rank']:>4}  {hit['score']:7.4f}  {hit['key']:24s}  {hit['label']:>5}  {hit['caption']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flows.serve import create_app

    uvicorn.run(create_app(resolve_data_root(args.data_root)), host=args.host, port=args.port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the whole pipeline (stages that finished before are reused)")
    _add_config_args(run)
    run.add_argument("--rerun", action="append", default=[], choices=STAGES, metavar="STAGE",
                     help=f"recompute this stage and every stage downstream of it, even if cached (repeatable; "
                          f"one of {', '.join(STAGES)})")
    run.add_argument("--wait", action="store_true",
                     help="if another run holds the data root, wait for it to finish instead of refusing")
    run.set_defaults(handler=_run)
    status = commands.add_parser("status", help="recent pipeline runs of the data root, stage by stage")
    status.add_argument("--data-root", default=None)
    status.add_argument("-n", type=int, default=5, help="how many runs, newest first (default 5)")
    status.add_argument("--json", action="store_true", help="print the runs as JSON")
    status.set_defaults(handler=_status)
    resume = commands.add_parser("resume", help="rerun a failed or killed run with its exact config "
                                                "(finished stages are reused, training continues from its checkpoint)")
    resume.add_argument("run", nargs="?", default=None,
                        help="the run id or its first characters, from `patchflow status` (default: the newest unfinished run)")
    resume.add_argument("--data-root", default=None)
    resume.add_argument("--wait", action="store_true", help="wait if another run holds the data root")
    resume.set_defaults(handler=_resume)
    show = commands.add_parser("config", help="print the validated config of a preset")
    _add_config_args(show)
    show.set_defaults(handler=_show_config)
    presets = commands.add_parser("presets", help="list the presets")
    presets.set_defaults(handler=lambda _: print("\n".join(available_presets())) or 0)
    verify = commands.add_parser("verify", help="check every finished stage's files against its manifest "
                                                "(exit 1 if any is damaged)")
    verify.add_argument("--data-root", default=None)
    verify.set_defaults(handler=_verify)
    ui = commands.add_parser("ui", help="open the MLflow UI on the data root's tracking store")
    ui.add_argument("--data-root", default=None)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler=_ui)
    query = commands.add_parser("query", help="nearest neighbours in a built index, by text, image or key")
    kind = query.add_mutually_exclusive_group(required=True)
    kind.add_argument("--text", help="a text query (CLIP indexes only)")
    kind.add_argument("--image", metavar="FILE", help="an image file to search with")
    kind.add_argument("--key", help="the key of an indexed sample to search with")
    query.add_argument("--index", default=None, metavar="NAME", help="index name (default: the newest finished index)")
    query.add_argument("-k", type=int, default=10, help="how many results (1..1000)")
    query.add_argument("--json", action="store_true", help="print the results as JSON")
    query.add_argument("--grid", default=None, metavar="OUT.png", help="also save the result thumbnails as one image")
    query.add_argument("--data-root", default=None)
    query.set_defaults(handler=_query)
    serve = commands.add_parser("serve", help="the search HTTP service and its page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-root", default=None)
    serve.set_defaults(handler=_serve)
    return parser


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Prefect's engine logs a failed task or flow run here, traceback included (exc_info).
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class CommandLog:
    """``<data_root>/logs/<UTC start time>-<command>.log``: the command's tracebacks, so the terminal
    shows one line per failure. The file is created on the first write only."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args, self.command_line = args, " ".join(["patchflow", *argv])
        self.name = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{args.command}.log"
        self.path: Path | None = None

    def write(self, text: str) -> Path:
        if self.path is None:
            self.path = _data_root(self.args) / "logs" / self.name
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(text.rstrip("\n") + "\n\n")
        return self.path


def _data_root(args: argparse.Namespace) -> Path:
    """The command's data root: the config's when it loads (a preset file may set one), else flag/env/default."""
    if hasattr(args, "preset"):
        with contextlib.suppress(Exception):  # the config may be what failed: finding the log must not fail too
            return Path(load_config(args.preset, args.overrides, args.data_root).data_root)
    return resolve_data_root(getattr(args, "data_root", None))


class _TracebackToLog(logging.Filter):
    """On Prefect's run loggers: a record's traceback goes to the command log, and the console shows
    the record's one-line message. The Prefect API handler (on these loggers, so it runs before the
    root's console handler) still gets the whole record for the Prefect UI."""

    def __init__(self, log: CommandLog) -> None:
        super().__init__()
        self.log, self.formatter = log, logging.Formatter(LOG_FORMAT)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not getattr(record, "patchflow_logged", False):
            try:
                self.log.write(self.formatter.format(record))
            except OSError:  # an unwritable data root: the console keeps the traceback then
                return True
            record.patchflow_logged = True
            # Prefect puts its console handler on the root logger when it is first imported, which is
            # after main() starts, so the console side is hooked up here, on the first such record.
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                        and not any(isinstance(f, _OneLineOnConsole) for f in handler.filters):
                    handler.addFilter(_OneLineOnConsole())
        return True


class _OneLineOnConsole(logging.Filter):
    """On console handlers: drop the traceback of a record whose traceback is in the command log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "patchflow_logged", False):
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _one_line(text: str) -> str:
    """A multi-line message (a config with several bad fields) as one line: ``first rest; rest``."""
    first, *rest = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    return f"{first} {'; '.join(rest)}".strip()


def _report_failure(exc: Exception, log: CommandLog) -> int:
    """One line for the user (plus the fix, when known); the traceback goes to the log.
    Exit status 2: bad input or another expected failure; 1: a bug or an unforeseen fault."""
    expected = isinstance(exc, PatchflowError)
    message = _one_line(str(exc)) if expected else f"unexpected {type(exc).__name__}: {_one_line(str(exc))}"
    print(f"patchflow: {message}", file=sys.stderr)
    if isinstance(exc, PatchflowError) and exc.hint:
        print(f"fix: {exc.hint}", file=sys.stderr)
    details = f"{log.command_line}\n" + "".join(traceback.format_exception(exc))
    try:
        print(f"details: {log.write(details)}", file=sys.stderr)
    except OSError as write_error:  # an unwritable data root must not hide the failure itself
        print(f"details: cannot write the log ({write_error}); the traceback follows\n{details}", file=sys.stderr)
    return 2 if expected else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_library_loggers()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    log = CommandLog(args, argv)
    to_log = _TracebackToLog(log)
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(to_log)
    try:
        status = args.handler(args)
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same short way
        return _report_failure(exc, log)
    finally:
        for name in PREFECT_RUN_LOGGERS:
            logging.getLogger(name).removeFilter(to_log)
    if log.path is not None:  # e.g. a stage failed and a retry got past it
        print(f"patchflow: tracebacks logged during the run are in {log.path}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

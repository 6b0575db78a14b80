"""``patchflow`` command line: run the pipeline, show presets and configs, open the dashboards."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from flows.preflight import preflight
from tasks.config import ConfigError, available_presets, load_config, resolve_data_root


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help=f"one of {available_presets()} or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set mae.train.steps=50 (repeatable)")
    parser.add_argument("--data-root", default=None, help="outputs go here (env PATCHFLOW_DATA_ROOT; default ./.patchflow)")


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.overrides, args.data_root)  # fail fast on a bad config
    preflight(config.data_root)  # read-only/full root, broken MLflow store, leftovers of a killed run; Ctrl-C
    from flows.environment import prepare_environment

    prepare_environment(config.data_root)
    from flows.pipeline import pipeline  # imports Prefect: after the environment is set

    results = pipeline(preset=args.preset, overrides=args.overrides, data_root=config.data_root)
    for name, result in results.items():
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
        print(f"{name:14s} {result.output_dir}\n{'':14s} {metrics}")
    print(f"\nMLflow UI:  patchflow ui --data-root {config.data_root}")
    _print_query_commands(results, config.data_root)
    return 0


def _print_query_commands(results: dict, data_root: str) -> None:
    """The exact query and serve commands that work on the indexes this run built."""
    if "index" not in results:
        return
    root = f"--data-root {data_root}"
    for target in results["index"].manifest()["config"]["targets"]:
        if target["encoder"] == "clip":
            print(f"Text query: patchflow query --index {target['name']} --text 'a red heart' -k 5 {root}")
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
    from tasks.search import SearchError, open_index, search

    try:
        index = open_index(resolve_data_root(args.data_root), args.index)
        hits = search(index, text=args.text, image=_read_query_image(args.image), key=args.key, k=args.k)
        if args.grid:
            _save_grid(index, hits, args.grid)
    except SearchError as exc:
        print(f"patchflow query: {exc}", file=sys.stderr)
        return 2
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
    run.set_defaults(handler=_run)
    show = commands.add_parser("config", help="print the validated config of a preset")
    _add_config_args(show)
    show.set_defaults(handler=_show_config)
    presets = commands.add_parser("presets", help="list the presets")
    presets.set_defaults(handler=lambda _: print("\n".join(available_presets())) or 0)
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"patchflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

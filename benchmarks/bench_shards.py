"""Throughput of the shard stage (writing) and of the shard loader (reading) on Fashion-MNIST.

1. ``tasks.shard.run`` with workers=1 and workers=2, each into a fresh data root (no reuse). The stage
   time includes reading the IDX files, encoding, tar writing, sha256 and MLflow logging, so
   ``writer.encode_all`` (the only part that uses the pool) is also timed on its own.
2. ``loader.epoch_loader`` over the train split for num_workers 0 (in-process), 1 and 2: one epoch each.
3. ``loader.iterate_tar`` over the same shards without decoding: the ceiling the loader can reach.
   Every way of reading runs twice, on the disk and through ``python -m http.server`` on a loopback
   port (its own process): what reading shards by URL costs. Loader rows stream (the decoded cache off),
   then the decoded cache's first and second epochs are timed on their own.

    python benchmarks/bench_shards.py --samples 20000 --samples-per-shard 2000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from mlflow.tracking import MlflowClient  # noqa: E402

from data_shards import loader  # noqa: E402
from data_shards.loader import LoaderSpec, epoch_loader, iterate_tar, split_shards  # noqa: E402
from data_shards.sources import open_source  # noqa: E402
from data_shards.writer import encode_all  # noqa: E402
from tasks import shard  # noqa: E402
from tasks.config import ShardConfig, SourceConfig  # noqa: E402
from tasks.stage import StageContext  # noqa: E402
from tasks.tracking import EXPERIMENT_NAME  # noqa: E402


def default_data_dir() -> Path:
    """Same rule as tests._shared_data.shared_data_dir (not imported: that module needs pytest)."""
    override = os.environ.get("PATCHFLOW_SHARED_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def setup_tracking(base: Path) -> None:
    """One SQLite store for both stage runs, created here so neither timed run pays for the schema.

    The experiment is pre-created with its artifact folder under ``base``: with MLFLOW_TRACKING_URI set,
    configure_tracking would otherwise leave artifacts in ./mlruns of the current directory.
    """
    uri = f"sqlite:///{base / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    MlflowClient(uri).create_experiment(EXPERIMENT_NAME, artifact_location=(base / "mlartifacts").as_uri())


def time_stage(config: ShardConfig, data_root: Path) -> tuple[float, int, float, Path]:
    """Seconds, samples written (all splits), the stage's own read+encode seconds, and the manifest."""
    started = time.perf_counter()
    result = shard.run(config, [], StageContext(data_root=data_root))
    seconds = time.perf_counter() - started
    manifest = Path(result.manifest_path)
    outputs = json.loads(manifest.read_text())
    total = sum(info["num_samples"] for info in outputs["outputs"]["splits"].values())
    return seconds, total, outputs["metrics"]["encode_seconds"], manifest


def time_loader(shards: tuple[str, ...], batch_size: int, workers: int) -> tuple[float, int]:
    """Seconds and decoded samples for one shuffled epoch (worker start-up included, as in training)."""
    spec = LoaderSpec(shard_paths=shards, batch_size=batch_size, num_workers=workers, shuffle=True, shuffle_buffer=1000)
    started, count = time.perf_counter(), 0
    for batch in epoch_loader(spec, epoch=0):
        count += batch["image"].shape[0]
    return time.perf_counter() - started, count


def time_raw(shards: tuple[str, ...]) -> tuple[float, int]:
    started = time.perf_counter()
    count = sum(1 for path in shards for _ in iterate_tar(path))
    return time.perf_counter() - started, count


def serve_folder(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` over ``folder`` on a free loopback port; returns it and its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.1)


def reading_rows(shards: tuple[str, ...], batch_size: int) -> dict[str, float]:
    """Each way of reading the train split, from the disk and from a loopback HTTP server (its own
    process), with the decoded cache off (streamed, as a dataset larger than the cache is read);
    then the cache's first epoch (decoding) and second (memory) on the disk shards."""
    server, url = serve_folder(Path(shards[0]).parent)
    urls = tuple(f"{url}/{Path(path).name}" for path in shards)
    rates: dict[str, float] = {}
    budget, loader.DECODED_CACHE.budget_bytes = loader.DECODED_CACHE.budget_bytes, 0
    try:
        print(f"\nreading the train split ({len(shards)} shards, batch {batch_size}): disk, and HTTP from {url}")
        ways = [("raw", "iterate_tar, no decoding", time_raw)] + [
            (f"load{w}", f"streamed, num_workers={w}", lambda paths, w=w: time_loader(paths, batch_size, w)) for w in (0, 1, 2)]
        for key, name, run in ways:
            rates[key] = row(f"{name}, disk", *run(shards))
            rates[f"{key}_http"] = row(f"{name}, HTTP", *run(urls))
    finally:
        loader.DECODED_CACHE.budget_bytes = budget
        server.terminate()
        server.wait()
    rates["cache1"] = row("decoded cache, first epoch (decodes)", *time_loader(shards, batch_size, 0))
    rates["cache2"] = row("decoded cache, second epoch", *time_loader(shards, batch_size, 0))
    return rates


def row(name: str, seconds: float, samples: int) -> float:
    rate = samples / max(seconds, 1e-9)
    print(f"  {name:<38} {samples:>7d} {seconds:>8.2f} s {rate:>11,.0f} /s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="shared data folder")
    parser.add_argument("--samples", type=int, default=20000, help="Fashion-MNIST train samples")
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="keep outputs here (default: temp dir, deleted)")
    args = parser.parse_args()

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench_shards-", dir=args.out)).resolve()
    print(f"cores: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  torch {torch.__version__}  out: {base}")
    try:
        setup_tracking(base)
        # Small val/test so the table is about the train split (below POOL_THRESHOLD they never use the pool).
        small = max(1, args.samples // 20)
        source = SourceConfig(kind="fashion_mnist", path=str(args.data / "fashion-mnist"),
                              max_train=args.samples, max_val=small, max_test=small)

        print("\nshard writing                             samples     time        rate")
        rates, manifest = {}, None
        for workers in (1, 2):
            config = ShardConfig(source=source, samples_per_shard=args.samples_per_shard, workers=workers)
            seconds, total, encode, manifest = time_stage(config, base / f"root-w{workers}")
            rates[f"stage{workers}"] = row(f"shard stage, workers={workers} (all splits)", seconds, total)
            print(f"    read+encode {encode:.2f} s, write+describe+MLflow {seconds - encode:.2f} s")
        train = open_source(source, base, seed=0).splits["train"]
        for workers in (1, 2):
            started = time.perf_counter()
            encode_all(train, workers)
            rates[f"enc{workers}"] = row(f"encode_all train, workers={workers}", time.perf_counter() - started, len(train))

        rates.update(reading_rows(split_shards(manifest, "train"), args.batch_size))

        print("\nratios")
        print(f"  shard stage   workers 2 / 1        {rates['stage2'] / rates['stage1']:.2f}x")
        print(f"  encode_all    workers 2 / 1        {rates['enc2'] / rates['enc1']:.2f}x")
        for key, name in [("raw", "iterate_tar"), ("load0", "streamed, 0 workers"), ("load1", "streamed, 1 worker"),
                          ("load2", "streamed, 2 workers")]:
            print(f"  HTTP / disk   {name:<22} {rates[key + '_http'] / rates[key]:.2f}")
        print(f"  streamed      2 workers / 1        {rates['load2'] / rates['load1']:.2f}x")
        print(f"  streamed      1 worker / raw       {rates['load1'] / rates['raw']:.3f}")
        print(f"  cached        second epoch / streamed in-process {rates['cache2'] / rates['load0']:.1f}x")
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

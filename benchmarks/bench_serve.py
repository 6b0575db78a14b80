"""HTTP latency and throughput of ``patchflow serve`` under concurrent clients on loopback.

Builds a 100k-vector index folder the way the `index` stage lays it out (synthetic clustered 128-d
unit vectors, the stage's own factory choice and recall tuning, ``index_meta``), starts the real CLI
(``patchflow serve``) on a free loopback port, and drives ``POST /search`` by key with ``--clients``
threads, each on its own keep-alive connection, for ``--requests`` requests or ``--seconds``, whichever
comes first. Prints p50/p90/p99/max latency and requests/s, one client alone and then all together.
A key query skips the encoder, so this measures the service and the index; ``--data-root`` adds the
same run against a real data root's indexes (text queries on a CLIP index run the text tower too).
The goal: p99 under 20 ms at 100k vectors.

    .venv/bin/python benchmarks/bench_serve.py
    .venv/bin/python benchmarks/bench_serve.py --vectors 100000 --clients 8 --data-root .patchflow
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_shards.atomic import write_json_atomic  # noqa: E402
from tasks.config import IndexConfig, IndexTarget  # noqa: E402
from tasks.index import build_index, choose_factory, index_meta, set_param, tune, write_index_atomic  # noqa: E402
from tasks.stage import stage_output_dir, write_manifest  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_index import mixture  # noqa: E402

SHARD_ROWS = 10_000


def synthetic_index(data_root: Path, vectors: int, dim: int) -> list[str]:
    """An index stage folder over ``vectors`` synthetic unit vectors; returns the keys."""
    target = IndexTarget(name="synthetic", dataset="images", encoder="mae")
    config = IndexConfig(targets=[target])
    output_dir = stage_output_dir(data_root, "index", config, [])
    embeddings = output_dir / target.name / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    data = mixture(vectors, dim, clusters=max(1, vectors // 100), spread=0.6, seed=1)
    rows = []
    for start in range(0, vectors, SHARD_ROWS):
        shard = f"synthetic-{start // SHARD_ROWS:06d}.tar"
        np.save(embeddings / Path(shard).with_suffix(".npy").name, data[start:start + SHARD_ROWS])
        rows += [{"key": f"s{i:07d}", "caption": f"vector {i}", "label": i % 10, "shard": shard, "row": i - start,
                  "member": f"s{i:07d}.png", "ext": "png", "offset": 0, "size": 0}
                 for i in range(start, min(vectors, start + SHARD_ROWS))]
    factory = choose_factory(vectors, dim, config.memory_budget_mb)
    index = build_index(data, factory)
    tuning = tune(index, data, config.target_recall, config.recall_queries)
    set_param(index, tuning["param"], tuning["value"])
    write_index_atomic(index, output_dir / f"{target.name}.faiss")
    encoder = {"kind": "synthetic", "note": "bench_serve: key queries only"}
    write_json_atomic(output_dir / f"{target.name}.meta.json",
                      index_meta(target, encoder, factory, tuning, rows, dim, Path("none")))
    write_manifest(output_dir, "index", config, [], {"targets": {target.name: {"factory": factory}}}, {}, None)
    print(f"index: {factory} over {vectors:,} × {dim}, {tuning['param']}={tuning['value']}, "
          f"recall@10 {tuning['recall_at_10']:.3f} (self-queries)")
    return [row["key"] for row in rows]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(data_root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "--data-root", str(data_root), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"patchflow serve did not answer on {url} within 120 s")


def drive(url: str, bodies: list[dict], clients: int, requests: int, seconds: float) -> np.ndarray:
    """Latencies (s) of ``requests`` POST /search calls spread over ``clients`` threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    counter = iter(range(requests))

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                with lock:
                    if next(counter, None) is None:
                        return
                body = bodies[rng.integers(len(bodies))]
                start = time.perf_counter()
                response = http.post("/search", json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise SystemExit(f"POST /search {body} -> {response.status_code} {response.text}")
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.array(latencies)


def report(label: str, url: str, bodies: list[dict], clients: int, requests: int, seconds: float) -> None:
    drive(url, bodies, clients, min(200, requests), seconds)  # warm-up: connections, caches, lazy loads
    start = time.perf_counter()
    latencies = drive(url, bodies, clients, requests, seconds) * 1e3
    wall = time.perf_counter() - start
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    print(f"  {label:40s} {clients:>3d} clients {len(latencies):>6d} requests  p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  "
          f"p99 {p99:6.2f} ms  max {latencies.max():7.2f} ms  {len(latencies) / wall:7.0f} req/s")


def bench(data_root: Path, bodies_by_label: dict[str, list[dict]], args: argparse.Namespace) -> None:
    process, url = start_service(data_root)
    try:
        indexes = httpx.get(f"{url}/indexes").json()
        print(f"service {url}: " + ", ".join(f"{i['name']} ({i['count']:,} × {i['dim']}, {i['factory']})" for i in indexes))
        for label, bodies in bodies_by_label.items():
            report(label, url, bodies, 1, args.requests // 4, args.seconds)
            report(label, url, bodies, args.clients, args.requests, args.seconds)
    finally:
        process.terminate()
        process.wait(timeout=30)


def real_bodies(data_root: Path) -> dict[str, list[dict]]:
    """Key queries on every index of a real data root, and text queries on its CLIP indexes."""
    from tasks.search import list_indexes, open_index

    bodies: dict[str, list[dict]] = {}
    for name in list_indexes(data_root):
        index = open_index(data_root, name)
        keys = [item["key"] for item in index.meta["items"]]
        bodies[f"{name}: key, k=10"] = [{"index": name, "key": key, "k": 10} for key in keys[:2000]]
        if index.encoder == "clip":
            captions = sorted({item["caption"].split("\n")[0] for item in index.meta["items"]})[:500]
            bodies[f"{name}: text (CLIP text tower), k=10"] = [{"index": name, "text": c, "k": 10} for c in captions]
    return bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4000, help="per measurement, at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="per measurement, at most")
    parser.add_argument("--data-root", type=Path, default=None, help="also benchmark a real data root's indexes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        keys = synthetic_index(Path(tmp), args.vectors, args.dim)
        rng = np.random.default_rng(0)
        bodies = [{"index": "synthetic", "key": keys[i], "k": 10} for i in rng.choice(len(keys), 5000, replace=False)]
        bench(Path(tmp), {f"synthetic {args.vectors:,}: key, k=10": bodies}, args)
    if args.data_root is not None:
        bench(args.data_root.resolve(), real_bodies(args.data_root.resolve()), args)


if __name__ == "__main__":
    main()

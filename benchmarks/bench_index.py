"""Recall@10 against queries per second for the index types the `index` stage chooses between.

Two vector sets:

* **synthetic** (default 1M × 128-d): a mixture of Gaussians (``--clusters`` centres, each point its
  centre plus isotropic noise), L2-normalised as the stage stores embeddings. Uniform random vectors
  would be the one case no ANN index helps (every point is nearly equidistant from every other);
  real embeddings are clustered, and so is this set. Queries are fresh draws, not indexed points.
* **real** (``--data-root``): the embeddings an `index` stage wrote (``<target>/embeddings/*.npy``);
  queries are a held-out tenth of them.

For each index type (exact ``Flat``, ``HNSW32``, the stage's in-budget choice ``IVF{4·√N},Flat``, its
over-budget choices ``IVF{4·√N},SQ8`` and ``IVF{4·√N},PQ{d/4}np``, PQ with re-ranking of 4k candidates
on an 8-bit copy, and on request ``OPQ…,IVF…,PQ…``, which ``index.factory`` can ask for) it prints build time,
bytes, and recall@10 against exact search with QPS at each value of the search knob, then the
cheapest setting reaching ``--target`` recall and its speed-up over exact search. The goal:
recall@10 ≥ 0.95 at ≥ 20× exact QPS on the 1M set. Uses the stage's own functions
(``build_index``, ``search_knobs``, ``set_param``, ``recall_at_k``).

    .venv/bin/python benchmarks/bench_index.py                      # 1M synthetic
    .venv/bin/python benchmarks/bench_index.py --n 100000 --data-root .patchflow
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.index import RECALL_K, build_index, l2_normalise, recall_at_k, search_knobs, set_param  # noqa: E402


REFINE_K_FACTOR = 4


def mixture(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres, generated in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        which = rng.integers(0, clusters, stop - start)
        out[start:stop] = centres[which] + spread * rng.standard_normal((stop - start, dim), dtype=np.float32)
    return l2_normalise(out)


def real_embeddings(data_root: Path) -> dict[str, np.ndarray]:
    """Every index target's stored embeddings under the data root, by target name (newest run wins)."""
    found: dict[str, np.ndarray] = {}
    manifests = sorted((data_root / "stages" / "index").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    for manifest in manifests:
        for name in json.loads(manifest.read_text())["outputs"].get("targets", {}):
            files = sorted((manifest.parent / name / "embeddings").glob("*.npy"))
            if files:
                found[name] = l2_normalise(np.concatenate([np.load(f) for f in files]))
    return found


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Ids of the top ``k`` and the best QPS of ``repeats`` passes (the first pass also warms caches)."""
    best, ids = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / best


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


def sweep(name: str, factory: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, exact_qps: float,
          target: float) -> dict:
    start = time.perf_counter()
    index = build_index(base, factory)
    build_s = time.perf_counter() - start
    size = index_bytes(index)
    param, values = search_knobs(index)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTOR  # re-rank 4k PQ candidates on the 8-bit copy
    print(f"\n{name}: {factory}  build {build_s:.1f} s  {size / 2**20:.1f} MiB")
    best = None
    for value in values or [None]:
        set_param(index, param, value)
        ids, qps = timed_search(index, queries, RECALL_K)
        recall = recall_at_k(ids, truth)
        print(f"  {param or '-':>8}={value if value is not None else '-':<5} recall@10 {recall:.4f}  "
              f"{qps:10.0f} QPS  ({qps / exact_qps:6.1f}x exact)")
        if recall >= target and best is None:
            best = {"param": param, "value": value, "recall": recall, "qps": qps}
        if recall >= 0.999:
            break
    return {"name": name, "factory": factory, "build_s": build_s, "bytes": size, "best": best}


def run_set(label: str, base: np.ndarray, queries: np.ndarray, target: float, kinds: list[str]) -> list[dict]:
    n, dim = base.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in (32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim // 4 or m == 1)
    factories = {"flat": ("Flat", "Flat"), "hnsw": ("HNSW", "HNSW32"), "ivf": ("IVF-Flat", f"IVF{nlist},Flat"),
                 "sq8": ("IVF-SQ8", f"IVF{nlist},SQ8"), "ivfpq": ("IVF-PQ", f"IVF{nlist},PQ{m}np"),
                 "ivfpq-refine": ("IVF-PQ + SQ8 re-rank", f"IVF{nlist},PQ{m}np,Refine(SQ8)"),
                 "opq": ("OPQ-IVF-PQ", f"OPQ{m}_{m * 4},IVF{nlist},PQ{m}np")}
    print(f"\n=== {label}: {n:,} vectors × {dim}, {len(queries):,} held-out queries, target recall@10 {target}")
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    truth, exact_qps = timed_search(exact, queries, RECALL_K)
    print(f"exact (Flat) search: {exact_qps:.0f} QPS, {index_bytes(exact) / 2**20:.1f} MiB, {faiss.omp_get_max_threads()} threads")
    rows = [{"name": "Flat", "factory": "Flat", "build_s": 0.0, "bytes": index_bytes(exact),
             "best": {"param": None, "value": None, "recall": 1.0, "qps": exact_qps}}]
    del exact
    for kind in kinds:
        if kind != "flat":
            rows.append(sweep(*factories[kind], base, queries, truth, exact_qps, target))
    print(f"\n{label}: cheapest setting reaching recall@10 ≥ {target}")
    print(f"  {'index':18s} {'factory':34s} {'setting':>14s} {'recall':>7s} {'QPS':>10s} {'vs exact':>9s} {'MiB':>8s} {'build s':>8s}")
    for row in rows:
        best = row["best"]
        setting = "-" if best is None or best["param"] is None else f"{best['param']}={best['value']}"
        if best is None:
            print(f"  {row['name']:18s} {row['factory']:34s} {'not reached':>14s}")
            continue
        print(f"  {row['name']:18s} {row['factory']:34s} {setting:>14s} {best['recall']:7.4f} {best['qps']:10.0f} "
              f"{best['qps'] / exact_qps:8.1f}x {row['bytes'] / 2**20:8.1f} {row['build_s']:8.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (0 skips the synthetic set)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=0.6, help="noise std relative to unit-variance centres")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--kinds", default="flat,hnsw,ivf,sq8,ivfpq,ivfpq-refine",
                        help="also: opq (an index.factory option; its rotation trains for minutes on 2 cores)")
    parser.add_argument("--data-root", type=Path, default=None, help="also benchmark this data root's index embeddings")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if args.n:
        start = time.perf_counter()
        both = mixture(args.n + args.queries, args.dim, args.clusters, args.spread, seed=0)
        print(f"generated {args.n:,} + {args.queries:,} synthetic vectors in {time.perf_counter() - start:.1f} s")
        run_set("synthetic", both[:args.n], both[args.n:], args.target, kinds)
        del both
    if args.data_root is not None:
        for name, vectors in real_embeddings(args.data_root).items():
            rng = np.random.default_rng(0)
            held_out = rng.random(len(vectors)) < 0.1
            run_set(f"real: {name}", vectors[~held_out], vectors[held_out], args.target, kinds)


if __name__ == "__main__":
    main()

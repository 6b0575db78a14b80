"""The index stage: embed a dataset split with a trained encoder and build a tuned FAISS index on it.

For each target of ``IndexConfig.targets``:

1. embed the split shard by shard (MAE: mean patch token after the final LayerNorm, through
   ``tasks.features.extract_features``; CLIP: ``encode_image``), L2-normalised float32, each shard's
   vectors and rows written atomically as ``<name>/embeddings/<shard>.npy`` / ``.json`` — a killed
   run re-embeds only the shards whose files are missing;
2. choose an index autofaiss-style (or take ``factory``): Flat below 1k vectors, HNSW32 below 10k,
   ``IVF{4·√N},Flat`` beyond; when float32 vectors would exceed ``memory_budget_mb``, 8-bit scalar
   quantisation (``IVF,SQ8``, a quarter of the bytes) and beyond that product quantisation
   (``IVF,PQ{m}np`` with the widest ``m`` that fits); inner product on unit vectors, i.e. cosine;
3. raise nprobe / efSearch until recall@10 against exact search on a sample of the vectors used as
   queries reaches ``target_recall``; measure QPS and the serialised size;
4. write ``<name>.faiss`` (temp file, then rename) and ``<name>.meta.json`` (id → key, caption, label,
   shard and the image member's byte range, so a thumbnail is one seek, plus how to rebuild the
   encoder for queries), then the manifest last.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import faiss
import numpy as np
import torch

from data_shards import remote
from data_shards.progress import progress
from data_shards.errors import BadInputError
from data_shards.atomic import write_bytes_atomic, write_json_atomic
from data_shards.loader import IMAGE_EXTS, LoaderSpec, evaluation_batches, split_shards
from tasks import tracking
from tasks.config import IndexConfig, IndexTarget
from tasks.devices import stage_device
from tasks.features import extract_features
from tasks.finetune import build_encoder, load_encoder_weights
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import stage_run

STAGE = "index"
ENCODER_STAGES = {"mae": "mae_pretrain", "clip": "clip_train"}
META_FORMAT = "patchflow-index/1"
RECALL_K = 10
FLAT_BELOW = 1_000
HNSW_BELOW = 10_000
TRAIN_PER_LIST = 64  # k-means wants >= ~39 points per centroid; 64 keeps training quick
MIN_PER_LIST = 39
ID_BYTES = 8  # an inverted list stores an int64 id beside each code
log = logging.getLogger("patchflow.index")


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


# --------------------------------------------------------------------------- encoders


@dataclass
class Embedder:
    """A trained encoder, the input geometry its images need, and (CLIP) its text tower."""

    kind: str
    model: torch.nn.Module
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenizer: Any = None
    device: str = "cpu"

    def spec(self, shard_paths: tuple[str, ...], batch_size: int = 256) -> LoaderSpec:
        return LoaderSpec(shard_paths=shard_paths, batch_size=batch_size, shuffle=False, image_size=self.image_size,
                          channels=self.channels, mean=self.mean, std=self.std)

    @torch.no_grad()
    def embed_batches(self, batches: Iterable[dict[str, Any]]) -> np.ndarray:
        """(N, D) unit float32 vectors for normalised image batches."""
        if self.kind == "mae":
            return l2_normalise(extract_features(self.model, batches, device=self.device, pools=("avg",))["avg"])
        chunks = [self.model.encode_image(torch.as_tensor(b["image"]).to(self.device)).float().cpu().numpy()
                  for b in batches]
        if not chunks:
            raise ValueError("no images to embed")
        return l2_normalise(np.concatenate(chunks))

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        if self.kind != "clip":
            raise ValueError(f"text queries need a CLIP index; this index is embedded by the {self.kind} encoder")
        tokens = self.tokenizer.encode(texts).to(self.device)
        return l2_normalise(self.model.encode_text(tokens).float().cpu().numpy())


def encoder_record(kind: str, result: StageResult, data_root: Path) -> dict[str, Any]:
    """What rebuilds the encoder later (paths relative to the data root, so the root can move)."""
    outputs = result.manifest()["outputs"]
    folder = Path(result.output_dir).resolve().relative_to(Path(data_root).resolve())
    if kind == "mae":
        return {"kind": "mae", "weights": str(folder / outputs["encoder"]["path"]), "architecture": outputs["architecture"],
                "normalization": outputs["normalization"], "manifest_digest": result.digest}
    return {"kind": "clip", "weights": str(folder / outputs["model"]["path"]), "image": outputs["image"],
            "manifest_digest": result.digest}


def load_embedder(record: dict[str, Any], data_root: Path, device: str = "cpu") -> Embedder:
    """Rebuild the encoder of ``encoder_record`` (MAE: strictly, through the evaluation helpers)."""
    weights = Path(data_root) / record["weights"]
    if not weights.is_file():
        raise BadInputError(f"encoder weights {weights} are missing")
    if record["kind"] == "mae":
        arch, norm = record["architecture"], record["normalization"]
        model = build_encoder(arch)
        load_encoder_weights(model, weights)
        return Embedder("mae", model.to(device).eval(), arch["image_size"], arch["in_chans"], tuple(norm["mean"]),
                        tuple(norm["std"]), device=device)
    from models.clip import load_clip

    model, tokenizer, _ = load_clip(weights)
    image = record["image"]
    return Embedder("clip", model.to(device).eval(), image["image_size"], image["channels"], tuple(image["mean"]),
                    tuple(image["std"]), tokenizer=tokenizer, device=device)


# --------------------------------------------------------------------------- embedding


def image_members(shard: str) -> dict[str, dict[str, Any]]:
    """key → the image member's name, extension and byte range in the (uncompressed) tar, at a path or URL."""
    members: dict[str, dict[str, Any]] = {}
    with remote.open_stream(shard) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if info.isfile() and ext in IMAGE_EXTS and key not in members:
                members[key] = {"member": info.name, "ext": ext, "offset": info.offset_data, "size": info.size}
    return members


def _recording(batches: Iterable[dict[str, Any]], rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        labels = batch["label"].tolist()
        rows.extend({"key": k, "caption": c.split("\n")[0], "label": int(l)}
                    for k, c, l in zip(batch["key"], batch["caption"], labels))
        yield batch


def embed_shard(embedder: Embedder, shard: str, out_dir: Path, batch_size: int) -> int:
    """Embed one shard (a path or URL) into ``out_dir/<shard>.npy`` (+ ``.json`` rows); the array is written last."""
    rows: list[dict[str, Any]] = []
    vectors = embedder.embed_batches(_recording(evaluation_batches(embedder.spec((shard,), batch_size)), rows))
    members = image_members(shard)
    for row in rows:
        row |= members[row["key"]]
    stem = out_dir / remote.file_name(shard)
    write_json_atomic(stem.with_suffix(".json"), rows)
    buffer = _npy_bytes(vectors)
    write_bytes_atomic(stem.with_suffix(".npy"), buffer)
    return len(rows)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    handle = io.BytesIO()
    np.save(handle, array, allow_pickle=False)
    return handle.getvalue()


def embed_split(embedder: Embedder, shards: tuple[str, ...], out_dir: Path, batch_size: int
                ) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """Every shard's vectors and rows, embedding only shards without finished files; also the names embedded now."""
    out_dir.mkdir(parents=True, exist_ok=True)
    embedded_now: list[str] = []
    vectors, rows = [], []
    for shard in progress(shards, f"index: embedding {out_dir.name}", len(shards)):
        name = remote.file_name(shard)
        stem = out_dir / name
        if not (stem.with_suffix(".npy").is_file() and stem.with_suffix(".json").is_file()):
            count = embed_shard(embedder, shard, out_dir, batch_size)
            embedded_now.append(name)
            log.info("index: embedded %s (%d images)", name, count)
        shard_rows = json.loads(stem.with_suffix(".json").read_text())
        shard_vectors = np.load(stem.with_suffix(".npy"), allow_pickle=False)
        if len(shard_rows) != len(shard_vectors):
            raise ValueError(f"{stem}: {len(shard_vectors)} vectors but {len(shard_rows)} rows")
        for i, row in enumerate(shard_rows):
            row["shard"] = name
            row["row"] = i
        vectors.append(shard_vectors)
        rows.extend(shard_rows)
    if not rows:
        raise BadInputError(f"{out_dir}: the split has no images to index")
    return np.concatenate(vectors), rows, embedded_now


# --------------------------------------------------------------------------- index choice and tuning


def choose_factory(n: int, dim: int, memory_budget_mb: float) -> str:
    """autofaiss-style choice by size and memory budget.

    Over budget, SQ8 keeps recall near exact search at a quarter of the bytes; PQ goes further at a
    recall cost that ``tune`` measures and reports. ``np`` turns off polysemous training, which
    nothing here uses and which cost 257 s of a 260 s PQ16 build on 3k vectors (3.5 s without).
    OPQ is left to ``index.factory``: on 3k clustered 32-d vectors it trained 8x longer than PQ
    and lowered recall@10 (0.82 against 0.90).
    """
    if n < FLAT_BELOW:
        return "Flat"
    nlist = max(1, min(int(4 * math.sqrt(n)), n // MIN_PER_LIST))
    codes = memory_budget_mb * 2**20 / n - ID_BYTES  # bytes per vector left for its code
    if dim * 4 <= codes:
        return "HNSW32" if n < HNSW_BELOW else f"IVF{nlist},Flat"
    if dim <= codes:
        return f"IVF{nlist},SQ8"
    m = next((m for m in range(dim // 2, 0, -1) if dim % m == 0 and m <= codes), 1)
    return f"IVF{nlist},PQ{m}np"


def _nlist(index: faiss.Index) -> int | None:
    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return None


def build_index(vectors: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        nlist = _nlist(index) or 1
        rng = np.random.default_rng(seed)
        sample = min(len(vectors), max(nlist * TRAIN_PER_LIST, 1000))
        train = vectors[np.sort(rng.choice(len(vectors), sample, replace=False))]
        if nlist > 1 and len(train) < nlist * MIN_PER_LIST:
            log.warning("index: %d training points for %d lists (< %d per list)", len(train), nlist, MIN_PER_LIST)
        index.train(train)
    index.add(vectors)
    return index


def search_knobs(index: faiss.Index) -> tuple[str | None, list[int]]:
    """The parameter that trades speed for recall, and the values to try in increasing order."""
    nlist = _nlist(index)
    if nlist is not None:
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v < nlist] + [nlist]
        return "nprobe", values
    if "HNSW" in type(faiss.downcast_index(index)).__name__:
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None, []


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def set_param(index: faiss.Index, name: str | None, value: int | None) -> None:
    if name is not None and value is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


def tune(index: faiss.Index, vectors: np.ndarray, target: float, queries: int, seed: int = 0) -> dict[str, Any]:
    """Raise the knob until recall@10 vs exact search reaches ``target``; recall, QPS and the knob chosen."""
    rng = np.random.default_rng(seed + 1)
    q = vectors[rng.choice(len(vectors), min(queries, len(vectors)), replace=False)]
    k = min(RECALL_K, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(q, k)
    name, values = search_knobs(index)
    tried: list[dict[str, float]] = []
    for value in values or [None]:
        set_param(index, name, value)
        start = time.perf_counter()
        _, found = index.search(q, k)
        elapsed = time.perf_counter() - start
        recall = recall_at_k(found, truth, k)
        tried.append({"value": value, "recall": recall, "qps": len(q) / max(elapsed, 1e-9)})
        if recall >= target:
            break
    best = tried[-1]
    if best["recall"] < target:
        log.warning("index: recall@10 %.4f stays below the target %.3f at %s=%s", best["recall"], target, name, best["value"])
    return {"param": name, "value": best["value"], "recall_at_10": best["recall"], "qps": best["qps"],
            "queries": len(q), "tried": tried, "target_met": best["recall"] >= target}


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    # Serialised in memory first: faiss.write_index reports a full disk as a RuntimeError with only
    # the errno's text, while an OSError through write_bytes_atomic becomes DiskFullError with sizes.
    write_bytes_atomic(path, faiss.serialize_index(index).tobytes())


# --------------------------------------------------------------------------- the stage


def _inputs_by_role(inputs: list[StageResult], context: StageContext) -> tuple[dict[str, StageResult], dict[str, StageResult]]:
    """Datasets by name (``context.extra["index_datasets"]``: name → shard digest) and encoders by kind."""
    roles: dict[str, str] = context.extra.get("index_datasets", {})
    shards = {r.digest: r for r in inputs if r.stage == "shard"}
    datasets = {name: shards[digest] for name, digest in roles.items() if digest in shards}
    if not roles and len(shards) == 1:
        datasets = {"images": next(iter(shards.values()))}
    encoders = {kind: r for kind, stage in ENCODER_STAGES.items() for r in inputs if r.stage == stage}
    return datasets, encoders


ITEM_FIELDS = ("key", "caption", "label", "shard", "row", "member", "ext", "offset", "size")


def index_meta(target: IndexTarget, encoder: dict[str, Any], factory: str, tuning: dict[str, Any],
               rows: list[dict[str, Any]], dim: int, shard_dir: Path | str) -> dict[str, Any]:
    """``<name>.meta.json``: what ``tasks.search.open_index`` needs to answer queries on the index."""
    return {
        "format": META_FORMAT, "name": target.name, "dataset": target.dataset, "split": target.split,
        "encoder": encoder, "factory": factory, "metric": "inner_product", "dim": dim,
        "count": len(rows), "search_param": {"name": tuning["param"], "value": tuning["value"]},
        "shard_dir": str(shard_dir), "embeddings_dir": f"{target.name}/embeddings",
        "items": [{k: row[k] for k in ITEM_FIELDS} for row in rows],
    }


EXAMPLE_CANDIDATES = 256  # indexed captions tried as text queries
EXAMPLE_K = 5


def example_text_query(embedder: Embedder, index: faiss.Index, rows: list[dict[str, Any]], seed: int = 0
                       ) -> dict[str, Any] | None:
    """Captions of indexed pairs, in a seeded order, queried as text against the index: how often a
    caption finds its own image in the top ``EXAMPLE_K``, and the first that does, with its key and rank.
    None when no indexed item has a caption (nothing was measured, so no score is reported).

    The run's last screen suggests that caption as a text query: a fixed phrase could return
    unrelated images from a briefly trained model, and a suggestion that fails teaches nothing.
    """
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(rows)) if rows[i]["caption"].strip()]
    order = order[:EXAMPLE_CANDIDATES]
    if not order:
        return None
    _, found = index.search(embedder.embed_text([rows[i]["caption"] for i in order]), EXAMPLE_K)
    ranks = [list(ids).index(i) + 1 if i in ids else None for i, ids in zip(order, found)]
    first = next((pos for pos, rank in enumerate(ranks) if rank is not None), None)
    return {"text": None if first is None else rows[order[first]]["caption"],
            "key": None if first is None else rows[order[first]]["key"],
            "rank": None if first is None else ranks[first], "tried": len(order),
            "recall_at_5": sum(rank is not None for rank in ranks) / len(order)}


def build_target(target: IndexTarget, config: IndexConfig, dataset: StageResult, encoder: StageResult,
                 output_dir: Path, data_root: Path, device: str) -> tuple[dict[str, Any], dict[str, float]]:
    record = encoder_record(target.encoder, encoder, data_root)
    embedder = load_embedder(record, data_root, device)
    shards = split_shards(dataset.manifest_path, target.split)
    start = time.perf_counter()
    vectors, rows, embedded_now = embed_split(embedder, shards, output_dir / target.name / "embeddings", config.batch_size)
    embed_s = time.perf_counter() - start
    factory = config.factory or choose_factory(len(vectors), vectors.shape[1], config.memory_budget_mb)
    start = time.perf_counter()
    index = build_index(vectors, factory)
    build_s = time.perf_counter() - start
    tuning = tune(index, vectors, config.target_recall, config.recall_queries)
    set_param(index, tuning["param"], tuning["value"])
    index_path = output_dir / f"{target.name}.faiss"
    write_index_atomic(index, index_path)
    # Where the search service reads thumbnails by byte range: the uploaded shards' location, or the
    # shard folder relative to the data root (which may move).
    location = dataset.manifest()["outputs"].get("location")
    shard_dir = location or Path(dataset.output_dir).resolve().relative_to(Path(data_root).resolve())
    meta = index_meta(target, record, factory, tuning, rows, int(vectors.shape[1]), shard_dir)
    write_json_atomic(output_dir / f"{target.name}.meta.json", meta)
    metrics = {"recall_at_10": tuning["recall_at_10"], "qps": tuning["qps"], "bytes": float(index_path.stat().st_size),
               "vectors": float(len(rows)), "dim": float(vectors.shape[1]), "embed_s": embed_s, "build_s": build_s,
               "target_met": float(tuning["target_met"]), "shards_embedded": float(len(embedded_now))}
    if tuning["value"] is not None:
        metrics[tuning["param"]] = float(tuning["value"])
    example = example_text_query(embedder, index, rows) if embedder.kind == "clip" else None
    if example is not None:
        metrics["caption_recall_at_5"] = example["recall_at_5"]
    summary = {"index": index_path.name, "meta": f"{target.name}.meta.json", "factory": factory,
               "search_param": meta["search_param"], "count": len(rows), "dim": meta["dim"], "dataset": target.dataset,
               "encoder": target.encoder, "split": target.split, "tuning": tuning["tried"],
               "shards_embedded_now": embedded_now}
    if example is not None:
        summary["example_text_query"] = example
    tuned = f" ({tuning['param']}={tuning['value']})" if tuning["value"] is not None else " (exact)"
    log.info("index %s: %s%s over %d vectors, recall@10=%.4f qps=%.0f bytes=%d", target.name, factory, tuned, len(rows),
             tuning["recall_at_10"], tuning["qps"], metrics["bytes"])
    return summary, metrics


def run(config: IndexConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Build every target's index; reuse a finished run, and re-embed only missing shards of a killed one."""
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    datasets, encoders = _inputs_by_role(inputs, context)
    for target in config.targets:
        if target.dataset not in datasets:
            raise BadInputError(f"index target {target.name!r}: dataset {target.dataset!r} is not among the inputs")
        if target.encoder not in encoders:
            raise BadInputError(f"index target {target.name!r}: encoder {target.encoder!r} is not among the inputs")
    output_dir.mkdir(parents=True, exist_ok=True)
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=config.model_dump(mode="json")) as tracked:
        device = stage_device(context)
        outputs: dict[str, Any] = {"targets": {}}
        metrics: dict[str, float] = {}
        for target in config.targets:
            summary, target_metrics = build_target(target, config, datasets[target.dataset], encoders[target.encoder],
                                                   output_dir, Path(context.data_root), device)
            outputs["targets"][target.name] = summary
            metrics |= {f"{target.name}/{k}": v for k, v in target_metrics.items()}
            tracking.log_params({f"{target.name}/factory": summary["factory"]})
        if metrics:
            tracking.log_metrics(metrics)
        tracking.log_dict(outputs, "index_summary.json")
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)

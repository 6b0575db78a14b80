"""The index stage: embed one split of the shards with a trained encoder and build a FAISS index on it.

Embeddings are written per shard (``embeddings/<shard>.npy`` plus a ``.json`` of keys, captions and
labels), each atomically and the array last, so a killed run re-embeds only the shards it had not
finished. The index is an exact ``Flat`` below 1,000 vectors, else ``IVF{k},Flat`` with k ≈ 4·√N, on
inner product over L2-normalised vectors (cosine similarity); ``nprobe`` is raised until recall@10
against exact search reaches ``target_recall``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlflow
import numpy as np
import torch

from data_shards.atomic import write_bytes_atomic, write_json_atomic
from data_shards.loader import LoaderSpec, evaluation_batches, split_shards
from tasks.config import IndexConfig
from tasks.devices import stage_device
from tasks.stage import StageContext, StageResult, finished_result, stage_output_dir, write_manifest
from tasks.tracking import stage_run

STAGE = "index"
ENCODER_STAGES = {"mae": "mae_pretrain", "clip": "clip_train"}
MAE_POOL = "token"  # the MAE encoder's class token (after the final LayerNorm) is the image's vector
RECALL_QUERIES = 200
RECALL_K = 10
FLAT_BELOW = 1000
TRAIN_PER_LIST = 256  # FAISS wants ~39 training points per list at least; 256 is its sampling cap
log = logging.getLogger("patchflow.index")


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass
class Embedder:
    """An encoder and the input geometry its images need; ``images`` are normalised (N, C, H, W)."""

    kind: str
    model: torch.nn.Module
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str = "cpu"
    tokenizer: Any = None

    def loader_spec(self, shard_paths: tuple[str, ...], batch_size: int) -> LoaderSpec:
        return LoaderSpec(shard_paths=shard_paths, batch_size=batch_size, shuffle=False, image_size=self.image_size,
                          channels=self.channels, mean=self.mean, std=self.std)

    @torch.no_grad()
    def embed_batches(self, batches: Iterable[dict[str, Any]]) -> np.ndarray:
        if self.kind == "mae":
            from tasks.features import extract_features

            return l2_normalise(extract_features(self.model, batches, device=self.device, pools=(MAE_POOL,))[MAE_POOL])
        chunks = [self.model.encode_image(torch.as_tensor(b["image"]).to(self.device)).float().cpu().numpy()
                  for b in batches]
        if not chunks:
            raise ValueError("no images to embed")
        return l2_normalise(np.concatenate(chunks))

    def embed_images(self, images: torch.Tensor) -> np.ndarray:
        return self.embed_batches([{"image": images}])

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        if self.kind != "clip":
            raise ValueError(f"a {self.kind} encoder has no text tower")
        tokens = self.tokenizer.encode(texts).to(self.device)
        return l2_normalise(self.model.encode_text(tokens).float().cpu().numpy())


def load_embedder(kind: str, encoder_manifest: str | Path, device: str = "cpu") -> Embedder:
    """Rebuild the encoder an upstream stage exported, from that stage's manifest."""
    encoder_manifest = Path(encoder_manifest)
    outputs = json.loads(encoder_manifest.read_text())["outputs"]
    if kind == "mae":
        from tasks.finetune import build_encoder, load_encoder_weights

        architecture, normalization = outputs["architecture"], outputs["normalization"]
        encoder = build_encoder(architecture)
        load_encoder_weights(encoder, encoder_manifest.parent / outputs["encoder"]["path"])
        encoder.to(device).eval()
        return Embedder("mae", encoder, architecture["image_size"], architecture["in_chans"],
                        tuple(normalization["mean"]), tuple(normalization["std"]), device)
    if kind == "clip":
        from models.clip import load_clip

        model, tokenizer, info = load_clip(encoder_manifest.parent / outputs["model"]["path"])
        model.to(device).eval()
        return Embedder("clip", model, info["image_size"], info["channels"], tuple(info["mean"]), tuple(info["std"]),
                        device, tokenizer)
    raise ValueError(f"unknown encoder kind {kind!r}")


def _recording(batches: Iterable[dict[str, Any]], rows: dict[str, list]) -> Iterator[dict[str, Any]]:
    """Pass the batches through, keeping each sample's key, caption and label in order."""
    for batch in batches:
        rows["keys"].extend(batch["key"])
        rows["captions"].extend(batch["caption"])
        rows["labels"].extend(int(v) for v in torch.as_tensor(batch["label"]).reshape(-1).tolist())
        yield batch


def shard_stem(shard_path: str) -> str:
    name = Path(shard_path).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def embed_shards(embedder: Embedder, shard_paths: tuple[str, ...], embeddings_dir: Path,
                 batch_size: int) -> tuple[list[dict[str, Any]], int]:
    """Embed every shard not embedded yet; returns the per-shard records (in shard order) and how many
    shards were embedded now (the rest were found finished)."""
    records, embedded_now = [], 0
    for path in shard_paths:
        stem = shard_stem(path)
        array_path, rows_path = embeddings_dir / f"{stem}.npy", embeddings_dir / f"{stem}.json"
        if not (array_path.is_file() and rows_path.is_file()):
            rows: dict[str, list] = {"keys": [], "captions": [], "labels": []}
            vectors = embedder.embed_batches(_recording(evaluation_batches(embedder.loader_spec((path,), batch_size)), rows))
            if len(vectors) != len(rows["keys"]):
                raise RuntimeError(f"{path}: {len(vectors)} embeddings for {len(rows['keys'])} samples")
            write_json_atomic(rows_path, rows)
            buffer = _npy_bytes(vectors)
            write_bytes_atomic(array_path, buffer)  # the array last: its presence means the shard is done
            embedded_now += 1
            log.info("embedded %s: %d vectors", stem, len(vectors))
        count = int(np.load(array_path, mmap_mode="r").shape[0])
        records.append({"shard": stem, "path": f"embeddings/{stem}.npy", "rows": f"embeddings/{stem}.json", "count": count})
    return records, embedded_now


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def choose_factory(n: int, factory: str | None) -> str:
    if factory:
        return factory
    if n < FLAT_BELOW:
        return "Flat"
    return f"IVF{max(1, round(4 * math.sqrt(n)))},Flat"


def build_index(vectors: np.ndarray, factory: str, seed: int = 0) -> Any:
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = _ivf(index)
        want = TRAIN_PER_LIST * ivf.nlist if ivf is not None else len(vectors)
        if ivf is not None and len(vectors) < ivf.nlist:
            raise ValueError(f"{factory}: {ivf.nlist} lists need at least as many vectors, got {len(vectors)}")
        sample = vectors
        if len(vectors) > want:
            sample = vectors[np.random.default_rng(seed).choice(len(vectors), want, replace=False)]
        index.train(sample)
    index.add(vectors)
    return index


def _ivf(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_nprobe(index: Any, nprobe: int) -> None:
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def tune_nprobe(index: Any, vectors: np.ndarray, target: float, seed: int = 0) -> dict[str, float]:
    """The smallest power-of-two nprobe (capped at nlist) whose recall@10 against exact inner-product
    search over ``RECALL_QUERIES`` sampled database vectors reaches ``target``, and its QPS."""
    import faiss

    rng = np.random.default_rng(seed)
    queries = vectors[rng.choice(len(vectors), min(RECALL_QUERIES, len(vectors)), replace=False)]
    k = min(RECALL_K, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    ivf = _ivf(index)
    candidates = [1]
    if ivf is not None:
        while candidates[-1] < ivf.nlist:
            candidates.append(min(candidates[-1] * 2, ivf.nlist))
    for nprobe in candidates:
        set_nprobe(index, nprobe)
        _, found = index.search(queries, k)
        recall = recall_at_k(found, truth)
        log.info("nprobe=%d recall@%d=%.4f", nprobe, k, recall)
        if recall >= target:
            break
    else:
        log.warning("recall@%d %.4f stays below the target %.3f at nprobe=%d", k, recall, target, nprobe)
    repeats, start = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < 0.2:
        index.search(queries, k)
        repeats += 1
    qps = repeats * len(queries) / (time.perf_counter() - start)
    return {"nprobe": float(nprobe if ivf is not None else 0), "recall_at_10": recall, "qps": qps,
            "recall_queries": float(len(queries))}


def write_index_atomic(index: Any, path: Path) -> None:
    import faiss

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _label_name(label: int, classes: list[str] | None) -> Any:
    if label < 0:
        return None
    if classes and label < len(classes):
        return classes[label]
    return label


def run(config: IndexConfig, inputs: list[StageResult], context: StageContext) -> StageResult:
    """Embed the split of the upstream shards with the upstream encoder and index it; reuse a finished run."""
    shards = [r for r in inputs if r.stage == "shard"]
    encoders = [r for r in inputs if r.stage == ENCODER_STAGES[config.encoder]]
    if len(shards) != 1 or len(encoders) != 1:
        raise ValueError(f"index needs one shard result and one {ENCODER_STAGES[config.encoder]} result "
                         f"(encoder={config.encoder}); got stages {[r.stage for r in inputs]}")
    (shard_result,), (encoder_result,) = shards, encoders
    output_dir = stage_output_dir(context.data_root, STAGE, config, inputs)
    done = finished_result(output_dir)
    if done is not None:
        return done
    shard_paths = split_shards(shard_result.manifest_path, config.split)
    classes = shard_result.manifest()["outputs"].get("classes")
    device = stage_device(context)
    embedder = load_embedder(config.encoder, encoder_result.manifest_path, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    params = {**config.model_dump(mode="json"), "device": device, "shards": len(shard_paths)}
    with stage_run(STAGE, context.data_root, context.parent_run_id, params=params) as tracked:
        start = time.perf_counter()
        records, embedded_now = embed_shards(embedder, shard_paths, output_dir / "embeddings", config.batch_size)
        embed_s = time.perf_counter() - start
        vectors = np.concatenate([np.load(output_dir / r["path"]) for r in records]).astype(np.float32, copy=False)
        meta = []
        for record in records:
            rows = json.loads((output_dir / record["rows"]).read_text())
            meta.extend({"key": key, "caption": caption, "label": _label_name(label, classes), "shard": record["shard"]}
                        for key, caption, label in zip(rows["keys"], rows["captions"], rows["labels"]))
        factory = choose_factory(len(vectors), config.factory)
        start = time.perf_counter()
        index = build_index(vectors, factory)
        build_s = time.perf_counter() - start
        tuned = tune_nprobe(index, vectors, config.target_recall)
        set_nprobe(index, int(tuned["nprobe"]) or 1)
        index_path = output_dir / f"{config.name}.faiss"
        write_index_atomic(index, index_path)
        write_json_atomic(output_dir / f"{config.name}.meta.json", {"ids": meta})
        metrics = {**tuned, "vectors": float(len(vectors)), "dim": float(vectors.shape[1]),
                   "index_bytes": float(index_path.stat().st_size), "shards_embedded": float(embedded_now),
                   "shards_reused": float(len(records) - embedded_now), "embed_s": embed_s, "build_s": build_s}
        mlflow.log_metrics(metrics)
        mlflow.set_tag("index.factory", factory)
        outputs = {
            "name": config.name, "factory": factory, "nprobe": int(tuned["nprobe"]), "metric": "inner_product",
            "recall_at_10": tuned["recall_at_10"], "index_bytes": int(index_path.stat().st_size),
            "index": f"{config.name}.faiss", "meta": f"{config.name}.meta.json", "embeddings": records,
            "vectors": len(vectors), "dim": int(vectors.shape[1]), "split": config.split,
            "encoder": {"kind": config.encoder, "stage": encoder_result.stage, "manifest": encoder_result.manifest_path,
                        "digest": encoder_result.digest, "pool": MAE_POOL if config.encoder == "mae" else "image_proj"},
        }
        return write_manifest(output_dir, STAGE, config, inputs, outputs, metrics, tracked.info.run_id)

"""Query a finished index stage: by text (CLIP indexes), by an image, or by the key of an indexed sample."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.stage import MANIFEST_NAME

MAX_K = 1000


class SearchError(ValueError):
    """A query that cannot be answered: a bad argument, or no such index."""


@dataclass
class OpenedIndex:
    name: str
    output_dir: Path
    manifest: dict[str, Any]
    index: Any
    meta: list[dict[str, Any]]
    _key_ids: dict[str, int] = field(default_factory=dict, repr=False)
    _embedder: Any = field(default=None, repr=False)

    @property
    def encoder_kind(self) -> str:
        return self.manifest["outputs"]["encoder"]["kind"]

    def key_id(self, key: str) -> int:
        if not self._key_ids:
            self._key_ids = {row["key"]: i for i, row in enumerate(self.meta)}
        if key not in self._key_ids:
            raise SearchError(f"key {key!r} is not in index {self.name!r}")
        return self._key_ids[key]

    def stored_vector(self, vector_id: int) -> np.ndarray:
        offset = 0
        for record in self.manifest["outputs"]["embeddings"]:
            if vector_id < offset + record["count"]:
                return np.array(np.load(self.output_dir / record["path"], mmap_mode="r")[vector_id - offset],
                                dtype=np.float32)[None]
            offset += record["count"]
        raise SearchError(f"id {vector_id} is beyond the {offset} vectors of index {self.name!r}")

    def embedder(self) -> Any:
        if self._embedder is None:
            from tasks.index import load_embedder

            encoder = self.manifest["outputs"]["encoder"]
            self._embedder = load_embedder(encoder["kind"], encoder["manifest"])
        return self._embedder


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or ".." in name:
        raise SearchError(f"bad index name {name!r}: no '/', '\\' or '..' allowed")


def _finished_indexes(data_root: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    found = []
    for path in sorted((Path(data_root) / "stages" / "index").glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append((manifest.get("finished_at", ""), path.parent, manifest))
    return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime))


def open_index(data_root: str | Path, name: str | None = None) -> OpenedIndex:
    """The newest finished index stage under ``data_root`` (named ``name``, if given)."""
    import faiss

    if name is not None:
        _check_name(name)
    candidates = [c for c in _finished_indexes(Path(data_root)) if name is None or c[2]["outputs"]["name"] == name]
    if not candidates:
        what = f"named {name!r}" if name is not None else "at all"
        raise SearchError(f"no finished index {what} under {Path(data_root) / 'stages' / 'index'}")
    _, output_dir, manifest = candidates[-1]
    outputs = manifest["outputs"]
    index = faiss.read_index(str(output_dir / outputs["index"]))
    ivf = None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        pass
    if ivf is not None:
        ivf.nprobe = max(1, int(outputs["nprobe"]))
    meta = json.loads((output_dir / outputs["meta"]).read_text())["ids"]
    return OpenedIndex(outputs["name"], output_dir, manifest, index, meta)


def _image_tensor(image: Any, embedder: Any) -> Any:
    import torch
    from PIL import Image, UnidentifiedImageError

    from data_shards.loader import to_model_input

    if isinstance(image, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(image))
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise SearchError(f"cannot decode the query image ({exc})") from None
    if not isinstance(image, Image.Image):
        raise SearchError(f"image must be a PIL image or encoded bytes, got {type(image).__name__}")
    image = image.convert("L" if embedder.channels == 1 else "RGB")
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    tensor = tensor.view(image.height, image.width, embedder.channels).permute(2, 0, 1)
    spec = embedder.loader_spec(("query",), 1)
    return to_model_input(tensor, spec)[None]


def search(opened: OpenedIndex, *, text: str | None = None, image: Any = None, key: str | None = None,
           k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` nearest indexed samples to one query: rank (1-based), score (cosine), key, caption, label."""
    given = [kind for kind, value in (("text", text), ("image", image), ("key", key)) if value is not None]
    if len(given) != 1:
        raise SearchError(f"give exactly one of text, image or key (got {given or 'none'})")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise SearchError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    if text is not None:
        if opened.encoder_kind != "clip":
            raise SearchError(f"index {opened.name!r} was built with a {opened.encoder_kind} encoder: "
                              "text queries need a CLIP index")
        if not text.strip():
            raise SearchError("the text query is empty")
        query = opened.embedder().embed_text([text])
    elif key is not None:
        query = opened.stored_vector(opened.key_id(key))
    else:
        embedder = opened.embedder()
        query = embedder.embed_images(_image_tensor(image, embedder))
    scores, ids = opened.index.search(np.ascontiguousarray(query, dtype=np.float32), min(k, len(opened.meta)))
    hits = []
    for score, vector_id in zip(scores[0], ids[0]):
        if vector_id < 0:
            continue
        row = opened.meta[int(vector_id)]
        hits.append({"rank": len(hits) + 1, "score": float(score), "key": row["key"], "caption": row["caption"],
                     "label": row["label"]})
    return hits

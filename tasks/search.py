"""The one search module: open a built index, embed a query with the index's own encoder, search,
shape the answer. ``patchflow query`` and the HTTP service (``flows/serve.py``) both call it and
hold no search logic of their own. Every bad input raises :class:`SearchError` naming the problem."""

from __future__ import annotations

import http.client
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_shards import remote
from data_shards.errors import BadInputError
from data_shards.loader import to_model_input
from tasks.index import META_FORMAT, Embedder, l2_normalise, load_embedder, set_param
from tasks.stage import MANIFEST_NAME

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_K = 1000
MAX_TEXT_CHARS = 1000
MAX_IMAGE_BYTES = 10 * 2**20
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


class SearchError(BadInputError, ValueError):
    """A query or index that cannot be served; the message names the problem."""


@dataclass
class OpenIndex:
    name: str
    folder: Path
    data_root: Path
    meta: dict[str, Any]
    index: faiss.Index
    finished_at: str
    by_key: dict[str, int] = field(default_factory=dict)
    _embedder: Embedder | None = None

    @property
    def encoder(self) -> str:
        return self.meta["encoder"]["kind"]

    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.meta["encoder"], self.data_root)
        return self._embedder

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "encoder": self.encoder, "dataset": self.meta["dataset"], "split": self.meta["split"],
                "count": self.meta["count"], "dim": self.meta["dim"], "factory": self.meta["factory"],
                "text_queries": self.encoder == "clip", "finished_at": self.finished_at}


def _finished_indexes(data_root: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(finished_at, stage folder, manifest) of every finished index stage run, newest first."""
    found = []
    for manifest_path in (Path(data_root) / "stages" / "index").glob(f"*/{MANIFEST_NAME}"):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        found.append((manifest.get("finished_at", ""), manifest_path.parent, manifest))
    return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime), reverse=True)


def list_indexes(data_root: Path) -> list[str]:
    names: list[str] = []
    for _, _, manifest in _finished_indexes(data_root):
        names.extend(n for n in manifest["outputs"].get("targets", {}) if n not in names)
    return names


def open_index(data_root: str | Path, name: str | None = None) -> OpenIndex:
    """The newest finished build of index ``name`` (None: the newest finished index of any name)."""
    data_root = Path(data_root).expanduser().resolve()
    if name is not None and not NAME_PATTERN.match(name):
        raise SearchError(f"invalid index name {name!r}: letters, digits, '-' and '_' only")
    for finished_at, folder, manifest in _finished_indexes(data_root):
        targets = manifest["outputs"].get("targets", {})
        chosen = name if name is not None else next(iter(targets), None)
        if chosen is None or chosen not in targets:
            continue
        meta_path, index_path = folder / f"{chosen}.meta.json", folder / f"{chosen}.faiss"
        for path in (meta_path, index_path):
            if not path.is_file():
                raise SearchError(f"index {chosen!r}: file {path} is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != META_FORMAT:
            raise SearchError(f"index {chosen!r}: {meta_path} is not a {META_FORMAT} file")
        index = faiss.read_index(str(index_path))
        if index.ntotal != meta["count"] or index.d != meta["dim"]:
            raise SearchError(f"index {chosen!r}: {index_path} holds {index.ntotal}x{index.d} but the metadata says "
                              f"{meta['count']}x{meta['dim']}")
        set_param(index, meta["search_param"]["name"], meta["search_param"]["value"])
        return OpenIndex(chosen, folder, data_root, meta, index, finished_at,
                         {item["key"]: i for i, item in enumerate(meta["items"])})
    known = list_indexes(data_root)
    what = f"unknown index {name!r}" if name is not None else "no finished index"
    raise SearchError(f"{what} under {data_root} (available: {known or 'none'})",
                      hint="pass --index with an available name, or build one with `patchflow run` (its index stage)")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise SearchError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    return k


def decode_query_image(data: bytes, embedder: Embedder) -> torch.Tensor:
    if not data:
        raise SearchError("the image upload is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise SearchError(f"the image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert("L" if embedder.channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SearchError(f"the upload is not a readable image ({type(exc).__name__})") from None
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    tensor = tensor.view(image.height, image.width, embedder.channels).permute(2, 0, 1)
    return to_model_input(tensor, embedder.spec(()))[None]


def query_vector(index: OpenIndex, text: str | None = None, image: bytes | None = None,
                 key: str | None = None) -> np.ndarray:
    given = [kind for kind, value in (("text", text), ("image", image), ("key", key)) if value is not None]
    if len(given) != 1:
        raise SearchError(f"give exactly one of text, image or key (got {given or 'none'})")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise SearchError("the text query is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise SearchError(f"the text query has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
        if index.encoder != "clip":
            raise SearchError(f"index {index.name!r} is embedded by the {index.encoder} image encoder: text queries "
                              f"need a CLIP index")
        vector = index.embedder().embed_text([text])
    elif image is not None:
        embedder = index.embedder()
        vector = embedder.embed_batches([{"image": decode_query_image(image, embedder), "label": torch.tensor([-1])}])
    else:
        if key not in index.by_key:
            raise SearchError(f"unknown key {key!r} in index {index.name!r}")
        item = index.meta["items"][index.by_key[key]]
        path = index.folder / index.meta["embeddings_dir"] / Path(item["shard"]).with_suffix(".npy").name
        if not path.is_file():
            raise SearchError(f"index {index.name!r}: embeddings file {path} is missing")
        vector = l2_normalise(np.load(path, mmap_mode="r", allow_pickle=False)[item["row"]][None])
    if vector.shape != (1, index.meta["dim"]):
        raise SearchError(f"query vector has shape {vector.shape}; index {index.name!r} expects (1, {index.meta['dim']})")
    return vector


def search(index: OpenIndex, text: str | None = None, image: bytes | None = None, key: str | None = None,
           k: int = 10) -> list[dict[str, Any]]:
    """Top-``k`` items by cosine similarity: [{rank, score, key, caption, label}], best first."""
    k = _check_k(k)
    vector = query_vector(index, text=text, image=image, key=key)
    scores, ids = index.index.search(vector, min(k, index.index.ntotal))
    results = []
    for score, i in zip(scores[0], ids[0]):
        if i < 0:  # an IVF probe that found fewer than k vectors
            continue
        item = index.meta["items"][i]
        results.append({"rank": len(results) + 1, "score": float(score), "key": item["key"],
                        "caption": item["caption"], "label": item["label"]})
    return results


def thumbnail(index: OpenIndex, key: str) -> tuple[bytes, str]:
    """The stored image bytes of ``key`` and their media type, read by byte range from its shard."""
    if key not in index.by_key:
        raise SearchError(f"unknown key {key!r} in index {index.name!r}")
    item = index.meta["items"][index.by_key[key]]
    shard_dir = index.meta["shard_dir"]
    try:
        if remote.is_remote(shard_dir):  # shards uploaded by the shard stage (shard.output)
            shard: str | Path = f"{shard_dir}/{item['shard']}"
            data = remote.read_range(str(shard), item["offset"], item["size"])
        else:
            shard = index.data_root / shard_dir / item["shard"]
            with open(shard, "rb") as handle:
                handle.seek(item["offset"])
                data = handle.read(item["size"])
    except (OSError, http.client.HTTPException):
        raise SearchError(f"shard file {shard} of key {key!r} is missing or unreachable") from None
    if len(data) != item["size"]:
        raise SearchError(f"shard file {shard} is shorter than the metadata says (key {key!r})")
    return data, MEDIA_TYPES.get(item["ext"], "application/octet-stream")

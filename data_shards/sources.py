"""Sources: each turns a dataset on disk into train/val(/test) lists of :class:`RawSample`.

Everything cheap to check (files exist, headers, columns, referenced images) is checked here,
before any shard is written; image decoding is checked by the encoder, also before writing.
"""

from __future__ import annotations

import csv
import http.client
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_shards import fashion_mnist, remote
from data_shards.fingerprint import content_entry, fingerprint, stat_entry, tree_entries
from data_shards.samples import RawSample, SourceError, safe_key, split_off_validation, take_subset

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class PreparedSource:
    """A source read and checked: samples per split, class names, and where it came from."""

    splits: dict[str, list[RawSample]]
    classes: list[str] | None
    description: dict[str, Any]


def _limited_splits(
    train: list[Any], val: list[Any] | None, test: list[Any] | None, cfg: Any, seed: int
) -> dict[str, list[Any]]:
    """Carve val from train when the source has none, then apply the per-split limits."""
    if val is None:
        train_idx, val_idx = split_off_validation(len(train), cfg.val_fraction, seed=seed)
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    splits = {"train": train, "val": val}
    if test:
        splits["test"] = test
    limits = {"train": cfg.max_train, "val": cfg.max_val, "test": cfg.max_test}
    out = {}
    for name, items in splits.items():
        keep = take_subset(np.arange(len(items)), limits[name], seed=seed + len(name))
        if len(keep):
            out[name] = [items[i] for i in keep]
    return out


def _fashion_mnist(cfg: Any, data_root: Path, seed: int) -> PreparedSource:
    folder = fashion_mnist.locate_fashion_mnist(cfg.path, data_root)
    train_images, train_labels = fashion_mnist.load_split(folder, "train")
    test_images, test_labels = fashion_mnist.load_split(folder, "test")

    def records(split: str, images: np.ndarray, labels: np.ndarray) -> list[tuple]:
        return [(split, i, images, labels) for i in range(len(images))]

    splits = _limited_splits(records("train", train_images, train_labels), None,
                             records("test", test_images, test_labels), cfg, seed)
    samples = {
        name: [
            RawSample(key=safe_key(src, f"{i:05d}"), origin=f"{folder} [{src} #{i}]",
                      pixels=images[i], label=int(labels[i]))
            for src, i, images, labels in items
        ]
        for name, items in splits.items()
    }
    return PreparedSource(samples, list(fashion_mnist.CLASSES), {"kind": "fashion_mnist", "path": str(folder)})


def _folder_entries(root: Path) -> tuple[list[str], Callable[[str], bytes]]:
    """Relative file names and a reader, for a folder or a zip archive."""
    if root.is_dir():
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return names, lambda name: (root / name).read_bytes()
    if zipfile.is_zipfile(root):
        archive = zipfile.ZipFile(root)
        names = sorted(info.filename for info in archive.infolist() if not info.is_dir())
        return names, archive.read
    raise SourceError(f"{root}: not a folder or a zip archive")


def _image_folder(cfg: Any, data_root: Path, seed: int) -> PreparedSource:
    if cfg.path is None:
        raise SourceError("shard.source.path: image_folder needs a folder or zip laid out split/class/*.jpg")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise SourceError(f"{root}: image folder does not exist")
    names, read = _folder_entries(root)
    by_split: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        parts = Path(name).parts
        if Path(name).suffix.lower() not in IMAGE_EXTS or len(parts) < 3:
            continue
        by_split.setdefault(parts[-3], []).append((parts[-2], name))
    if "train" not in by_split:
        raise SourceError(f"{root}: no images under train/<class>/ (found splits {sorted(by_split)})")
    classes = sorted({cls for items in by_split.values() for cls, _ in items})
    index = {cls: i for i, cls in enumerate(classes)}
    unknown = {cls for split, items in by_split.items() if split != "train" for cls, _ in items} - {c for c, _ in by_split["train"]}
    if unknown:
        raise SourceError(f"{root}: classes {sorted(unknown)} appear outside train/ only")
    splits = _limited_splits(by_split["train"], by_split.get("val"), by_split.get("test"), cfg, seed)
    samples = {
        split: [
            RawSample(key=safe_key(Path(name).with_suffix("")), origin=f"{root}:{name}",
                      image_bytes=read(name), image_ext=IMAGE_EXTS[Path(name).suffix.lower()],
                      label=index[cls], meta={"class_name": cls})
            for cls, name in items
        ]
        for split, items in splits.items()
    }
    return PreparedSource(samples, classes, {"kind": "image_folder", "path": str(root)})


def _find_table(path: Path) -> Path:
    if path.is_file():
        return path
    for pattern in ("captions.tsv", "*.tsv", "*.csv"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    raise SourceError(f"{path}: no caption table (.tsv/.csv) found")


# Codepoints that make variants of one emoji: skin tones, ZWJ, variation selector, gender signs.
_VARIANT_CODEPOINTS = set(range(0x1F3FB, 0x1F400)) | {0x200D, 0xFE0F, 0x2640, 0x2642}
_SKIN_TONE_WORDS = re.compile(r"[:,]?\s*(?:medium-light|medium-dark|light|medium|dark) skin tones?")
_PERSON_CODEPOINTS = {0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1}  # man / woman → person


def emoji_group_keys(name: str, emoji: str) -> tuple[str, str]:
    """Two keys that each tie near-duplicate emoji together: the name without its skin-tone words
    (``waving hand, medium skin tone`` → ``waving hand``; other words after a comma stay, they are not
    always variants) and the codepoints without modifiers, gender signs and ZWJ, with man/woman
    read as person (``woman technologist`` ~ ``man technologist`` ~ ``technologist``)."""
    base = _SKIN_TONE_WORDS.sub("", name.lower()).strip(" :,")
    points = [_PERSON_CODEPOINTS.get(ord(c), ord(c)) for c in emoji if ord(c) not in _VARIANT_CODEPOINTS]
    return f"name:{base}", "cp:" + "-".join(f"{p:x}" for p in points)


def grouped_validation(keys: list[tuple[str, ...]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of train and val such that rows sharing any key (transitively) share a split."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, row_keys in enumerate(keys):
        for key in row_keys:
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(find(i), []).append(i)
    order = sorted(groups.values(), key=lambda rows: rows[0])
    np.random.default_rng(seed).shuffle(order)
    target, val = round(val_fraction * len(keys)), []
    train = []
    for rows in order:
        (val if len(val) < target else train).extend(rows)
    return sorted(train), sorted(val)


def _caption_table(cfg: Any, data_root: Path, seed: int) -> PreparedSource:
    if cfg.path is None:
        raise SourceError("shard.source.path: caption_table needs a TSV/CSV file or its folder")
    table = _find_table(Path(cfg.path).expanduser())
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with open(table, newline="", encoding="utf-8") as handle:
        # A short row leaves its missing cells None; read them as empty, so a missing caption meets the
        # empty_captions policy instead of being stored (or formatted into a template) as the text "None".
        rows = [{column: cell or "" for column, cell in row.items()}
                for row in csv.DictReader(handle, delimiter=delimiter)]
    if not rows:
        raise SourceError(f"{table}: caption table is empty")
    needed = ([cfg.image_column, cfg.caption_column] + ([cfg.label_column] if cfg.label_column else [])
              + ([cfg.emoji_column] if cfg.split_group == "emoji" else []))
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise SourceError(f"{table}: missing column(s) {missing}; columns are {list(rows[0])}")
    classes = sorted({row[cfg.label_column] for row in rows}) if cfg.label_column else None
    items, group_keys = [], []
    templates = cfg.caption_templates or [cfg.caption_template]
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if not row[cfg.caption_column].strip() and cfg.empty_captions == "error":
            raise SourceError(f"{table} line {line}: empty caption in column {cfg.caption_column!r} "
                              f"(image {row[cfg.image_column]!r}); fix the row or set empty_captions: keep")
        image_path = next((p for p in (table.parent / row[cfg.image_column], table.parent / "images" / row[cfg.image_column]) if p.is_file()), None)
        if image_path is None:
            raise SourceError(f"{table} line {line}: image {row[cfg.image_column]!r} not found")
        try:
            captions = [t.format(caption=row[cfg.caption_column], **row) for t in templates]
        except (KeyError, IndexError) as exc:
            raise SourceError(f"shard.source.caption_template(s): unknown field {exc} (table {table})") from None
        caption = "\n".join(c.replace("\n", " ") for c in captions)  # one template per line
        label = classes.index(row[cfg.label_column]) if classes else None
        items.append((line, image_path, caption, label))
        if cfg.split_group == "emoji":
            group_keys.append(emoji_group_keys(row[cfg.caption_column], row[cfg.emoji_column]))
    if cfg.split_group == "emoji":
        train_idx, val_idx = grouped_validation(group_keys, cfg.val_fraction, seed)
        splits = _limited_splits([items[i] for i in train_idx], [items[i] for i in val_idx], None, cfg, seed)
    else:
        splits = _limited_splits(items, None, None, cfg, seed)
    samples = {
        split: [
            RawSample(key=safe_key(f"row{line:06d}", path.stem), origin=f"{table} line {line} ({path.name})",
                      image_bytes=path.read_bytes(), image_ext=IMAGE_EXTS.get(path.suffix.lower(), "png"),
                      label=label, caption=caption)
            for line, path, caption, label in chosen
        ]
        for split, chosen in splits.items()
    }
    return PreparedSource(samples, classes, {"kind": "caption_table", "path": str(table), "split_group": cfg.split_group,
                                             "caption_templates": len(templates)})


def _read_tar_samples(path: str) -> list[RawSample]:
    """Group an img2dataset-style tar's members by key: image + optional .txt/.json/.cls. A remote tar
    (URL, ``pipe:``) is read as a stream, tried again from its start if the connection fails."""
    def read() -> dict[str, dict[str, bytes]]:
        grouped: dict[str, dict[str, bytes]] = {}
        with remote.open_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                grouped.setdefault(f"{folder or '.'}/{key}", {})[ext.lower()] = archive.extractfile(member).read()
        return grouped

    try:
        grouped = remote.with_retries(path, read) if remote.is_remote(path) else read()
    except (tarfile.TarError, OSError, EOFError, http.client.HTTPException) as exc:
        raise SourceError(f"{path}: unreadable tar shard: {exc}") from exc
    stem = remote.file_name(path).removesuffix(".tar")
    samples = []
    for key, files in grouped.items():
        image_ext = next((ext for ext in ("jpg", "jpeg", "png", "webp") if ext in files), None)
        if image_ext is None:
            raise SourceError(f"{path}: sample {key!r} has no image (.jpg/.png/.webp), only {sorted(files)}")
        meta = json.loads(files["json"]) if "json" in files else {}
        samples.append(RawSample(
            key=safe_key(stem, key.rsplit("/", 1)[-1]), origin=f"{path}:{key}",
            image_bytes=files[image_ext], image_ext="jpg" if image_ext == "jpeg" else image_ext,
            label=int(files["cls"]) if "cls" in files else None,
            caption=files["txt"].decode("utf-8") if "txt" in files else None, meta=meta,
        ))
    return samples


def _webdataset_tars(cfg: Any) -> list[str]:
    """The source's tars: a local folder's ``*.tar`` or one local tar; remotely, a brace pattern
    (``https://host/shards/{00000..00009}.tar``), an object-store prefix, or a ``pipe:`` command."""
    if cfg.path is None:
        raise SourceError("shard.source.path: webdataset needs a folder of .tar shards, or their URLs")
    if remote.is_remote(cfg.path):
        try:
            tars = remote.list_tars(cfg.path)
        except (ImportError, ValueError, OSError) as exc:  # BadInputError is a ValueError: said as it is
            raise SourceError(f"shard.source.path={cfg.path}: {exc}",
                              hint="s3:// and gs:// need pip install 'patchflow[remote]'") from None
        if not tars:
            raise SourceError(f"{cfg.path}: no .tar shards found")
        return tars
    root = Path(cfg.path).expanduser()
    tars = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    if not tars or not all(t.is_file() for t in tars):
        raise SourceError(f"{root}: no .tar shards found")
    return [str(tar) for tar in tars]


def _webdataset(cfg: Any, data_root: Path, seed: int) -> PreparedSource:
    by_split: dict[str, list[RawSample]] = {}
    for tar in _webdataset_tars(cfg):
        name = remote.file_name(tar)
        split = next((s for s in ("train", "val", "test") if name.startswith(s)), "train")
        by_split.setdefault(split, []).extend(_read_tar_samples(tar))
    splits = _limited_splits(by_split.get("train", []), by_split.get("val"), by_split.get("test"), cfg, seed)
    return PreparedSource(splits, None, {"kind": "webdataset", "path": str(cfg.path)})


SOURCES: dict[str, Callable[[Any, Path, int], PreparedSource]] = {
    "fashion_mnist": _fashion_mnist,
    "image_folder": _image_folder,
    "caption_table": _caption_table,
    "webdataset": _webdataset,
}


def open_source(cfg: Any, data_root: Path, seed: int = 0) -> PreparedSource:
    """Read and check the source described by a ``SourceConfig``; ``seed`` picks val and subsets."""
    return SOURCES[cfg.kind](cfg, Path(data_root), seed)


SOURCE_UNAVAILABLE = "unavailable: fetched or reported when the shard stage reads it"


def source_fingerprint(cfg: Any, data_root: Path) -> str:
    """A cheap fingerprint of the files a ``SourceConfig`` reads: it changes when a file is added,
    removed, resized or touched (stat calls only), or when the caption table's bytes change.

    Args:
        cfg: the ``SourceConfig``.
        data_root: where a Fashion-MNIST download lives (the root is not part of the fingerprint).

    Returns :data:`SOURCE_UNAVAILABLE` for a source that is not there yet (Fashion-MNIST before its
    download, a wrong path); it never fetches and never raises, so computing a key stays fast and safe.
    """
    if cfg.path is None and cfg.kind != "fashion_mnist":
        return SOURCE_UNAVAILABLE
    try:
        return _SOURCE_FINGERPRINTS[cfg.kind](cfg, Path(data_root))
    except (SourceError, OSError, zipfile.BadZipFile):
        return SOURCE_UNAVAILABLE


def _fashion_mnist_fingerprint(cfg: Any, data_root: Path) -> str:
    folder = fashion_mnist.locate_fashion_mnist(cfg.path, data_root, allow_fetch=False)
    # Both names each file may have (gzipped or not): which one the reader picks is then covered too.
    names = [f"{stem}{ext}" for stem in fashion_mnist.FILES.values() for ext in (".gz", "")]
    return fingerprint("fashion_mnist", [stat_entry(folder / name, name) for name in names])


def _image_folder_fingerprint(cfg: Any, data_root: Path) -> str:
    root = Path(cfg.path).expanduser()
    if root.is_dir():
        return fingerprint("image_folder", tree_entries(root))
    if zipfile.is_zipfile(root):  # the central directory names every member with its size and CRC: no image is read
        with zipfile.ZipFile(root) as archive:
            entries = [[i.filename, i.file_size, i.CRC] for i in archive.infolist() if not i.is_dir()]
        return fingerprint("image_zip", sorted(entries))
    raise SourceError(f"{root}: not a folder or a zip archive")


def _caption_table_fingerprint(cfg: Any, data_root: Path) -> str:
    table = _find_table(Path(cfg.path).expanduser())
    # The table is hashed (small, and its rows are the dataset); its images may sit beside it or under
    # images/, so every other file of its folder is stat'ed (an unrelated file there costs a re-shard,
    # never a stale one).
    entries = [content_entry(table, table.name)] + tree_entries(table.parent, exclude=[table])
    return fingerprint("caption_table", entries)


def _webdataset_fingerprint(cfg: Any, data_root: Path) -> str:
    tars = _webdataset_tars(cfg)
    if remote.is_remote(cfg.path):  # a HEAD (or an object store's listing) per shard: no shard is read
        return fingerprint("webdataset", [remote.stat_entry(tar) for tar in tars])
    return fingerprint("webdataset", [stat_entry(Path(tar), Path(tar).name) for tar in tars])


_SOURCE_FINGERPRINTS: dict[str, Callable[[Any, Path], str]] = {
    "fashion_mnist": _fashion_mnist_fingerprint,
    "image_folder": _image_folder_fingerprint,
    "caption_table": _caption_table_fingerprint,
    "webdataset": _webdataset_fingerprint,
}

"""Fashion-MNIST: read the IDX files, and find or fetch them for a user who has none.

Where the files come from, in order: a path the user gives, Debian's ``dataset-fashion-mnist``
folder, an earlier torchvision download under the data root, a torchvision download now, and
finally ``apt-get install dataset-fashion-mnist`` where apt-get is usable.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np

from data_shards.samples import SourceError

log = logging.getLogger("patchflow.data")

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
APT_FIX = "apt-get install -y dataset-fashion-mnist"


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def has_fashion_mnist(folder: Path) -> bool:
    return all(_idx_path(folder, stem) for stem in FILES.values())


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file (gzipped or not), checking magic number, dimensions and length."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise SourceError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(data) < 8:
        raise SourceError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise SourceError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise SourceError(f"{path}: {len(data)} bytes but header {dims} implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) for ``split`` in {"train", "test"}."""
    images_path = _idx_path(folder, FILES[f"{split}_images"])
    labels_path = _idx_path(folder, FILES[f"{split}_labels"])
    if images_path is None or labels_path is None:
        raise SourceError(f"{folder}: missing Fashion-MNIST {split} files ({FILES[f'{split}_images']}[.gz])")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise SourceError(f"{images_path}: {images.shape} images do not match {labels.shape} labels in {labels_path}")
    if labels.max(initial=0) >= len(CLASSES):
        raise SourceError(f"{labels_path}: label {labels.max()} outside 0..{len(CLASSES) - 1}")
    return images, labels


def _try_torchvision_download(root: Path) -> Path | None:
    from torchvision.datasets import FashionMNIST

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network should fail fast, not hang the first run
    try:
        for train in (True, False):
            FashionMNIST(root=str(root), train=train, download=True)
        return root / "FashionMNIST" / "raw"
    except Exception as exc:  # any network or checksum failure means: try the next way
        log.warning("torchvision download of Fashion-MNIST failed: %s", exc)
        return None
    finally:
        socket.setdefaulttimeout(previous)


def _apt_get_usable() -> bool:
    return shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0


def _try_apt_install() -> bool:
    log.warning("Fashion-MNIST not found; installing Debian's package: %s", APT_FIX)
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):
        completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if completed.returncode != 0:
            log.warning("%s failed: %s", " ".join(command), completed.stderr.strip()[-500:])
            return False
    return has_fashion_mnist(DEBIAN_DIR)


def locate_fashion_mnist(path: str | None, data_root: Path, allow_fetch: bool = True) -> Path:
    """Return a folder holding the four IDX files, finding or fetching them as described above."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise SourceError(f"{folder}: Fashion-MNIST folder does not exist")
        if not has_fashion_mnist(folder):
            raise SourceError(f"{folder}: does not hold the four Fashion-MNIST IDX files {sorted(FILES.values())}")
        return folder
    download_root = Path(data_root) / "downloads"
    for folder in (DEBIAN_DIR, download_root / "FashionMNIST" / "raw"):
        if has_fashion_mnist(folder):
            return folder
    if allow_fetch:
        fetched = _try_torchvision_download(download_root)
        if fetched is not None and has_fashion_mnist(fetched):
            log.warning("downloaded Fashion-MNIST to %s", fetched)
            return fetched
        if _apt_get_usable() and _try_apt_install():
            log.warning("installed Fashion-MNIST to %s (Debian package dataset-fashion-mnist)", DEBIAN_DIR)
            return DEBIAN_DIR
    raise SourceError(
        "Fashion-MNIST not found: no path given, nothing in "
        f"{DEBIAN_DIR} or {download_root}, and it could not be downloaded. "
        f"Fix: `sudo {APT_FIX}`, or pass shard.source.path=/folder/with/idx/files"
    )

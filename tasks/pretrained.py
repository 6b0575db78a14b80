"""Finding the pretrained TAEF2 autoencoder weights for ``vae.pretrained_dir: auto``.

Where they are looked for, in order: the shared data folder (``$PATCHFLOW_SHARED_DATA/taesd``, by
default ``../shared/data/taesd``), then the data root's ``downloads/taef2``; when neither has them,
they are downloaded there from the pinned commit of madebyollin/taesd and checked against the pinned
SHA-256. Each file is written to a temporary name and renamed only once its hash matches, so a
failed or interrupted download leaves nothing behind. When nothing works (offline, say), the caller
trains a small VAE instead and the log says why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from data_shards.atomic import write_bytes_atomic

AUTO = "auto"
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
# madebyollin/taesd at the commit that added TAEF2 (2025-12-27); MIT licensed.
TAEF2_URL = "https://raw.githubusercontent.com/madebyollin/taesd/5cccb12dc72074a4be35680c3b108548a7c69978/"
TAEF2_SHA256 = {
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
DOWNLOAD_TIMEOUT_S = 30
log = logging.getLogger("patchflow.vae")


def shared_weights_dir() -> Path:
    return Path(os.environ.get("PATCHFLOW_SHARED_DATA", "../shared/data")).expanduser() / "taesd"


def has_taef2(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TAEF2_FILES)


def resolve_pretrained_dir(pretrained_dir: str | None, data_root: Path) -> Path | None:
    """The folder to load TAEF2 from, or None to train a small VAE.

    A path is returned as given (a missing file is then the loader's error, naming it); ``auto``
    searches, then downloads (once per process and data root), then gives up with a warning.
    """
    if pretrained_dir is None:
        return None
    if pretrained_dir != AUTO:
        return Path(pretrained_dir).expanduser()
    return _auto_weights(str(Path(data_root).resolve()))


@functools.lru_cache(maxsize=None)
def _auto_weights(data_root: str) -> Path | None:
    downloads = Path(data_root) / "downloads" / "taef2"
    for folder in (shared_weights_dir(), downloads):
        if has_taef2(folder):
            return folder
    problem = download_taef2(downloads)
    if problem is None:
        log.warning("vae: downloaded the TAEF2 weights to %s", downloads)
        return downloads
    log.warning("vae.pretrained_dir=auto: no TAEF2 weights in %s or %s, and the download failed (%s); training a "
                "small VAE instead (blurrier samples). Put taef2_encoder.pth and taef2_decoder.pth in either folder "
                "to use them.", shared_weights_dir(), downloads, problem)
    return None


def download_taef2(folder: Path) -> str | None:
    """Download the TAEF2 weights into ``folder``, each checked against its pinned SHA-256.

    Returns None on success, else what went wrong (nothing half-written is left behind).
    """
    for name in TAEF2_FILES:
        if (folder / name).is_file():
            continue
        url = TAEF2_URL + name
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        except OSError as exc:  # URLError, HTTPError, timeouts, resets
            return f"{url}: {exc}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != TAEF2_SHA256[name]:
            return f"{url}: SHA-256 {digest[:12]}… is not the pinned {TAEF2_SHA256[name][:12]}…"
        write_bytes_atomic(folder / name, data)
    return None

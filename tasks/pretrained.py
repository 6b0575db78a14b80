"""Finding the pretrained TAEF2 autoencoder weights for ``vae.pretrained_dir: auto``.

Where they are looked for, in order: the shared data folder (``$PATCHFLOW_SHARED_DATA/taesd``, by
default ``../shared/data/taesd``), then the data root's ``downloads/taef2``; when neither has them,
they are downloaded there from the pinned commit of madebyollin/taesd. Found and downloaded files
alike must match the pinned SHA-256; a download is renamed into place only once it does, so a failed
or interrupted download leaves nothing behind, and bytes that arrive whole but differ stop the run.
When the server cannot be reached (offline, say), the caller trains a small VAE instead and the log
and the VAE stage's metrics say so.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import urllib.request
from pathlib import Path

from data_shards.atomic import write_bytes_atomic
from data_shards.errors import BadInputError

AUTO = "auto"
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
# madebyollin/taesd at the commit that added TAEF2 (2025-12-27); MIT licensed.
TAEF2_URL = "https://raw.githubusercontent.com/madebyollin/taesd/5cccb12dc72074a4be35680c3b108548a7c69978/"
TAEF2_SHA256 = {
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
DOWNLOAD_TIMEOUT_S = 20  # per socket operation; the weights are 2.7 MB each
log = logging.getLogger("patchflow.vae")


def shared_weights_dir() -> Path:
    """``$PATCHFLOW_SHARED_DATA/taesd`` (an empty value counts as unset), else ``../shared/data/taesd``
    from the working directory, where the presets' other shared paths point too."""
    return Path(os.environ.get("PATCHFLOW_SHARED_DATA") or "../shared/data").expanduser() / "taesd"


def has_taef2(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TAEF2_FILES)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_mismatch(folder: Path) -> str | None:
    """The first weight file in ``folder`` whose SHA-256 is not the pinned one (a few MB each), or None."""
    for name in TAEF2_FILES:
        digest = _sha256(folder / name)
        if digest != TAEF2_SHA256[name]:
            return f"{folder / name}: SHA-256 {digest[:12]}… is not the pinned {TAEF2_SHA256[name][:12]}…"
    return None


def resolve_pretrained_dir(pretrained_dir: str | None, data_root: Path) -> Path | None:
    """The folder to load TAEF2 from, or None to train a small VAE.

    A path is returned as given (a missing file is then the loader's error, naming it; weights there
    are the user's choice, so they are not held to the pin); ``auto`` searches, then downloads (once
    per process and data root), then gives up with a warning.

    Raises:
        BadInputError: a download's bytes are not the pinned ones (corrupted, or changed upstream):
            never used, never silently replaced by a small VAE.
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
            problem = pinned_mismatch(folder)
            if problem is None:
                return folder
            log.warning("vae.pretrained_dir=auto: skipping %s (%s)", folder, problem)
    problem = download_taef2(downloads)
    if problem is None:
        log.warning("vae: downloaded the TAEF2 weights to %s", downloads)
        return downloads
    log.warning("vae.pretrained_dir=auto: no TAEF2 weights in %s or %s, and the download failed (%s); training a "
                "small VAE instead (blurrier samples). Put taef2_encoder.pth and taef2_decoder.pth in either folder "
                "to use them.", shared_weights_dir(), downloads, problem)
    return None


def download_taef2(folder: Path) -> str | None:
    """Download the TAEF2 weights into ``folder``, each checked against its pinned SHA-256 before it is
    renamed into place (nothing half-written is left behind).

    Returns:
        None on success, else why the server could not be reached or did not answer in full (the
        caller then trains a small VAE).

    Raises:
        BadInputError: the bytes arrived whole but are not the pinned ones.
    """
    for name in TAEF2_FILES:
        if (folder / name).is_file() and _sha256(folder / name) == TAEF2_SHA256[name]:
            continue
        url = TAEF2_URL + name
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset, cut short (IncompleteRead)
            return f"{url}: {exc!r}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != TAEF2_SHA256[name]:
            raise BadInputError(f"{url}: downloaded {len(data):,} bytes whose SHA-256 {digest[:12]}… is not the pinned "
                                f"{TAEF2_SHA256[name][:12]}…; nothing was written",
                                hint="the file changed upstream or was corrupted in transit: put the TAEF2 weights in "
                                     f"{folder} yourself, or set vae.pretrained_dir=null to train a small VAE")
        write_bytes_atomic(folder / name, data)
    return None

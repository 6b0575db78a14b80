"""``vae.pretrained_dir: auto``: TAEF2 weights found in the shared folder, downloaded (hash-checked)
from a real HTTP server on loopback, or, when neither works, a small VAE trained instead."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from pathlib import Path

import pytest

from data_shards.errors import BadInputError
from tasks import pretrained
from tests._shared_data import require_shared


@pytest.fixture
def taef2_bytes() -> dict[str, bytes]:
    """The real weight files (read before ``served`` points the shared folder elsewhere)."""
    return {name: (require_shared("taesd") / name).read_bytes() for name in pretrained.TAEF2_FILES}


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A loopback HTTP server over a folder; TAEF2_URL points at it. Yields (folder, request paths)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(pretrained, "TAEF2_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("PATCHFLOW_SHARED_DATA", str(tmp_path / "no-shared-data"))
    pretrained._auto_weights.cache_clear()
    yield folder, requests
    server.shutdown()
    pretrained._auto_weights.cache_clear()


def test_auto_finds_the_weights_in_the_shared_data_folder(tmp_path, monkeypatch):
    weights = require_shared("taesd")
    monkeypatch.setenv("PATCHFLOW_SHARED_DATA", str(weights.parent))
    pretrained._auto_weights.cache_clear()
    assert pretrained.resolve_pretrained_dir("auto", tmp_path) == weights
    assert pretrained.resolve_pretrained_dir(None, tmp_path) is None
    assert pretrained.resolve_pretrained_dir("~/elsewhere", tmp_path) == Path("~/elsewhere").expanduser()
    pretrained._auto_weights.cache_clear()


def test_auto_downloads_the_pinned_weights_once_into_the_data_root(taef2_bytes, served, tmp_path):
    folder, requests = served
    for name, data in taef2_bytes.items():
        (folder / name).write_bytes(data)
    root = tmp_path / "root"
    found = pretrained.resolve_pretrained_dir("auto", root)
    assert found == root.resolve() / "downloads" / "taef2" and pretrained.has_taef2(found)
    assert sorted(requests) == sorted(f"/{name}" for name in pretrained.TAEF2_FILES)
    pretrained._auto_weights.cache_clear()  # a new process: the downloaded files are found, not fetched again
    assert pretrained.resolve_pretrained_dir("auto", root) == found and len(requests) == 2


def test_a_download_whose_bytes_are_not_the_pinned_ones_stops_the_run_and_leaves_nothing(served, tmp_path):
    folder, _ = served
    for name in pretrained.TAEF2_FILES:
        (folder / name).write_bytes(b"not the weights")
    with pytest.raises(BadInputError, match=r"taef2_encoder.pth: downloaded 15 bytes whose SHA-256 .* is not the pinned "
                                            r"10a4e1021e89"):
        pretrained.resolve_pretrained_dir("auto", tmp_path)
    downloads = tmp_path / "downloads" / "taef2"
    assert not downloads.exists() or not any(downloads.iterdir())  # no file, no temporary left behind


def test_a_download_cut_short_falls_back_to_training_and_names_the_url(served, tmp_path, caplog, monkeypatch):
    class CutShort(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # promises 1 MB, sends 10 bytes, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"0123456789")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(pretrained, "TAEF2_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    try:
        with caplog.at_level(logging.WARNING, logger="patchflow.vae"):
            assert pretrained.resolve_pretrained_dir("auto", tmp_path) is None
    finally:
        server.shutdown()
    assert "IncompleteRead" in caplog.text and "training a small VAE instead" in caplog.text


def test_found_weights_that_are_not_the_pinned_ones_are_skipped(taef2_bytes, served, tmp_path, monkeypatch, caplog):
    folder, requests = served
    for name, data in taef2_bytes.items():
        (folder / name).write_bytes(data)
    shared = tmp_path / "shared"
    (shared / "taesd").mkdir(parents=True)
    for name, data in taef2_bytes.items():
        (shared / "taesd" / name).write_bytes(data[:-1] + b"x")  # one byte changed
    monkeypatch.setenv("PATCHFLOW_SHARED_DATA", str(shared))
    with caplog.at_level(logging.WARNING, logger="patchflow.vae"):
        found = pretrained.resolve_pretrained_dir("auto", tmp_path / "root")
    assert found == (tmp_path / "root").resolve() / "downloads" / "taef2" and len(requests) == 2
    assert f"skipping {shared / 'taesd'}" in caplog.text


def test_an_unreachable_server_is_named_and_the_run_trains_a_small_vae(served, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(pretrained, "TAEF2_URL", "http://127.0.0.1:9/")  # discard port: connection refused
    with caplog.at_level(logging.WARNING, logger="patchflow.vae"):
        assert pretrained.resolve_pretrained_dir("auto", tmp_path) is None
    assert "http://127.0.0.1:9/taef2_encoder.pth" in caplog.text

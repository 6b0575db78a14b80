"""Shards read over HTTP (a real server on a loopback port) and through ``pipe:`` commands give the
batches, resume positions and errors that the same shards give from disk; a connection dropped
mid-shard is retried, then named; a webdataset source served over HTTP shards like the same tars on disk."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from data_shards import loader, remote
from data_shards.loader import LoaderSpec, ShardError, evaluation_batches, split_shards, training_batches
from data_shards.samples import SourceError
from data_shards.sources import source_fingerprint
from tasks.config import SourceConfig
from tests.helpers import make_shards, manifest


class ShardServer:
    """``http.server`` over a folder in a thread; ``drops[name]`` requests for a file are answered with
    its full length announced and half of it sent, then the socket closed (a connection lost mid-shard)."""

    def __init__(self, folder: Path) -> None:
        self.drops: dict[str, int] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if server.drops.get(name, 0) > 0:
                    server.drops[name] -= 1
                    data = (folder / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("remote"), samples_per_shard=50)  # 200 train images in 4 shards


@pytest.fixture
def server(shards) -> Iterator[ShardServer]:
    loader._manifest_shards.cache_clear()  # each test's server has its own port, but be explicit
    with ShardServer(Path(shards.output_dir)) as running:
        yield running


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


@pytest.fixture(params=["cached", "streamed"])
def reading(request, monkeypatch):
    if request.param == "streamed":
        monkeypatch.setattr(loader.DECODED_CACHE, "budget_bytes", 0)
    return request.param


def _local_and_remote(shards, server: ShardServer, split: str = "train") -> tuple[tuple[str, ...], tuple[str, ...]]:
    local = split_shards(shards.manifest_path, split)
    return local, tuple(f"{server.url}/{Path(p).name}" for p in local)


def _batches(paths: tuple[str, ...], count: int, start_epoch: int = 0, skip: int = 0, **spec) -> list:
    spec = LoaderSpec(shard_paths=paths, batch_size=16, seed=3, shuffle_buffer=32, augment="crop_flip", **spec)
    stream = training_batches(spec, start_epoch, skip)
    return [next(stream) for _ in range(count)]


def _same(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs)
    for (epoch, index, batch), (their_epoch, their_index, their_batch) in zip(ours, theirs):
        assert (epoch, index) == (their_epoch, their_index)
        assert batch["key"] == their_batch["key"]
        assert torch.equal(batch["image"], their_batch["image"]) and torch.equal(batch["label"], their_batch["label"])


def test_http_shards_give_the_disk_batches_across_epochs_and_on_resume(shards, server, reading):
    local, urls = _local_and_remote(shards, server)
    from_disk = _batches(local, 30)  # 12 batches an epoch: into the third epoch
    _same(_batches(urls, 30), from_disk)
    _same(_batches(urls, 10, start_epoch=1, skip=5), from_disk[17:27])  # resumed at (epoch 1, batch 5)
    assert "manifest.json" in server.requests  # the counts came from the manifest beside the shards


def test_http_shards_split_across_ranks_and_workers_like_disk(shards, server):
    local, urls = _local_and_remote(shards, server)
    for rank in (0, 1):
        _same(_batches(urls, 6, rank=rank, world_size=2, num_workers=2),
              _batches(local, 6, rank=rank, world_size=2, num_workers=2))


def test_a_connection_dropped_mid_shard_is_retried_and_the_batches_are_unchanged(shards, server, reading, caplog):
    local, urls = _local_and_remote(shards, server)
    server.drops = {"train-000001.tar": 2, "train-000003.tar": 1}
    with caplog.at_level("WARNING", logger="patchflow.loader"):
        _same(_batches(urls, 12), _batches(local, 12))
    assert server.drops == {"train-000001.tar": 0, "train-000003.tar": 0}  # the drops happened
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert any("train-000001.tar" in m and "retry 2 of 3" in m for m in retries), retries


def test_a_shard_that_keeps_dropping_fails_naming_it_after_the_retries(shards, server, reading):
    _, urls = _local_and_remote(shards, server)
    server.drops = {"train-000002.tar": 100}
    with pytest.raises(ShardError, match=r"train-000002\.tar.*gave up after 4 attempts") as raised:
        _batches(urls, 12)
    assert server.requests.count("train-000002.tar") == remote.ATTEMPTS
    assert "reachable" in raised.value.hint


def test_a_missing_remote_shard_fails_at_once_naming_it(shards, server):
    _, urls = _local_and_remote(shards, server)
    gone = urls[0].replace("train-000000", "train-000009")
    with pytest.raises(ShardError, match=r"train-000009\.tar: not listed in .*/manifest\.json"):
        _batches((gone,), 1)
    with pytest.raises(ShardError, match=r"HTTP 404"):
        list(loader.read_shard(gone, expected=50))
    assert server.requests.count("train-000009.tar") == 1  # a 404 is not retried


def test_a_remote_folder_without_a_manifest_is_named_before_any_batch(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with ShardServer(tmp_path) as bare:
        with pytest.raises(ShardError, match=r"no readable manifest beside it .*manifest\.json.*404"):
            LoaderSpec(shard_paths=(f"{bare.url}/train-000000.tar",), batch_size=4) and _batches(
                (f"{bare.url}/train-000000.tar",), 1)


def test_pipe_commands_read_shards_and_their_manifest_like_disk(shards):
    local = split_shards(shards.manifest_path, "val")
    commands = tuple(f"pipe:cat {p}" for p in local)
    assert remote.sibling(commands[0], "manifest.json") == f"pipe:cat {Path(local[0]).parent / 'manifest.json'}"
    from_disk = list(evaluation_batches(LoaderSpec(shard_paths=local, batch_size=16)))
    piped = list(evaluation_batches(LoaderSpec(shard_paths=commands, batch_size=16)))
    assert [b["key"] for b in piped] == [b["key"] for b in from_disk]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(piped, from_disk, strict=True))
    with pytest.raises(ShardError, match="exited with code 1"):
        list(loader.read_shard(f"pipe:cat {local[0]} && false", expected=40))


def test_a_webdataset_source_over_http_shards_like_the_same_tars_on_disk(shards, tmp_path):
    folder = Path(shards.output_dir)  # patchflow's own shards are img2dataset-style tars (.png + .cls)
    on_disk = SourceConfig(kind="webdataset", path=str(folder))
    local = manifest(make_shards(tmp_path / "local", on_disk))["outputs"]["splits"]
    names = ",".join([*(f"train-{i:06d}" for i in range(4)), "val-000000", "test-000000"])
    with ShardServer(folder) as source_server:
        over_http = SourceConfig(kind="webdataset", path=f"{source_server.url}/{{{names}}}.tar")
        before = source_fingerprint(over_http, tmp_path)
        assert before.startswith("webdataset: 6 files")  # one HEAD per tar, nothing read
        source_server.drops = {"train-000001.tar": 1}  # dropped once while the stage reads it: retried
        fetched = manifest(make_shards(tmp_path / "remote", over_http))["outputs"]["splits"]
        assert source_server.drops == {"train-000001.tar": 0}
        stat = (folder / "val-000000.tar").stat()
        os.utime(folder / "val-000000.tar", (stat.st_atime, stat.st_mtime + 10))  # a newer version on the server
        assert source_fingerprint(over_http, tmp_path) != before  # so the next run shards it again
        with pytest.raises(SourceError, match="cannot list a folder"):
            make_shards(tmp_path / "bare", SourceConfig(kind="webdataset", path=f"{source_server.url}/"))
    for split in ("train", "val", "test"):  # byte-identical shards from the same samples
        assert [s["sha256"] for s in fetched[split]["shards"]] == [s["sha256"] for s in local[split]["shards"]]


def test_brace_patterns_expand_like_webdataset():
    assert remote.expand_braces("s3://b/p/train-{000008..000011}.tar") == [
        f"s3://b/p/train-{i:06d}.tar" for i in range(8, 12)]
    assert remote.expand_braces("https://h/{a,b}-{0..1}.tar") == ["https://h/a-0.tar", "https://h/a-1.tar",
                                                                  "https://h/b-0.tar", "https://h/b-1.tar"]

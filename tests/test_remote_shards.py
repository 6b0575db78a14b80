"""Shards read over HTTP (a real server on a loopback port) and through ``pipe:`` commands give the
batches, resume positions and errors that the same shards give from disk; a connection dropped
mid-shard is retried, then named; a webdataset source served over HTTP shards like the same tars on disk."""

from __future__ import annotations

import functools
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from data_shards import loader, remote
from data_shards.loader import LoaderSpec, ShardError, evaluation_batches, split_shards, training_batches
from data_shards.samples import SourceError
from data_shards.sources import source_fingerprint
from tasks.config import ShardConfig, SourceConfig
from tasks.index import image_members
from tasks.verify import verify_stage
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
            loader.ShardStream(LoaderSpec(shard_paths=(f"{bare.url}/train-000000.tar",), batch_size=4))


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


# ----------------------------------------------------------------------------- an S3-compatible store

@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) in its own process on a loopback port."""
    pytest.importorskip("s3fs", reason="s3fs is in the dev extra: pip install -e '.[dev]'")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, request) -> str:
    """A fresh bucket; s3fs (and so the shard stage and the loader) pointed at the server."""
    import boto3
    import fsspec
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    # What a user sets as FSSPEC_S3_ENDPOINT_URL (read when fsspec is imported, hence set here directly).
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


def _s3_names(prefix: str) -> list[str]:
    import s3fs

    return sorted(path.rsplit("/", 1)[-1] for path in s3fs.S3FileSystem().ls(prefix))


def test_the_shard_stage_writes_to_s3_and_training_reads_it_back_like_disk(bucket, tmp_path):
    on_disk = make_shards(tmp_path / "disk", samples_per_shard=50)
    uploaded = make_shards(tmp_path / "up", samples_per_shard=50, output=f"s3://{bucket}/shards/")
    location = manifest(uploaded)["outputs"]["location"]
    assert location == f"s3://{bucket}/shards/{Path(uploaded.output_dir).name}"  # under the stage's key
    assert not list(Path(uploaded.output_dir).glob("*.tar"))  # the stage folder keeps only the manifest
    disk_splits, s3_splits = manifest(on_disk)["outputs"]["splits"], manifest(uploaded)["outputs"]["splits"]
    listed = sorted(s["name"] for split in s3_splits.values() for s in split["shards"])
    assert _s3_names(location) == sorted([*listed, "manifest.json"])
    for split in ("train", "val", "test"):  # byte-identical shards, wherever they are
        assert [s["sha256"] for s in s3_splits[split]["shards"]] == [s["sha256"] for s in disk_splits[split]["shards"]]

    urls = split_shards(uploaded.manifest_path, "train")
    assert all(url.startswith(f"{location}/train-") for url in urls)
    loader._manifest_shards.cache_clear()
    _same(_batches(urls, 14), _batches(split_shards(on_disk.manifest_path, "train"), 14))
    _same(_batches(urls, 4, start_epoch=1, skip=3), _batches(split_shards(on_disk.manifest_path, "train"), 4, 1, 3))

    # What the index and the search service read from such shards: members' offsets, then a byte range.
    local_tar = split_shards(on_disk.manifest_path, "val")[0]
    s3_tar = split_shards(uploaded.manifest_path, "val")[0]
    members = image_members(s3_tar)
    assert members == image_members(local_tar)
    first = next(iter(members.values()))
    with open(local_tar, "rb") as handle:
        handle.seek(first["offset"])
        assert remote.read_range(s3_tar, first["offset"], first["size"]) == handle.read(first["size"])

    assert verify_stage(uploaded.output_dir) == []
    import s3fs

    s3fs.S3FileSystem().rm(f"{location}/manifest.json")
    assert verify_stage(uploaded.output_dir) == [f"{location}/manifest.json: missing (the uploaded shards were removed)"]


KILLED_MID_UPLOAD = """
import sys, time
from pathlib import Path
from data_shards import remote
from tests.helpers import make_shards

real_upload, marker = remote.upload, Path(sys.argv[2])
def upload(local, url):
    if marker.exists():  # two shards are up: hang in the third upload until the test kills this process
        time.sleep(600)
    real_upload(local, url)
    if url.endswith("train-000001.tar"):
        marker.write_text(url.rsplit("/", 1)[0])
remote.upload = upload
make_shards(Path(sys.argv[1]), samples_per_shard=50, output=sys.argv[3])
"""


def test_a_process_killed_mid_upload_leaves_no_finished_result_and_the_rerun_completes(bucket, s3_endpoint, tmp_path):
    output, marker = f"s3://{bucket}/shards", tmp_path / "two-shards-up"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}
    process = subprocess.Popen([sys.executable, "-c", KILLED_MID_UPLOAD, str(tmp_path / "root"), str(marker), output],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no upload within 120 s"
        time.sleep(0.1)
    process.kill()  # SIGKILL: no clean-up of any kind runs
    process.wait()

    prefix = marker.read_text()
    assert _s3_names(prefix) == ["train-000000.tar", "train-000001.tar"]  # no manifest: visibly unfinished
    assert not list((tmp_path / "root" / "stages" / "shard").glob("*/manifest.json"))  # nor a finished stage
    with pytest.raises(ShardError, match=r"no readable manifest beside it"):
        _batches((f"{prefix}/train-000000.tar",), 1)

    rerun = make_shards(tmp_path / "root", samples_per_shard=50, output=output)
    assert manifest(rerun)["outputs"]["location"] == prefix  # the same key, so the same prefix, now complete
    assert "manifest.json" in _s3_names(prefix)
    loader._manifest_shards.cache_clear()
    assert len(_batches(split_shards(rerun.manifest_path, "train"), 12)) == 12


def test_an_http_shard_output_is_refused_when_the_config_loads():
    with pytest.raises(ValueError, match="not an object-store prefix"):
        ShardConfig(output="https://host/shards")


def test_a_webdataset_source_in_an_s3_prefix_is_listed_and_sharded_like_disk(bucket, shards, tmp_path):
    import s3fs

    folder = Path(shards.output_dir)
    store = s3fs.S3FileSystem()
    for tar in sorted(folder.glob("*.tar")):
        store.put_file(str(tar), f"{bucket}/img2dataset/{tar.name}")
    store.put_file(str(folder / "manifest.json"), f"{bucket}/img2dataset/manifest.json")  # not a tar: not listed
    in_s3 = SourceConfig(kind="webdataset", path=f"s3://{bucket}/img2dataset")
    assert source_fingerprint(in_s3, tmp_path).startswith("webdataset: 6 files")
    fetched = manifest(make_shards(tmp_path / "s3", in_s3))["outputs"]["splits"]
    local = manifest(make_shards(tmp_path / "disk", SourceConfig(kind="webdataset", path=str(folder))))["outputs"]["splits"]
    assert {k: [s["sha256"] for s in v["shards"]] for k, v in fetched.items()} == \
        {k: [s["sha256"] for s in v["shards"]] for k, v in local.items()}


def test_a_missing_bucket_is_named_before_any_image_is_encoded(bucket, tmp_path, monkeypatch):
    from data_shards import writer
    from data_shards.errors import BadInputError

    encoded = []
    monkeypatch.setattr(writer, "encode_sample", lambda sample: encoded.append(sample))
    with pytest.raises(BadInputError, match=r"bucket 'no-such-bucket' does not exist") as raised:
        make_shards(tmp_path, samples_per_shard=50, output="s3://no-such-bucket/shards")
    assert "create the bucket" in raised.value.hint
    assert not encoded and not (tmp_path / "stages").exists()

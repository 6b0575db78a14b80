import gzip
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import writer
from data_shards.atomic import sha256_file
from data_shards.samples import RawSample, SourceError
from tasks.config import SourceConfig
from tests._shared_data import require_shared
from tests.helpers import fashion_source, make_shards, manifest


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def test_fashion_mnist_subset_shards_with_verified_manifest(tmp_path):
    result = make_shards(tmp_path)
    info = manifest(result)["outputs"]
    assert {s: info["splits"][s]["num_samples"] for s in info["splits"]} == {"train": 200, "val": 40, "test": 40}
    assert info["classes"][0] == "T-shirt/top"
    for split in info["splits"].values():
        assert split["image_size"] == [28, 28] and split["channels"] == 1
        assert sum(split["class_histogram"].values()) == split["num_samples"]
        assert sum(s["samples"] for s in split["shards"]) == split["num_samples"]
        for shard in split["shards"]:
            path = Path(result.output_dir) / shard["name"]
            assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
    members = _members(Path(result.output_dir) / "train-000000.tar")
    keys = {name.split(".")[0] for name in members}
    assert len(keys) == 50
    some_key = sorted(keys)[0]
    assert Image.open(io.BytesIO(members[f"{some_key}.png"])).size == (28, 28)
    assert 0 <= int(members[f"{some_key}.cls"]) < 10


def test_same_input_gives_byte_identical_shards(tmp_path):
    first, second = make_shards(tmp_path / "a"), make_shards(tmp_path / "b")
    names = sorted(p.name for p in Path(first.output_dir).glob("*.tar"))
    assert names == sorted(p.name for p in Path(second.output_dir).glob("*.tar"))
    for name in names:
        assert (Path(first.output_dir) / name).read_bytes() == (Path(second.output_dir) / name).read_bytes()
    assert first.digest == second.digest


def test_rerun_with_same_config_does_no_work(tmp_path, monkeypatch):
    first = make_shards(tmp_path)
    # Patch the name where tasks/shard.py looks it up: it imported write_split before any patch.
    monkeypatch.setattr("tasks.shard.write_split", lambda *a, **k: pytest.fail("re-run wrote shards"))
    again = make_shards(tmp_path)
    assert again.reused and again.output_dir == first.output_dir


def test_changed_config_gets_a_new_folder(tmp_path):
    assert make_shards(tmp_path).output_dir != make_shards(tmp_path, samples_per_shard=30).output_dir


def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    real_write = writer.write_split
    calls = []

    def write_then_die(*args, **kwargs):
        calls.append(real_write(*args, **kwargs))
        raise KeyboardInterrupt("killed mid-stage")

    monkeypatch.setattr("tasks.shard.write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_shards(tmp_path)
    assert calls, "the first split was written before the interruption"
    stage_root = tmp_path / "stages" / "shard"
    assert not list(stage_root.rglob("*.tar")) and not list(stage_root.rglob("manifest.json"))


def test_caption_table_shards_with_captions(tmp_path):
    table = require_shared("emoji-captions/twemoji")
    source = SourceConfig(kind="caption_table", path=str(table), caption_template="an emoji of {caption}",
                          label_column="group", max_train=60, max_val=20)
    result = make_shards(tmp_path, source)
    info = manifest(result)["outputs"]
    assert info["splits"]["train"]["num_samples"] == 60 and info["splits"]["train"]["has_captions"]
    assert info["splits"]["train"]["image_size"] == [72, 72] and info["splits"]["train"]["channels"] == 3
    members = _members(next(Path(result.output_dir).glob("train-*.tar")))
    captions = [v.decode() for k, v in members.items() if k.endswith(".txt")]
    assert captions and all(c.startswith("an emoji of ") for c in captions)
    image = Image.open(io.BytesIO(next(v for k, v in members.items() if k.endswith(".png"))))
    assert image.mode == "RGB"  # palette/alpha emoji flattened onto white


def test_image_folder_zip_and_webdataset_source(tmp_path):
    cifar = require_shared("cifar10-jpeg/cifar10-jpeg.zip")
    result = make_shards(tmp_path / "c", SourceConfig(kind="image_folder", path=str(cifar), max_train=40, max_val=10, max_test=10))
    info = manifest(result)["outputs"]
    assert len(info["classes"]) == 10 and info["splits"]["test"]["num_samples"] == 10
    assert info["splits"]["train"]["image_size"] == [32, 32]
    # Those shards are img2dataset-style (.jpg + .cls + .json): read them back as a source.
    again = make_shards(tmp_path / "w", SourceConfig(kind="webdataset", path=result.output_dir))
    assert manifest(again)["outputs"]["splits"]["train"]["num_samples"] == 40


def test_bad_idx_magic_names_the_file(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    shared = require_shared("fashion-mnist")
    for name in ["train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]:
        (folder / name).write_bytes((shared / name).read_bytes())
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write((1234).to_bytes(4, "big") + bytes(100))
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic number 1234"):
        make_shards(tmp_path / "out", SourceConfig(kind="fashion_mnist", path=str(folder)))
    assert not (tmp_path / "out" / "stages").exists()


def test_missing_source_path_is_named(tmp_path):
    with pytest.raises(SourceError, match="does-not-exist: Fashion-MNIST folder does not exist"):
        make_shards(tmp_path, SourceConfig(kind="fashion_mnist", path=str(tmp_path / "does-not-exist")))


def _caption_table(tmp_path: Path, rows: list[str], header: str = "file\tname") -> Path:
    folder = tmp_path / "table"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "images" / "good.png")
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "captions.tsv").write_text("\n".join([header, *rows]) + "\n")
    return folder


def test_caption_table_missing_column_is_named(tmp_path):
    folder = _caption_table(tmp_path, ["good.png\tx"], header="file\ttitle")
    with pytest.raises(SourceError, match=r"captions\.tsv: missing column\(s\) \['name'\]"):
        make_shards(tmp_path / "out", SourceConfig(kind="caption_table", path=str(folder), val_fraction=0.0))


def test_undecodable_image_names_the_row_before_any_shard(tmp_path, monkeypatch):
    folder = _caption_table(tmp_path, ["good.png\ta", "broken.png\tb"])
    monkeypatch.setattr("tasks.shard.write_split", lambda *a, **k: pytest.fail("a shard was written before the check"))
    with pytest.raises(SourceError, match=r"captions\.tsv line 3 \(broken\.png\): image does not decode"):
        make_shards(tmp_path / "out", SourceConfig(kind="caption_table", path=str(folder), val_fraction=0.0))


def test_missing_image_file_names_the_row(tmp_path):
    folder = _caption_table(tmp_path, ["good.png\ta", "absent.png\tb"])
    with pytest.raises(SourceError, match=r"line 3: image 'absent\.png' not found"):
        make_shards(tmp_path / "out", SourceConfig(kind="caption_table", path=str(folder), val_fraction=0.0))


def test_large_split_uses_the_process_pool_with_identical_bytes(tmp_path, monkeypatch):
    source = fashion_source(max_train=4400, max_val=10, max_test=10)
    pooled = make_shards(tmp_path / "pool", source, samples_per_shard=2000, workers=2)
    monkeypatch.setattr(writer, "POOL_THRESHOLD", 10**9)
    serial = make_shards(tmp_path / "serial", source, samples_per_shard=2000, workers=2)
    assert pooled.digest == serial.digest


def _sees_the_parents_marker() -> bool:
    """Run in a pool worker: only a forked child carries state the parent set after importing the writer."""
    return getattr(sys.modules.get("data_shards.writer"), "PARENT_ONLY_MARKER", False)


def test_encoder_pool_is_not_forked_and_matches_the_serial_path(monkeypatch):
    # Forking a process that runs Prefect is unsafe; the pool must start clean processes.
    assert writer.pool_context().get_start_method() in ("forkserver", "spawn")
    monkeypatch.setattr(writer, "PARENT_ONLY_MARKER", True, raising=False)
    with writer.pool_context().Pool(2) as pool:
        assert pool.apply(_sees_the_parents_marker) is False
    rng = np.random.default_rng(0)
    samples = [RawSample(key=f"s{i:03d}", origin=f"test #{i}", pixels=rng.integers(0, 256, (28, 28), dtype=np.uint8),
                         label=i % 10) for i in range(40)]
    serial = writer.encode_all(samples, workers=2)  # below the threshold: in this process
    monkeypatch.setattr(writer, "POOL_THRESHOLD", 1)
    assert writer.encode_all(samples, workers=2) == serial


def test_missing_caption_cell_is_empty_not_the_text_none(tmp_path):
    from data_shards.sources import open_source

    # Row 3 stops after the file name: csv gives None for its caption (and group) cells.
    folder = _caption_table(tmp_path, ["good.png\ta\tshapes", "good.png"], header="file\tname\tgroup")
    with pytest.raises(SourceError, match=r"captions\.tsv line 3: empty caption in column 'name'"):
        open_source(SourceConfig(kind="caption_table", path=str(folder), val_fraction=0.0), tmp_path)
    kept = open_source(SourceConfig(kind="caption_table", path=str(folder), val_fraction=0.0, empty_captions="keep",
                                    caption_template="{caption} | {group}"), tmp_path)
    assert sorted(s.caption for s in kept.splits["train"]) == [" | ", "a | shapes"]

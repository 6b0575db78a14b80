import io
import logging
import shutil
import tarfile
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch

from data_shards.loader import LoaderSpec, ShardError, epoch_loader, evaluation_batches, split_shards, training_batches
from tests.helpers import make_shards, manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), samples_per_shard=25)  # train: 8 shards of 25


def _spec(result, split="train", **kw) -> LoaderSpec:
    return LoaderSpec(shard_paths=split_shards(result.manifest_path, split), batch_size=kw.pop("batch_size", 10), **kw)


def _keys_seen(spec: LoaderSpec, epoch: int = 0) -> list[str]:
    return [k for batch in epoch_loader(spec, epoch) for k in batch["key"]]


@pytest.mark.parametrize("samples_per_shard", [25, 100])  # 8 shards ≥ 4 slots, then 2 shards < 4 slots
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_split(tmp_path, samples_per_shard):
    result = make_shards(tmp_path, samples_per_shard=samples_per_shard)
    seen = [
        _keys_seen(_spec(result, rank=rank, world_size=2, num_workers=2, batch_size=5, drop_last=False))
        for rank in range(2)
    ]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 200 == len(set(seen[0]) | set(seen[1]))


def test_batches_are_decoded_normalised_tensors(shards):
    batch = next(iter(epoch_loader(_spec(shards, mean=(0.286,), std=(0.353,)), 0)))
    assert batch["image"].shape == (10, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (10,) and 0 <= int(batch["label"].min()) and int(batch["label"].max()) < 10
    resized = next(iter(epoch_loader(_spec(shards, image_size=32, augment="crop_flip"), 0)))
    assert resized["image"].shape == (10, 1, 32, 32)


def test_shuffle_is_deterministic_per_seed_and_epoch(shards):
    spec = _spec(shards, shuffle_buffer=50)
    assert _keys_seen(spec, 0) == _keys_seen(spec, 0)
    assert _keys_seen(spec, 0) != _keys_seen(spec, 1)
    assert _keys_seen(spec, 0) != _keys_seen(replace(spec, seed=1), 0)
    assert sorted(_keys_seen(spec, 0)) == sorted(_keys_seen(spec, 1))


def test_training_stream_resumes_at_a_saved_position(shards):
    spec = _spec(shards, num_workers=2)
    full = [(e, i, b["key"]) for e, i, b in islice(training_batches(spec), 45)]  # crosses epoch ends
    epoch, index, _ = full[30]
    resumed = [(e, i, b["key"]) for e, i, b in islice(training_batches(spec, start_epoch=epoch, skip_batches=index), 15)]
    assert resumed == full[30:]


def test_evaluation_pass_is_ordered_and_complete(shards):
    keys = [k for b in evaluation_batches(_spec(shards, "val", batch_size=16)) for k in b["key"]]
    assert len(keys) == 40 == len(set(keys))
    assert keys == [k for b in evaluation_batches(_spec(shards, "val", batch_size=16)) for k in b["key"]]


def _copy_shards(result, tmp_path) -> list[Path]:
    paths = [Path(p) for p in split_shards(result.manifest_path, "train")]
    copies = []
    for path in paths:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    return copies


def test_truncated_shard_is_named(shards, tmp_path):
    copies = _copy_shards(shards, tmp_path)
    data = copies[3].read_bytes()
    copies[3].write_bytes(data[: len(data) // 2 + 100])
    spec = LoaderSpec(shard_paths=tuple(map(str, copies)), batch_size=10, shuffle=False)
    with pytest.raises(ShardError, match=r"train-000003\.tar: corrupt or truncated tar"):
        list(epoch_loader(spec, 0))


def _corrupt_one_image(path: Path) -> str:
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive if m.isfile()]
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(path, "w") as archive:
        for member, payload in members:
            payload = b"garbage, not a png" if member.name == victim else payload
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    return victim.split(".")[0]


def test_undecodable_image_is_named_or_skipped_and_counted(shards, tmp_path, caplog):
    copies = _copy_shards(shards, tmp_path)
    bad_key = _corrupt_one_image(copies[2])
    spec = LoaderSpec(shard_paths=tuple(map(str, copies)), batch_size=10, shuffle=False, drop_last=False)
    with pytest.raises(ShardError, match=rf"train-000002\.tar key '{bad_key}': cannot decode image"):
        list(epoch_loader(spec, 0))
    with caplog.at_level(logging.WARNING, logger="patchflow.loader"):
        keys = [k for b in epoch_loader(replace(spec, on_error="skip"), 0) for k in b["key"]]
    assert len(keys) == 199 and bad_key not in keys
    assert "1 skipped" in caplog.text and bad_key in caplog.text


def test_manifest_split_lookup_names_missing_split(shards):
    with pytest.raises(KeyError, match="no split 'bogus'"):
        split_shards(shards.manifest_path, "bogus")
    assert manifest(shards)["outputs"]["splits"]["train"]["num_samples"] == 200

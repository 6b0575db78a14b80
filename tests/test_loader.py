import io
import logging
import shutil
import tarfile
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch

from PIL import Image

from torchvision.transforms import v2

from data_shards import loader
from data_shards.loader import LoaderSpec, ShardError, epoch_loader, evaluation_batches, split_shards, training_batches
from tasks.config import SourceConfig
from tests.helpers import make_shards, manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), samples_per_shard=25)  # train: 8 shards of 25


@pytest.fixture(params=["cached", "streamed"])
def reading(request, monkeypatch):
    """Both ways the loader reads: shards decoded once into this process's cache, or streamed from the
    tars through worker processes (what a dataset larger than the cache gets)."""
    if request.param == "streamed":
        monkeypatch.setattr(loader.DECODED_CACHE, "budget_bytes", 0)
    return request.param


def _spec(result, split="train", **kw) -> LoaderSpec:
    return LoaderSpec(shard_paths=split_shards(result.manifest_path, split), batch_size=kw.pop("batch_size", 10), **kw)


def _keys_seen(spec: LoaderSpec, epoch: int = 0) -> list[str]:
    return [k for batch in epoch_loader(spec, epoch) for k in batch["key"]]


@pytest.mark.parametrize("samples_per_shard", [25, 100])  # 8 shards ≥ 4 slots, then 2 shards < 4 slots
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_split(tmp_path, samples_per_shard, reading):
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
    raw = next(iter(epoch_loader(_spec(shards, mean=(0.0,), std=(1.0,)), 0)))
    assert batch["key"] == raw["key"] and torch.allclose(batch["image"], (raw["image"] - 0.286) / 0.353, atol=1e-6)
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
    """The train shards and their manifest, copied where a test may damage them."""
    paths = [Path(p) for p in split_shards(result.manifest_path, "train")]
    shutil.copy(result.manifest_path, tmp_path / "manifest.json")
    copies = []
    for path in paths:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
        copies[-1].chmod(0o644)
    return copies


def _member_offsets(path: Path) -> list[tuple[str, int]]:
    """(member name, offset of its 512-byte header) for every member of a tar."""
    with tarfile.open(path) as archive:
        return [(member.name, member.offset) for member in archive]


def _all_samples(spec: LoaderSpec) -> list[str]:
    return [k for b in epoch_loader(spec, 0) for k in b["key"]]


def test_truncated_shard_is_named(shards, tmp_path, reading):
    copies = _copy_shards(shards, tmp_path)
    _, offset = _member_offsets(copies[3])[20]
    copies[3].write_bytes(copies[3].read_bytes()[: offset + 512 + 100])  # cut inside a member's payload
    spec = LoaderSpec(shard_paths=tuple(map(str, copies)), batch_size=10, shuffle=False)
    with pytest.raises(ShardError, match=r"train-000003\.tar: corrupt or truncated tar"):
        list(epoch_loader(spec, 0))


def test_shard_cut_at_a_member_boundary_is_an_error_not_a_shorter_epoch(shards, tmp_path, reading):
    copies = _copy_shards(shards, tmp_path)
    members = _member_offsets(copies[5])
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    cut = next(offset for name, offset in members if name.startswith(keys[12] + "."))  # 12 whole samples remain
    copies[5].write_bytes(copies[5].read_bytes()[:cut] + b"\0" * 1024)
    spec = LoaderSpec(shard_paths=tuple(map(str, copies)), batch_size=10, shuffle=False, drop_last=False)
    with pytest.raises(ShardError, match=r"train-000005\.tar: the manifest lists 25 samples but the tar ends after 12"):
        _all_samples(spec)


def test_damaged_header_mid_shard_is_an_error(shards, tmp_path, reading):
    copies = _copy_shards(shards, tmp_path)
    members = _member_offsets(copies[1])
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    offset = next(offset for name, offset in members if name.startswith(keys[15] + "."))
    data = bytearray(copies[1].read_bytes())
    data[offset:offset + 512] = b"\xff" * 512  # tarfile takes an unreadable header mid-file for the end
    copies[1].write_bytes(bytes(data))
    spec = LoaderSpec(shard_paths=tuple(map(str, copies)), batch_size=10, num_workers=2, drop_last=False)
    with pytest.raises(ShardError, match=r"train-000001\.tar: .*lists 25 samples but the tar ends after 15"):
        _all_samples(spec)
    # the same cut in training mode, spread over two ranks, still fails on the rank that reads it
    ranks = [LoaderSpec(shard_paths=spec.shard_paths, batch_size=10, rank=r, world_size=2) for r in range(2)]
    with pytest.raises(ShardError, match="train-000001"):
        for rank_spec in ranks:
            _all_samples(rank_spec)


def test_shards_without_a_manifest_are_refused_before_reading(shards, tmp_path):
    copies = _copy_shards(shards, tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"train-000000\.tar: no readable manifest"):
        epoch_loader(LoaderSpec(shard_paths=tuple(map(str, copies)), batch_size=10), 0)


@pytest.mark.parametrize("world_size,workers", [(2, 1), (3, 2)])
def test_every_rank_gets_the_same_number_of_samples_and_batches(shards, world_size, workers, reading):
    # 200 samples in 8 shards of 25: whole shards dealt to 3 ranks would give them 75, 75 and 50.
    per_rank = [_keys_seen(_spec(shards, rank=r, world_size=world_size, num_workers=workers, batch_size=1))
                for r in range(world_size)]
    assert {len(keys) for keys in per_rank} == {200 // world_size}
    assert len(set().union(*per_rank)) == 200 // world_size * world_size
    positions = [[(e, i) for e, i, _ in islice(training_batches(_spec(shards, rank=r, world_size=world_size)), 25)]
                 for r in range(world_size)]
    assert all(p == positions[0] for p in positions)  # epochs end at the same batch on every rank


def test_cached_shards_give_the_streamed_batches_and_are_decoded_once(shards, monkeypatch):
    spec = _spec(shards, augment="crop_flip", shuffle_buffer=40, batch_size=16)
    monkeypatch.setattr(loader, "DECODED_CACHE", loader.DecodedShards(2**30))  # empty: earlier tests filled the shared one
    assert loader.in_memory(spec)
    reads = []
    real_read = loader.read_shard
    monkeypatch.setattr(loader, "read_shard", lambda path, *a, **kw: (reads.append(path), real_read(path, *a, **kw))[1])
    cached = [list(epoch_loader(spec, epoch)) for epoch in (0, 1)]
    assert sorted(reads) == sorted(spec.shard_paths)  # every shard read once, over two epochs
    monkeypatch.setattr(loader.DECODED_CACHE, "budget_bytes", 0)
    streamed = [list(epoch_loader(spec, epoch)) for epoch in (0, 1)]
    assert len(reads) == 3 * len(spec.shard_paths)
    for ours, theirs in zip(sum(cached, []), sum(streamed, []), strict=True):
        assert ours["key"] == theirs["key"] and torch.equal(ours["image"], theirs["image"])


def test_decoded_cache_stays_within_its_budget_evicting_the_oldest_shard(shards):
    paths = split_shards(shards.manifest_path, "train")[:3]
    one_shard = 25 * 28 * 28  # 25 grey 28 x 28 images a shard
    cache = loader.DecodedShards(budget_bytes=2 * one_shard)
    first = cache.get(paths[0], 25, 1)
    assert cache.get(paths[0], 25, 1) is first  # a hit, not a second decode
    cache.get(paths[1], 25, 1)
    cache.get(paths[2], 25, 1)
    assert cache.bytes == 2 * one_shard and [key[0] for key in cache.entries] == [paths[1], paths[2]]
    assert cache.get(paths[0], 25, 1) is not first  # evicted, so decoded again


def test_batched_crop_is_torchvision_resized_crop_of_each_sample():
    generator = torch.Generator().manual_seed(0)
    for height, width in ((28, 28), (24, 32)):
        images = torch.rand(48, 3, height, width)
        boxes = loader.random_resized_crop_boxes(48, height, width, (0.2, 1.0), generator=generator)
        flips = torch.rand(48, generator=generator) < 0.5
        batch = loader.resized_crop_batch(images, boxes, (height, width), flips)
        for image, (top, left, box_h, box_w), flip, out in zip(images, boxes.tolist(), flips, batch):
            expected = v2.functional.resized_crop(image, top, left, box_h, box_w, [height, width], antialias=True)
            torch.testing.assert_close(out, expected.flip(-1) if flip else expected, atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop_get_params():
    """MAE's crop: area fraction in scale, aspect ratio 3/4-4/3, inside the image, and drawn with the
    same distribution as torchvision's RandomResizedCrop (compared on the mean and spread of the area)."""
    boxes = loader.random_resized_crop_boxes(4000, 28, 28, (0.2, 1.0), generator=torch.Generator().manual_seed(1))
    top, left, box_h, box_w = boxes.T.float()
    area = box_h * box_w / 28**2
    assert (top >= 0).all() and (left >= 0).all() and (top + box_h <= 28).all() and (left + box_w <= 28).all()
    assert area.min() >= 0.17 and area.max() <= 1.0  # 0.2 before rounding the sides to whole pixels
    assert (box_w / box_h).min() >= 0.7 and (box_w / box_h).max() <= 1.45
    torch.manual_seed(1)
    reference = torch.tensor([v2.RandomResizedCrop.get_params(torch.zeros(1, 28, 28), [0.2, 1.0], [3 / 4, 4 / 3])
                              for _ in range(4000)], dtype=torch.float)
    reference_area = reference[:, 2] * reference[:, 3] / 28**2
    assert area.mean() == pytest.approx(float(reference_area.mean()), abs=0.015)
    assert area.std() == pytest.approx(float(reference_area.std()), abs=0.015)
    assert top.mean() == pytest.approx(float(reference[:, 0].mean()), abs=0.3)


def test_augmentation_is_reproducible_and_leaves_the_global_rng_alone(shards):
    spec = _spec(shards, augment="crop_flip", image_size=32, shuffle_buffer=1, crop_scale=(0.2, 1.0))
    first, again = next(iter(epoch_loader(spec, 0))), next(iter(epoch_loader(spec, 0)))
    assert torch.equal(first["image"], again["image"]) and first["key"] == again["key"]
    plain = next(iter(epoch_loader(replace(spec, augment="none"), 0)))
    assert first["key"] == plain["key"] and not torch.equal(first["image"], plain["image"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    next(iter(epoch_loader(spec, 0)))
    assert torch.equal(torch.rand(1), before)  # augmentation leaves the model's random stream alone


def _class_sorted_folder(root: Path, classes: int = 10, per_class: int = 30) -> Path:
    """An image folder laid out train/<class>/*.png, as torchvision's ImageFolder expects."""
    for label in range(classes):
        folder = root / "train" / f"class{label:02d}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.new("L", (8, 8), color=label * 20 + index % 7).save(folder / f"{index:03d}.png")
    return root


def test_image_folder_shards_and_batches_mix_the_classes(tmp_path):
    folder = _class_sorted_folder(tmp_path / "images")
    result = make_shards(tmp_path / "root", SourceConfig(kind="image_folder", path=str(folder), val_fraction=0.0),
                         samples_per_shard=30)
    shards_info = manifest(result)["outputs"]["splits"]["train"]["shards"]
    assert len(shards_info) == 10
    labels_per_shard = []
    for shard in shards_info:
        with tarfile.open(Path(result.output_dir) / shard["name"]) as archive:
            labels_per_shard.append({archive.extractfile(m).read() for m in archive if m.name.endswith(".cls")})
    assert min(len(labels) for labels in labels_per_shard) >= 7  # not one class per shard
    spec = _spec(result, batch_size=32, shuffle_buffer=8)  # a buffer far smaller than the split, as at scale
    batch = next(iter(epoch_loader(spec, 0)))
    assert len(set(batch["label"].tolist())) >= 8


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


def test_undecodable_image_is_named_or_skipped_and_counted(shards, tmp_path, caplog, reading):
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

"""Frozen-feature evaluation: feature extraction and the kNN / logistic / BN-linear probes.

The probes are checked on synthetic Gaussian blobs whose answer is known: well-separated class
means are linearly separable (every probe near 100%), and labels shuffled independently of the
features leave nothing to learn (every probe near chance, 1/10).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.vit import VisionTransformer
from tasks.features import extract_features, load_features, save_features
from tasks.probes import (
    DEFAULT_CS,
    bn_linear_probe,
    check_labels,
    knn_accuracy,
    knn_class_scores,
    knn_classify,
    logistic_regression_probe,
    top_k_accuracy,
)

NUM_CLASSES = 10
DIM = 64


def _blobs(rng: np.random.Generator, means: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(means), size)
    features = means[labels] + rng.normal(size=(size, means.shape[1]))  # unit noise per dim
    return features.astype(np.float32), labels


@pytest.fixture(scope="module")
def blobs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train/val/test splits of 10 Gaussian blobs in 64-D; means ~11 noise-sigmas apart."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(NUM_CLASSES, DIM))
    return {"train": _blobs(rng, means, 2000), "val": _blobs(rng, means, 500), "test": _blobs(rng, means, 1000)}


def _splits(blobs, train_y=None, val_y=None):
    (train_x, true_train_y), (val_x, true_val_y), (test_x, test_y) = blobs["train"], blobs["val"], blobs["test"]
    train_y = true_train_y if train_y is None else train_y
    val_y = true_val_y if val_y is None else val_y
    return train_x, train_y, val_x, val_y, test_x, test_y


# ----------------------------------------------------------------------------- probes: known answers


def test_every_probe_separates_separable_blobs(blobs):
    logistic = logistic_regression_probe(*_splits(blobs))
    bn_linear = bn_linear_probe(*_splits(blobs), epochs=20)
    knn = knn_accuracy(*blobs["train"], *blobs["test"])
    for name, result in [("logistic", logistic), ("bn_linear", bn_linear), ("knn", knn)]:
        assert result["top1"] >= 0.98, (name, result)
        assert result["top5"] >= result["top1"], (name, result)  # 10 classes, so top-5 is reported
    assert logistic["best_C"] in DEFAULT_CS and logistic["val_top1"] >= 0.98
    assert 1 <= bn_linear["best_epoch"] <= 20 and bn_linear["val_top1"] >= 0.98


def test_shuffled_labels_leave_probes_at_chance(blobs):
    # Shuffle val too: with true val labels, choosing C or the epoch on val would let real label
    # information back in through model selection (it does: up to ~0.19 on some seeds).
    rng = np.random.default_rng(1)
    train_y = rng.permutation(blobs["train"][1])
    val_y = rng.permutation(blobs["val"][1])
    logistic = logistic_regression_probe(*_splits(blobs, train_y, val_y))
    bn_linear = bn_linear_probe(*_splits(blobs, train_y, val_y), epochs=20)
    knn = knn_accuracy(blobs["train"][0], train_y, *blobs["test"])
    for name, result in [("logistic", logistic), ("bn_linear", bn_linear), ("knn", knn)]:
        assert result["top1"] < 0.2, (name, result)


def test_bn_linear_probe_is_seeded_and_restores_thread_count(blobs):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # a count the probe's single-threaded section does not use itself
    try:
        first = bn_linear_probe(*_splits(blobs), epochs=3, seed=7)
        second = bn_linear_probe(*_splits(blobs), epochs=3, seed=7)
        assert first == second
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_logistic_probe_refit_on_train_val_runs(blobs):
    result = logistic_regression_probe(*_splits(blobs), Cs=(0.01, 1.0), refit_on_train_val=True)
    assert result["best_C"] in (0.01, 1.0) and result["top1"] >= 0.98


# ----------------------------------------------------------------------------- kNN behaviour


def test_knn_with_k1_on_its_own_training_set_returns_training_labels(blobs):
    train_x, train_y = blobs["train"]
    predicted = knn_classify(train_x, train_y, train_x, k=1)
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, train_y)


def test_knn_temperature_trades_nearest_neighbour_against_majority():
    # Query along the x axis; one class-0 neighbour almost on it (cos ~ 1.0), two class-1 neighbours
    # 0.6 rad away (cos ~ 0.83). Sharp weights let the near one win; flat weights count heads.
    angles = np.array([0.01, 0.6, -0.6])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 1, 1])
    query = np.array([[5.0, 0.0]], dtype=np.float32)  # length does not matter: cosine similarity
    assert knn_classify(train, labels, query, k=3, temperature=0.07)[0] == 0
    assert knn_classify(train, labels, query, k=3, temperature=10.0)[0] == 1
    # k beyond the training set is clamped, and a tiny temperature does not overflow.
    scores = knn_class_scores(train, labels, query, k=50, temperature=1e-4)
    assert np.isfinite(scores).all() and scores.shape == (1, 2)


def test_knn_scores_are_batched_consistently(blobs):
    train_x, train_y = blobs["train"]
    test_x, _ = blobs["test"]
    whole = knn_class_scores(train_x, train_y, test_x[:300], batch_size=1024)
    chunked = knn_class_scores(train_x, train_y, test_x[:300], batch_size=7)
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)


def test_knn_accuracy_reports_top5_only_with_more_than_five_classes(blobs):
    (train_x, train_y), (test_x, test_y) = blobs["train"], blobs["test"]
    keep_train, keep_test = train_y < 5, test_y < 5
    result = knn_accuracy(train_x[keep_train], train_y[keep_train], test_x[keep_test], test_y[keep_test])
    assert set(result) == {"top1"}


# ----------------------------------------------------------------------------- helpers


def test_top_k_accuracy():
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 2])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(1.0)
    assert top_k_accuracy(scores, labels, 10) == 1.0  # k beyond the class count


def test_check_labels_names_the_split():
    with pytest.raises(ValueError, match=r"train split: only 1 class"):
        check_labels(np.array([3, 3, 3]), "train")
    with pytest.raises(ValueError, match=r"val split: 1 of 3 samples have no label"):
        check_labels(np.array([0, -1, 2]), "val")
    check_labels(np.array([4, 4]), "test", min_classes=1)  # an evaluation split may hold one class


def test_probes_refuse_unlabelled_splits(blobs):
    train_x, train_y, val_x, val_y, test_x, test_y = _splits(blobs)
    unlabelled = np.full_like(test_y, -1)
    with pytest.raises(ValueError, match="test split"):
        logistic_regression_probe(train_x, train_y, val_x, val_y, test_x, unlabelled)
    with pytest.raises(ValueError, match="train split"):
        bn_linear_probe(train_x, np.zeros_like(train_y), val_x, val_y, test_x, test_y, epochs=1)


# ----------------------------------------------------------------------------- feature extraction


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)


def _fake_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(3, 1, 8, 8, generator=generator), "label": torch.tensor([0, 1, 2])},
        {"image": torch.randn(2, 1, 8, 8, generator=generator), "label": torch.tensor([1, 0])},
    ]


def test_extract_features_shapes_determinism_and_mode():
    encoder = _tiny_vit().train()
    encoder.blocks[0].mlp.train(False)  # a deliberately mixed mode must survive too
    modes_seen = []
    encoder.blocks[0].register_forward_hook(lambda module, args, out: modes_seen.append(module.training))

    features = extract_features(encoder, _fake_batches())
    again = extract_features(encoder, iter(_fake_batches()))

    assert set(features) == {"token", "avg", "labels"}
    for pool in ("token", "avg"):
        assert features[pool].shape == (5, 16) and features[pool].dtype == np.float32
        np.testing.assert_array_equal(features[pool], again[pool])
    assert not np.allclose(features["token"], features["avg"])
    assert features["labels"].dtype == np.int64
    np.testing.assert_array_equal(features["labels"], [0, 1, 2, 1, 0])
    assert modes_seen and not any(modes_seen)  # eval while extracting
    assert encoder.training and encoder.blocks[0].training and not encoder.blocks[0].mlp.training


def test_extract_features_selected_pool_and_bad_inputs():
    encoder = _tiny_vit()
    assert set(extract_features(encoder, _fake_batches(), pools=("avg",))) == {"avg", "labels"}
    with pytest.raises(ValueError, match="pools"):
        extract_features(encoder, _fake_batches(), pools=("max",))
    with pytest.raises(ValueError, match="no batches"):
        extract_features(encoder, [])


def test_features_of_last_blocks_concatenate_normed_block_outputs():
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=3, num_heads=2)
    images = torch.randn(4, 1, 8, 8)
    outputs = encoder.forward_last_blocks(images, 3)
    assert len(outputs) == 3 and all(o.shape == (4, 5, 16) for o in outputs)
    torch.testing.assert_close(outputs[-1], encoder.forward_features(images))  # the last block is the usual feature
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(4, -1, -1)
    hidden = torch.cat([cls, encoder.embed_patches(images)], dim=1)
    torch.testing.assert_close(outputs[0], encoder.norm(encoder.blocks[0](hidden)))  # each through the final norm

    single = extract_features(encoder, [{"image": images, "label": torch.arange(4)}])
    stacked = extract_features(encoder, [{"image": images, "label": torch.arange(4)}], blocks=2)
    assert stacked["avg"].shape == (4, 32) and stacked["token"].shape == (4, 32)
    np.testing.assert_allclose(stacked["avg"][:, :16], single["avg"], rtol=1e-6)  # last block first
    second_last = encoder.pool(outputs[1], "avg").detach().numpy()
    np.testing.assert_allclose(stacked["avg"][:, 16:], second_last, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        encoder.forward_last_blocks(images, 4)


def test_save_and_load_features_round_trip(tmp_path):
    features = extract_features(_tiny_vit(), _fake_batches())
    path = tmp_path / "features" / "val.npz"
    save_features(path, features)
    loaded = load_features(path)
    assert set(loaded) == set(features)
    for name, array in features.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
    assert [p.name for p in path.parent.iterdir()] == ["val.npz"]  # no temporary left behind


def test_random_subset_is_seeded_spread_and_in_stream_order():
    from tasks.features import random_subset

    # A class-sorted stream (as shards written class by class are): 10 classes of 100 samples each.
    labels = torch.arange(1000) // 100
    stream = [{"image": torch.arange(i, i + 50).float().view(50, 1), "label": labels[i:i + 50], "key": [str(k) for k in range(i, i + 50)]}
              for i in range(0, 1000, 50)]
    subset = list(random_subset(iter(stream), 300, seed=0, batch_size=128))
    index = torch.cat([b["image"].view(-1) for b in subset]).long()
    assert [len(b["label"]) for b in subset] == [128, 128, 44]
    assert len(index.unique()) == 300 and torch.equal(index, index.sort().values)  # distinct, stream order kept
    assert set(torch.cat([b["label"] for b in subset]).tolist()) == set(range(10))  # not the first 300 (3 classes)
    assert torch.equal(torch.cat([b["label"] for b in subset]), labels[index])
    assert [b["key"] for b in subset][0] == [str(i) for i in index[:128].tolist()]
    again = torch.cat([b["image"].view(-1) for b in random_subset(iter(stream), 300, seed=0)]).long()
    other = torch.cat([b["image"].view(-1) for b in random_subset(iter(stream), 300, seed=1)]).long()
    assert torch.equal(index, again) and not torch.equal(index, other)
    everything = torch.cat([b["image"].view(-1) for b in random_subset(iter(stream), 5000, seed=0)]).long()
    assert torch.equal(everything, torch.arange(1000))
    assert list(random_subset(iter(stream), None, seed=0)) == stream


def test_evaluation_features_take_a_random_subset_on_the_stage_device(monkeypatch, tmp_path):
    from tasks import evaluate
    from data_shards.loader import LoaderSpec
    from tasks.config import EvalConfig

    # Class-sorted shards: a "first N" cap would see only class 0.
    batches = [{"image": torch.rand(50, 1, 8, 8), "label": torch.full((50,), i // 2)} for i in range(20)]
    monkeypatch.setattr(evaluate, "evaluation_batches", lambda spec: iter(batches))
    limited = list(evaluate._batches(LoaderSpec(shard_paths=("unused.tar",), batch_size=50), 100))
    assert sum(len(b["label"]) for b in limited) == 100
    assert len(set(torch.cat([b["label"] for b in limited]).tolist())) > 5

    calls = []

    def fake_extract(encoder, batches, device="cpu", pools=("token", "avg"), blocks=1):
        calls.append((device, next(encoder.parameters()).device.type))
        raise StopIteration  # enough: the device is what this test is about

    monkeypatch.setattr(evaluate, "extract_features", fake_extract)
    encoder = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(StopIteration):
        evaluate.frozen_feature_scores(EvalConfig(), encoder, {"train": LoaderSpec(shard_paths=(), batch_size=8)},
                                       tmp_path, "mae", device="meta")
    assert calls == [("meta", "meta")]


def test_fits_that_hit_max_iter_are_summarised_in_one_line(blobs, caplog, recwarn):
    import logging

    x, y = blobs["train"]
    with caplog.at_level(logging.INFO, logger="patchflow.probes"):
        result = logistic_regression_probe(x, y, *blobs["val"], *blobs["test"], Cs=(0.1, 100.0), max_iter=1)
    assert "top1" in result
    assert [r.getMessage() for r in caplog.records if "stopped at max_iter=1" in r.getMessage()] == [
        "logistic regression: 2 of 2 fits stopped at max_iter=1 (C=0.1, 100); each warm-starts the next, "
        "and C is chosen on val either way"]
    assert not [w for w in recwarn if "lbfgs failed to converge" in str(w.message)]

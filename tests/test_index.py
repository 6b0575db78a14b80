"""The index stage, the search module, the CLI and the HTTP service on real shards and a real (tiny) MAE."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from tasks import index as index_stage
from tasks import mae_pretrain
from tasks.config import ConfigError, IndexConfig, IndexTarget, MAEConfig, TrainConfig, load_config
from tasks.stage import StageContext
from tests.helpers import fashion_source, make_shards

IMAGES_MAE = IndexTarget(name="images-mae", dataset="images", encoder="mae")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Real Fashion-MNIST shards (2,000 train images in 4 shards), an MAE trained a few steps, and an IVF index."""
    root = tmp_path_factory.mktemp("root")
    shards = make_shards(root, fashion_source(max_train=2000, max_val=40, max_test=40), samples_per_shard=500)
    train = TrainConfig.model_validate({"batch_size": 16, "steps": 4, "checkpoint_every": 4, "log_every": 1,
                                        "eval_every": 100, "num_workers": 0, "shuffle_buffer": 32})
    mae = mae_pretrain.run(MAEConfig(encoder_size="nano", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                                     train=train), [shards], StageContext(data_root=root))
    config = IndexConfig(targets=[IMAGES_MAE], factory="IVF32,Flat", target_recall=0.95, recall_queries=200)
    result = index_stage.run(config, [shards, mae], StageContext(data_root=root))
    return {"root": root, "shards": shards, "mae": mae, "config": config, "result": result}


def test_tuned_ivf_reaches_the_target_recall_against_exact_search(built):
    manifest = built["result"].manifest()
    target = manifest["outputs"]["targets"]["images-mae"]
    assert target["factory"] == "IVF32,Flat" and target["count"] == 2000
    out = Path(built["result"].output_dir)
    index = faiss.read_index(str(out / "images-mae.faiss"))
    assert index.ntotal == 2000
    # recompute recall independently of the stage: exact search over the stored embeddings
    vectors = np.concatenate([np.load(p) for p in sorted((out / "images-mae" / "embeddings").glob("*.npy"))])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    queries = vectors[np.random.default_rng(7).choice(len(vectors), 300, replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    nprobe = target["search_param"]["value"]
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, found = index.search(queries, 10)
    recall = index_stage.recall_at_k(found, truth)
    assert recall >= 0.95 - 0.02  # other queries than the tuning sample: allow sampling noise
    assert built["result"].metrics["images-mae/recall_at_10"] >= 0.95
    # tuning was real: the first nprobe tried fell short, and nprobe was raised
    assert target["tuning"][0]["recall"] < 0.95 and nprobe > 1
    assert built["result"].metrics["images-mae/qps"] > 0 and built["result"].metrics["images-mae/bytes"] > 2000 * 4


def test_meta_maps_ids_to_keys_and_thumbnail_byte_ranges(built):
    out = Path(built["result"].output_dir)
    meta = json.loads((out / "images-mae.meta.json").read_text())
    assert len(meta["items"]) == 2000 and len({i["key"] for i in meta["items"]}) == 2000
    item = meta["items"][1234]
    shard = Path(built["root"]) / meta["shard_dir"] / item["shard"]
    with open(shard, "rb") as handle:
        handle.seek(item["offset"])
        data = handle.read(item["size"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and item["ext"] == "png"


def test_a_killed_embed_re_embeds_only_the_missing_shard(built):
    out = Path(built["result"].output_dir)
    embeddings = out / "images-mae" / "embeddings"
    names = sorted(p.name for p in embeddings.glob("*.npy"))
    assert len(names) == 4
    before = {n: np.load(embeddings / n) for n in names}
    (embeddings / names[2]).unlink()
    (out / "manifest.json").unlink()  # the stage did not finish
    again = index_stage.run(built["config"], [built["shards"], built["mae"]], StageContext(data_root=built["root"]))
    assert again.manifest()["outputs"]["targets"]["images-mae"]["shards_embedded_now"] == [Path(names[2]).with_suffix(".tar").name]
    after = np.load(embeddings / names[2])
    np.testing.assert_allclose(after, before[names[2]], atol=1e-5)


def test_auto_factory_follows_size_and_budget():
    assert index_stage.choose_factory(500, 64, 1024) == "Flat"
    assert index_stage.choose_factory(5_000, 64, 1024) == "HNSW32"
    assert index_stage.choose_factory(1_000_000, 128, 1024) == "IVF4000,Flat"
    assert index_stage.choose_factory(1_000_000, 128, 100).startswith("OPQ")


def test_a_target_whose_encoder_is_not_in_the_run_fails_at_config_load_naming_it():
    with pytest.raises(ConfigError, match="index target 'pairs-clip'.*clip"):
        load_config("smoke", ["stages=[shard,mae_pretrain,index]",
                              "index.targets=[{name: pairs-clip, dataset: pairs, encoder: clip}]"])

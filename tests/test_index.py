"""The index stage on smoke-sized shards and a tiny MAE: recall against exact search, key queries,
per-shard resume, and the query CLI."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import pytest

from flows import cli
from tasks import index, mae_pretrain
from tasks.config import IndexConfig, MAEConfig, TrainConfig
from tasks.search import SearchError, open_index, search
from tasks.stage import StageContext
from tests.helpers import fashion_source, make_shards


def _mae_config() -> MAEConfig:
    train = {"batch_size": 16, "steps": 4, "checkpoint_every": 3, "log_every": 1, "eval_every": 100,
             "num_workers": 1, "shuffle_buffer": 64, "optim": {"base_lr": 2e-3, "warmup_steps": 2}}
    return MAEConfig(encoder_size="nano", image_size=28, patch_size=4, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2, train=TrainConfig.model_validate(train))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    shards = make_shards(root, fashion_source(max_train=400), samples_per_shard=100)
    encoder = mae_pretrain.run(_mae_config(), [shards], StageContext(data_root=root))
    config = IndexConfig(name="smoke", factory="IVF16,Flat")
    result = index.run(config, [shards, encoder], StageContext(data_root=root))
    return root, shards, encoder, config, result


def test_index_reaches_recall_and_loads(built):
    root, _, _, _, result = built
    manifest = result.manifest()
    assert manifest["outputs"]["factory"] == "IVF16,Flat"
    assert result.metrics["vectors"] >= 200
    assert result.metrics["recall_at_10"] >= 0.95
    assert 1 <= manifest["outputs"]["nprobe"] <= 16 and result.metrics["qps"] > 0
    loaded = faiss.read_index(str(Path(result.output_dir) / "smoke.faiss"))
    assert loaded.ntotal == result.metrics["vectors"] == len(json.loads((Path(result.output_dir) / "smoke.meta.json").read_text())["ids"])
    assert faiss.extract_index_ivf(loaded).nlist == 16


def test_key_query_finds_itself(built):
    root, *_ = built
    opened = open_index(root, "smoke")
    key = opened.meta[37]["key"]
    hits = search(opened, key=key, k=5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["key"] == key and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["label"] == opened.meta[37]["label"]


def test_bad_queries_are_named(built):
    root, *_ = built
    opened = open_index(root)
    key = opened.meta[0]["key"]
    with pytest.raises(SearchError, match="exactly one of text, image or key"):
        search(opened, key=key, image=b"x")
    with pytest.raises(SearchError, match="text queries need a CLIP index"):
        search(opened, text="a shoe")
    with pytest.raises(SearchError, match=r"k must be an integer in 1\.\.1000"):
        search(opened, key=key, k=0)
    with pytest.raises(SearchError, match="bad index name"):
        open_index(root, "../smoke")


def test_rerun_embeds_only_the_missing_shard(built):
    root, shards, encoder, config, result = built
    output_dir = Path(result.output_dir)
    embeddings = sorted((output_dir / "embeddings").glob("*.npy"))
    assert len(embeddings) >= 2
    embeddings[1].unlink()
    (output_dir / "manifest.json").unlink()
    again = index.run(config, [shards, encoder], StageContext(data_root=root))
    assert again.metrics["shards_embedded"] == 1
    assert again.metrics["shards_reused"] == len(embeddings) - 1
    assert embeddings[1].is_file() and again.metrics["recall_at_10"] >= 0.95


def test_cli_query(built, capsys):
    root, *_ = built
    key = open_index(root, "smoke").meta[3]["key"]
    assert cli.main(["query", "--key", key, "--index", "smoke", "-k", "3", "--json", "--data-root", str(root)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["key"] == key
    assert cli.main(["query", "--key", key, "--index", "nope", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished index named 'nope'" in err[0]

"""CLIP: tokenizer, model API, contrastive loss (single and two-process gathered), stage on Twemoji."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.clip import CLIP, LOGIT_SCALE_MAX, clip_loss, load_clip, save_clip
from models.tokenizer import EOT, PAD, SOT, Tokenizer
from tasks.distributed import leave_process


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_utf8_emoji_and_unseen_words():
    tok = Tokenizer(context_length=48)
    texts = ["grinning face", "naïve café – Ωμέγα", "🧑🏽‍🚀 astronaut 👍🏿", "zxqvbnmkjh-unseen", ""]
    ids = tok.encode(texts)
    assert ids.shape == (5, 48) and ids.dtype == torch.long
    assert [tok.decode(row) for row in ids] == texts
    assert (ids[:, 0] == SOT).all() and int(ids.max()) <= PAD and tok.truncated == 0
    assert ids[4, :3].tolist() == [SOT, EOT, PAD]


def test_truncation_keeps_eot_last_and_is_counted():
    tok = Tokenizer(context_length=8)
    ids = tok.encode(["abcdefghijkl", "abc", "abcdef"])  # 12 bytes cut to 6; 3 fits; 6 fits exactly
    assert ids[0].tolist() == [SOT, *b"abcdef", EOT]
    assert ids[2].tolist() == [SOT, *b"abcdef", EOT]
    assert ids[1].tolist() == [SOT, *b"abc", EOT, PAD, PAD, PAD]
    assert tok.truncated == 1
    assert tok.decode(tok.encode(["aaaaaé"])[0]) == "aaaaa\ufffd"  # a multi-byte char cut in half decodes as U+FFFD
    assert tok.truncated == 2
    assert Tokenizer.from_state(tok.state()).context_length == 8
    with pytest.raises(TypeError):
        tok.encode("a string, not a list")


# ----------------------------------------------------------------------------- loss

def _hand_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    n = img.shape[0]
    sims = [[scale * sum(float(img[i, d]) * float(txt[j, d]) for d in range(img.shape[1])) for j in range(n)] for i in range(n)]
    row = -sum(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i])) for i in range(n)) / n
    col = -sum(sims[j][j] - math.log(sum(math.exp(sims[i][j]) for i in range(n))) for j in range(n)) / n
    return (row + col) / 2


def test_loss_matches_a_hand_computation_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    scale = torch.tensor(5.0)
    loss = clip_loss(img, txt, scale, gathered=False)
    assert float(loss) == pytest.approx(_hand_loss(img, txt, 5.0), rel=1e-5)
    assert float(clip_loss(txt, img, scale, gathered=False)) == pytest.approx(float(loss), rel=1e-6)


def test_loss_is_lowest_for_matched_pairs():
    g = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    matched = clip_loss(feats, feats, torch.tensor(10.0), gathered=False)
    for shift in range(1, 8):
        assert matched < clip_loss(feats, feats.roll(shift, 0), torch.tensor(10.0), gathered=False)
    assert float(matched) < 0.1  # near zero when each image is its own caption's nearest neighbour


def _gathered_rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    n = 8 // world
    local_img = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    local_txt = txt[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = clip_loss(local_img, local_txt, log_scale.exp())  # gathered: a 2-rank group is initialised
    loss.backward()
    torch.save({"loss": loss.detach(), "img_grad": local_img.grad, "txt_grad": local_txt.grad,
                "scale_grad": log_scale.grad}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
    leave_process(0)  # as a torchrun rank leaves: no interpreter finalization racing gloo's threads (SIGABRT)


def test_two_gloo_ranks_gathered_loss_and_gradients_equal_the_global_batch(tmp_path):
    world = 2
    mp.start_processes(_gathered_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = clip_loss(img, txt, log_scale.exp(), gathered=False)
    loss.backward()
    # DDP averages over ranks: mean of rank losses / gradients is the single-process global-batch value.
    assert float(sum(r["loss"] for r in ranks) / world) == pytest.approx(loss.item(), rel=1e-5)
    got_img = torch.cat([r["img_grad"] for r in ranks]) / world
    got_txt = torch.cat([r["txt_grad"] for r in ranks]) / world
    torch.testing.assert_close(got_img, img.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_txt, txt.grad, rtol=1e-4, atol=1e-6)
    assert float(sum(r["scale_grad"] for r in ranks) / world) == pytest.approx(float(log_scale.grad), rel=1e-4)
    # and the local-only loss (no gather) would differ: the test can tell the two apart
    local = clip_loss(img[:4].detach(), txt[:4].detach(), log_scale.exp().detach(), gathered=False)
    assert float(local) != pytest.approx(float(ranks[0]["loss"]), rel=1e-3)


# ----------------------------------------------------------------------------- model

def _tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=16, image_size=28, patch_size=7, in_chans=1, vision_size="nano", vision_depth=1,
                context_length=16, text_width=32, text_depth=1, text_heads=2)


def test_model_embeddings_are_normalised_and_text_pools_at_eot():
    model = _tiny_clip().eval()
    tok = Tokenizer(16)
    img_f, txt_f, scale = model(torch.randn(3, 1, 28, 28), tok.encode(["a", "bb", "ccc"]))
    assert img_f.shape == txt_f.shape == (3, 16)
    torch.testing.assert_close(img_f.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt_f.norm(dim=-1), torch.ones(3))
    assert float(scale.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    # causal + EOT pooling: what follows EOT (padding) cannot change the embedding
    ids = tok.encode(["hello"])
    changed = ids.clone()
    changed[0, 8:] = ord("z")
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(changed))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model(torch.randn(1, 1, 28, 28), ids)[2].detach()) == pytest.approx(math.exp(LOGIT_SCALE_MAX), rel=1e-5)


def test_save_and_load_rebuild_the_same_model(tmp_path):
    model = _tiny_clip().eval()
    tok = Tokenizer(16)
    kwargs = dict(embed_dim=16, image_size=28, patch_size=7, in_chans=1, vision_size="nano", vision_depth=1,
                  context_length=16, text_width=32, text_depth=1, text_heads=2)
    info = {"image_size": 28, "channels": 1, "mean": [0.5], "std": [0.5], "embed_dim": 16, "context_length": 16,
            "model_kwargs": kwargs}
    save_clip(tmp_path / "clip.pt", model, tok, info)
    loaded, loaded_tok, loaded_info = load_clip(tmp_path / "clip.pt")
    images, ids = torch.randn(2, 1, 28, 28), tok.encode(["x", "🙂"])
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(loaded_tok.encode(["x", "🙂"])), model.encode_text(ids), rtol=0, atol=0)
    assert loaded_info == info
    with pytest.raises(ValueError, match="lacks"):
        save_clip(tmp_path / "bad.pt", model, tok, {"image_size": 28})


# ----------------------------------------------------------------------------- stage on real Twemoji pairs

import json  # noqa: E402

from tasks import clip_train  # noqa: E402
from tasks.config import CLIPConfig, OptimConfig, ShardConfig, SourceConfig, TrainConfig, load_config  # noqa: E402
from tasks.stage import StageContext  # noqa: E402
from tests._shared_data import require_shared  # noqa: E402
from tests.helpers import make_shards  # noqa: E402


def _pairs_source(**extra) -> SourceConfig:
    path = require_shared("emoji-captions/twemoji")
    return SourceConfig(kind="caption_table", path=str(path), caption_column="name", label_column="group",
                        split_group="emoji", val_fraction=0.15,
                        caption_templates=["an emoji of {caption}", "{caption}"], **extra)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return make_shards(root, _pairs_source(max_train=1024, max_val=200), samples_per_shard=256)


def _clip_config(steps: int, **train) -> CLIPConfig:
    return CLIPConfig(image_init="random", context_length=64, text_depth=1, eval_batch_size=200, train=TrainConfig(
        batch_size=64, steps=steps, log_every=10, checkpoint_every=max(1, steps // 2), num_workers=0, shuffle_buffer=256,
        optim=OptimConfig(base_lr=2e-3, lr_scaling="none", warmup_steps=5, weight_decay=0.1, betas=(0.9, 0.98)), **train))


def test_emoji_variants_never_straddle_splits_and_captions_hold_every_template(pairs):
    from data_shards.sources import emoji_group_keys, open_source
    source = open_source(_pairs_source(), Path("/tmp"), seed=0)
    keys = {split: {k for s in samples for k in emoji_group_keys(s.caption.split("\n")[1], "")[:1]}
            for split, samples in source.splits.items()}
    assert not keys["train"] & keys["val"]
    assert any("skin tone" in s.caption for s in source.splits["val"])  # variants exist in val, all of them there
    assert all(len(s.caption.split("\n")) == 2 and s.caption.startswith("an emoji of ") for s in source.splits["train"])
    split = json.loads(Path(pairs.manifest_path).read_text())["outputs"]["splits"]["val"]
    assert split["empty_captions"] == 0 and split["has_captions"]


def test_blank_caption_is_an_error_naming_the_row(tmp_path):
    from data_shards.samples import SourceError
    from data_shards.sources import open_source
    twemoji = require_shared("emoji-captions/twemoji")
    table = tmp_path / "captions.tsv"
    lines = (twemoji / "captions.tsv").read_text(encoding="utf-8").splitlines()[:4]
    cells = lines[2].split("\t")
    cells[0], cells[1] = str(twemoji / "images" / cells[0]), "   "
    lines[2] = "\t".join(cells)
    lines[1] = "\t".join([str(twemoji / "images" / lines[1].split("\t")[0])] + lines[1].split("\t")[1:])
    lines[3] = "\t".join([str(twemoji / "images" / lines[3].split("\t")[0])] + lines[3].split("\t")[1:])
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match="line 3: empty caption"):
        open_source(SourceConfig(kind="caption_table", path=str(table)), tmp_path)
    kept = open_source(SourceConfig(kind="caption_table", path=str(table), empty_captions="keep", val_fraction=0.0), tmp_path)
    assert sum(not s.caption.strip() for s in kept.splits["train"]) == 1


def test_short_real_run_beats_the_untrained_floor_and_exports_a_reloadable_model(pairs, tmp_path):
    result = clip_train.run(_clip_config(80), [pairs], StageContext(data_root=tmp_path))
    m = result.metrics
    print({k: round(v, 4) for k, v in sorted(m.items())})
    assert m["trained_t2i_recall_at_10"] > m["untrained_t2i_recall_at_10"] + 0.05
    assert m["trained_t2i_recall_at_10"] > m["chance_recall_at_10"]
    assert m["final_loss"] < m["first_loss"]
    outputs = result.manifest()["outputs"]
    config = _clip_config(80)
    model, tokenizer, info = load_clip(Path(result.output_dir) / outputs["model"]["path"])
    again = clip_train._loaded(config, Path(result.output_dir) / "main" / "weights.pt")
    spec = clip_train._loader_spec(config, pairs.manifest_path, "val",
                                   clip_train.pairs_geometry(pairs.manifest_path, 1), batch_size=32)
    batch = next(iter(clip_train.evaluation_batches(spec)))
    tokens = tokenizer.encode(batch["caption"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(batch["image"]), again.encode_image(batch["image"]), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(tokens), again.encode_text(tokens), rtol=0, atol=0)
    assert info["image_size"] == outputs["image"]["image_size"] == 28 and info["channels"] == 1


def test_kill_and_resume_reproduces_the_uninterrupted_loss_curve(pairs, tmp_path):
    config = _clip_config(8)
    full = clip_train.run(config, [pairs], StageContext(data_root=tmp_path / "full"))
    with pytest.raises(RuntimeError, match="resume"):
        clip_train.run(config, [pairs], StageContext(data_root=tmp_path / "killed", extra={"stop_after": 6}))
    resumed = clip_train.run(config, [pairs], StageContext(data_root=tmp_path / "killed"))
    assert resumed.metrics["resumed_from_step"] == 4  # checkpoints every 4 steps; died after 6
    losses = [json.loads((Path(r.output_dir) / "main" / "train_summary.json").read_text())["losses"] for r in (full, resumed)]
    assert len(losses[0]) == 8 and losses[1] == losses[0]  # bit-identical on CPU with a fixed seed


def test_mae_init_loads_strictly_and_refuses_another_geometry(tmp_path):
    from models.mae import mae_from_name
    encoder = mae_from_name("nano", img_size=28, patch_size=4, in_chans=1).encoder
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    config = CLIPConfig(image_init="mae")
    model = clip_train.build_model(config)
    clip_train.load_mae_encoder(model, tmp_path / "encoder.pt")
    torch.testing.assert_close(model.visual.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    arch = {"encoder_size": "nano", "image_size": 28, "patch_size": 4, "in_chans": 1}
    clip_train.check_mae_geometry(config, arch)
    clip_train.check_mae_geometry(config, {**arch, "in_chans": 3})  # channels are converted, not refused
    for field, value in [("image_size", 32), ("patch_size", 7), ("encoder_size", "micro")]:
        with pytest.raises(ValueError, match=field):
            clip_train.check_mae_geometry(config, {**arch, field: value})
    torch.save({k: v for k, v in encoder.state_dict().items() if k != "norm.weight"}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="norm.weight"):
        clip_train.load_mae_encoder(clip_train.build_model(config), tmp_path / "partial.pt")


def test_a_grey_mae_starts_a_colour_tower_that_embeds_grey_pictures_as_the_mae_did(tmp_path):
    from models.mae import mae_from_name
    encoder = mae_from_name("nano", img_size=28, patch_size=4, in_chans=1).encoder
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    model = clip_train.build_model(CLIPConfig(image_init="mae", channels=3))
    clip_train.load_mae_encoder(model, tmp_path / "encoder.pt")
    grey = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model.visual.embed_patches(grey.expand(-1, 3, -1, -1)), encoder.embed_patches(grey))
    with pytest.raises(ValueError, match="3-channel patch projection into a 4-channel"):
        from models.vit import with_input_channels
        with_input_channels({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, 4)


def test_presets_with_pairs_validate_and_without_pairs_run_no_clip():
    demo, small = load_config("demo"), load_config("small")
    assert demo.pairs is not None and "clip_train" in demo.stages
    assert (demo.clip.image_init, demo.clip.channels) == ("random", 3)  # colour: see the preset's comment
    assert small.pairs is not None and small.clip.image_init == "mae"  # the MAE → CLIP chain
    assert (small.clip.image_size, small.clip.patch_size, small.clip.vision_size) == (
        small.mae.image_size, small.mae.patch_size, small.mae.encoder_size)
    assert load_config("base").pairs is None


def test_the_retrieval_picture_frames_the_true_image_among_the_enlarged_top_5():
    from tasks.clip_train import retrieval_picture

    n = 8
    image = torch.nn.functional.normalize(torch.randn(n, 16), dim=1)
    data = {"captions": [f"caption {i}" for i in range(n)], "pixels": torch.rand(n, 1, 28, 28) * 0.5 + 0.25,
            "text": image.clone(), "image": image}  # each caption's best match is its own image
    grid, listing = retrieval_picture(data, mean=[0.0], std=[1.0], queries=2)
    assert [row["query"] for row in listing] == ["caption 0", "caption 7"] and listing[0]["top5"][0] == "caption 0"
    tile, top = 112, 4 + 13 + 8  # 28 px enlarged 4x; labelled_grid's header
    assert grid.shape[1] == top + 2 * (tile + 4)
    left = grid.shape[2] - 6 * (tile + 4)  # true image, then top 1..5
    first_hit = grid[:, top:top + tile, left + tile + 4:left + 2 * tile + 4]
    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    assert (first_hit[:, :4] == green).all() and (first_hit[:, :, -4:] == green).all()  # framed: the true one
    inner = data["pixels"][0, 0, 1:-1, 1:-1].repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(first_hit[1, 4:-4, 4:-4], (inner * 255).round() / 255)
    assert grid[0, top:top + tile, left:left + 4].max() > 0  # the true image itself is not framed (red is 0 there)

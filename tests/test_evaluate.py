"""The evaluation stage on real (small) data: every number and baseline is written; bad input fails."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_shards.loader import LoaderSpec, split_shards
from tasks import evaluate, mae_pretrain
from models.mae import mae_from_name
from tasks.config import EvalConfig, MAEConfig, SourceConfig, TrainConfig, available_presets, load_config
from tasks.finetune import FinetuneJob, build_classifier, layer_decay_groups, load_encoder_weights, train_classifier
from tasks.stage import StageContext
from tests._shared_data import require_shared
from tests.helpers import make_shards

pytestmark = pytest.mark.slow


def _mae(shards, root):
    config = MAEConfig(encoder_size="nano", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                       train=TrainConfig(batch_size=32, steps=10, checkpoint_every=10, num_workers=0, shuffle_buffer=64))
    return mae_pretrain.run(config, [shards], StageContext(data_root=root))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shards = make_shards(root, samples_per_shard=100)
    return root, shards, _mae(shards, root)


def _eval_config(**overrides) -> EvalConfig:
    train = TrainConfig(batch_size=32, steps=4, checkpoint_every=2, log_every=2, num_workers=0, shuffle_buffer=64)
    return EvalConfig(finetune_train=train, probe_epochs=5, **overrides)


def test_evaluate_stage_writes_every_metric_with_baselines(pretrained):
    root, shards, mae = pretrained
    result = evaluate.run(_eval_config(), [shards, mae], StageContext(data_root=root))
    expected = {f"{who}_{kind}_top{k}" for who in ("mae", "random_init") for kind in ("linear", "knn") for k in (1, 5)}
    expected |= {"pixels_linear_top1", "pixels_linear_top5", "finetune_top1", "scratch_top1",
                 "finetune_margin_over_scratch", "linear_margin_over_pixels", "linear_margin_over_random_init",
                 "knn_margin_over_random_init"}
    assert expected <= set(result.metrics)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in expected if "margin" not in k)
    # Raw pixels on 200 Fashion-MNIST images are far above chance: the baseline is real, not a constant.
    assert result.metrics["pixels_linear_top1"] > 0.5
    outputs = result.manifest()["outputs"]
    assert outputs["classifier"]["num_classes"] == 10 and (Path(result.output_dir) / "classifier.pt").is_file()
    assert "mae-train.npz" in outputs["features"]
    # MAE's fine-tuning pools the patch tokens then applies fc_norm; the DiT stage rebuilds the classifier
    # the same way from the architecture alone, so the exported weights must load into that strictly.
    classifier = torch.load(Path(result.output_dir) / "classifier.pt")
    assert "fc_norm.weight" in classifier and "norm.weight" not in classifier
    evaluate.build_encoder(outputs["architecture"], num_classes=10).load_state_dict(classifier)
    # Fine-tuning and its scratch baseline train on the same augmentation: the configured one (flip by default).
    for name in ("finetune", "scratch"):
        job = json.loads((Path(result.output_dir) / name / "job.json").read_text())
        assert job["loader"]["augment"] == EvalConfig().finetune_augment == "flip", name
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"confusion_matrix.png", "per_class_accuracy.json"} <= artifacts
    assert client.get_run(result.mlflow_run_id).data.metrics["mae_linear_top1"] == result.metrics["mae_linear_top1"]


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_fine_tuning_trains_on_the_configured_augmentation(augment, monkeypatch, tmp_path):
    seen = []

    class Built(Exception):
        pass

    def fake_finetune(job, job_path, run_id, data_root, log):
        seen.append(job.loader["augment"])
        raise Built  # the job as built is all this test needs

    monkeypatch.setattr(evaluate, "run_finetune", fake_finetune)
    spec = LoaderSpec(shard_paths=("unused.tar",), batch_size=8, image_size=28)
    with pytest.raises(Built):
        evaluate.finetune_scores(EvalConfig(finetune_augment=augment), {}, None, 10, {"train": spec}, tmp_path,
                                 "scratch", [], "run", tmp_path)
    assert seen == [augment]


def test_fine_tuning_resumes_to_the_same_losses(pretrained, tmp_path):
    _, shards, mae = pretrained
    arch = mae.manifest()["outputs"]["architecture"]
    spec = LoaderSpec(shard_paths=split_shards(shards.manifest_path, "train"), batch_size=16, shuffle_buffer=32)
    train = TrainConfig(batch_size=16, steps=5, checkpoint_every=2, log_every=1)

    def model():
        torch.manual_seed(0)
        return evaluate.build_encoder(arch, num_classes=10, drop_path=0.1)

    straight = train_classifier(model(), spec, train, tmp_path / "a", arch, 0.75, 0.1)
    train_classifier(model(), spec, train, tmp_path / "b", arch, 0.75, 0.1, stop_after=3)
    resumed = train_classifier(model(), spec, train, tmp_path / "b", arch, 0.75, 0.1)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses


def test_fine_tuning_runs_under_torchrun_with_two_cpu_processes(pretrained, tmp_path):
    _, shards, mae = pretrained
    train = TrainConfig(batch_size=16, steps=4, checkpoint_every=2, log_every=1, num_workers=0, shuffle_buffer=32,
                        nproc_per_node=2)
    result = evaluate.run(EvalConfig(finetune_train=train, probe_epochs=2), [shards, mae], StageContext(data_root=tmp_path))
    output = Path(result.output_dir)
    for name, weights in (("finetune", "classifier.pt"), ("scratch", "scratch/model.pt")):
        summary = json.loads((output / weights).with_suffix(".summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 4
        assert 0.0 <= result.metrics[f"{name}_top1"] <= 1.0
    # Rank 0 logged into the stage's own MLflow run; the other rank logged nothing.
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(result.mlflow_run_id, "finetune/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    # The exported classifier started from the MAE encoder and was trained from there.
    state, encoder = torch.load(output / "classifier.pt"), torch.load(Path(mae.output_dir) / "encoder.pt")
    assert state["head.weight"].shape[0] == 10
    assert not torch.equal(state["blocks.0.mlp.fc1.weight"], encoder["blocks.0.mlp.fc1.weight"])


def test_layer_decay_scales_lower_layers_down():
    model = evaluate.build_encoder({"encoder_size": "nano", "image_size": 28, "patch_size": 4, "in_chans": 1}, num_classes=10)
    scales = {}
    for group in layer_decay_groups(model, 0.05, 0.5):
        for param in group["params"]:
            scales[next(n for n, p in model.named_parameters() if p is param)] = group["lr_scale"]
    assert scales["head.weight"] == 1.0 and scales["blocks.3.attn.qkv.weight"] == 0.5
    assert scales["blocks.0.attn.qkv.weight"] == 0.5 ** 4 and scales["patch_embed.proj.weight"] == 0.5 ** 5


def test_layer_decay_groups_use_the_models_no_weight_decay_set(monkeypatch):
    model = evaluate.build_encoder({"encoder_size": "nano", "image_size": 28, "patch_size": 4, "in_chans": 1}, num_classes=10)
    # A recipe that also leaves the patch projection undecayed only has to declare it.
    monkeypatch.setattr(model, "no_weight_decay", lambda: {"pos_embed", "cls_token", "patch_embed.proj.weight"})
    decay = {}
    for group in layer_decay_groups(model, 0.05, 0.75):
        for param in group["params"]:
            decay[next(n for n, p in model.named_parameters() if p is param)] = group["weight_decay"]
    assert decay["patch_embed.proj.weight"] == 0.0 and decay["cls_token"] == 0.0 and decay["blocks.0.norm1.weight"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert set(decay) == {n for n, p in model.named_parameters() if p.requires_grad}


NANO_28 = {"encoder_size": "nano", "image_size": 28, "patch_size": 4, "in_chans": 1}


def _exported_encoder(path: Path) -> dict:
    """What MAE pretraining exports: the encoder's state dict (class token, final norm, no head)."""
    torch.manual_seed(1)
    state = mae_from_name("nano", img_size=28, patch_size=4, in_chans=1, decoder_embed_dim=16, decoder_depth=1,
                          decoder_num_heads=2).encoder.state_dict()
    torch.save(state, path)
    return state


def _finetune_job(encoder_path: Path | None, **fields) -> FinetuneJob:
    return FinetuneJob(architecture=NANO_28, num_classes=10, encoder_path=None if encoder_path is None else str(encoder_path),
                       loader={}, train=TrainConfig().model_dump(mode="json"), layer_decay=0.75, label_smoothing=0.1,
                       drop_path=0.1, signature={}, checkpoint_dir="unused", weights_path="unused", **fields)


def test_mae_encoder_loads_into_the_avg_pool_classifier_leaving_head_and_fc_norm_new(tmp_path):
    state = _exported_encoder(tmp_path / "encoder.pt")
    model = evaluate.build_encoder(NANO_28, num_classes=10)
    assert model.global_pool == "avg"  # MAE's fine-tuning recipe is the classifier's default
    new, dropped = load_encoder_weights(model, tmp_path / "encoder.pt")
    assert new == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert dropped == ["norm.bias", "norm.weight"]  # the avg-pool model normalises after pooling instead
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc2.weight"], state["blocks.3.mlp.fc2.weight"])
    token_model = evaluate.build_encoder(NANO_28, num_classes=10, global_pool="token")
    assert load_encoder_weights(token_model, tmp_path / "encoder.pt") == (["head.bias", "head.weight"], [])
    # Strict about everything else: a missing block weight is not silently left random.
    del state["blocks.0.attn.qkv.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\.attn\.qkv\.weight'\]"):
        load_encoder_weights(evaluate.build_encoder(NANO_28, num_classes=10), tmp_path / "broken.pt")


def test_fine_tuned_classifier_starts_from_maes_recipe(tmp_path):
    _exported_encoder(tmp_path / "encoder.pt")
    finetuned = build_classifier(_finetune_job(tmp_path / "encoder.pt"))
    assert finetuned.global_pool == "avg"
    assert 1e-5 < finetuned.head.weight.std().item() < 3e-5 and torch.all(finetuned.head.bias == 0)
    # From scratch there is no pretrained feature to protect: the head keeps the usual init.
    assert build_classifier(_finetune_job(None)).head.weight.std().item() > 1e-2
    assert build_classifier(_finetune_job(None, global_pool="token")).global_pool == "token"


def test_fine_tuning_uses_maes_adamw_betas_in_the_default_and_every_preset():
    assert EvalConfig().finetune_train.optim.betas == (0.9, 0.999)
    assert EvalConfig().finetune_pool == "avg"
    for preset in available_presets():
        assert load_config(preset).evaluate.finetune_train.optim.betas == (0.9, 0.999), preset


def test_encoder_checkpoint_of_another_size_is_refused(pretrained, tmp_path):
    _, _, mae = pretrained
    bigger = evaluate.build_encoder({"encoder_size": "micro", "image_size": 28, "patch_size": 4, "in_chans": 1})
    with pytest.raises(ValueError, match=r"encoder\.pt does not match the encoder config"):
        evaluate.load_encoder_weights(bigger, Path(mae.output_dir) / "encoder.pt")


def test_feature_blocks_deeper_than_the_encoder_are_refused(pretrained):
    root, shards, mae = pretrained
    with pytest.raises(ValueError, match="feature_blocks=9 exceeds the nano encoder's depth"):
        evaluate.run(_eval_config(feature_blocks=9), [shards, mae], StageContext(data_root=root))


def test_shards_without_a_test_split_are_refused_before_work(tmp_path):
    table = require_shared("emoji-captions/twemoji")
    shards = make_shards(tmp_path, SourceConfig(kind="caption_table", path=str(table), max_train=40, max_val=10))
    with pytest.raises(ValueError, match=r"evaluation needs train/val/test splits; missing \['test'\]"):
        evaluate.run(_eval_config(), [shards, shards.model_copy(update={"stage": "mae_pretrain"})],
                     StageContext(data_root=tmp_path))
    assert not (tmp_path / "stages" / "evaluate").exists()  # refused before any output was started


def test_split_without_labels_is_refused(tmp_path):
    manifest = {"outputs": {"classes": None, "splits": {
        s: {"has_labels": s != "val", "class_histogram": {"0": 5, "1": 5}} for s in ("train", "val", "test")}}}
    with pytest.raises(ValueError, match="split 'val' has no labels"):
        evaluate._require_labelled_splits(manifest, "m.json")


def test_one_class_train_split_is_refused(tmp_path):
    manifest = {"outputs": {"classes": ["a"], "splits": {
        s: {"has_labels": True, "class_histogram": {"0": 5}} for s in ("train", "val", "test")}}}
    with pytest.raises(ValueError, match="split 'train' has only one class"):
        evaluate._require_labelled_splits(manifest, "m.json")

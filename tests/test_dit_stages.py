"""The latent-diffusion branch on real data: vae → encode_latents → dit_train."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_shards.errors import BadInputError
from tasks import dit_stage, latents, vae_train
from tasks.config import DiTConfig, LatentConfig, TrainConfig, VAEConfig
from tasks.engine import TrainSummary
from tasks.stage import StageContext
from tests._shared_data import require_shared
from tests.helpers import fashion_source, make_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def branch(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    context = StageContext(data_root=root)
    shards = make_shards(root, fashion_source(max_train=160, max_val=60, max_test=20), samples_per_shard=40)
    vae = vae_train.run(VAEConfig(image_size=32, train=TrainConfig(batch_size=32, steps=30, checkpoint_every=30,
                                                                    num_workers=0, shuffle_buffer=64,
                                                                    optim={"base_lr": 4e-3, "weight_decay": 0.0})),
                        [shards], context)
    lat = latents.run(LatentConfig(batch_size=64), [shards, vae], context)
    return root, context, shards, vae, lat


def test_pretrained_taef2_loads_strictly_and_reconstructs(tmp_path):
    weights = require_shared("taesd")
    shards = make_shards(tmp_path, fashion_source(max_train=64, max_val=32, max_test=8))
    result = vae_train.run(VAEConfig(pretrained_dir=str(weights), image_size=32), [shards], StageContext(data_root=tmp_path))
    outputs = result.manifest()["outputs"]
    assert outputs["pretrained"] and outputs["constructor"] == {"latent_channels": 32, "width": 64, "midblock_gn": True}
    assert len(outputs["latent_stats"]["mean"]) == 32 and all(s > 0 for s in outputs["latent_stats"]["std"])
    assert result.metrics["val_psnr"] > 20.0  # NOTES.md measured 23.8 dB at 32 px
    reloaded = vae_train.load_vae(result)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_fine_tuning_taef2s_decoder_keeps_its_latents_and_raises_psnr_over_the_pretrained_baseline(tmp_path):
    from flows.headlines import headlines

    weights = require_shared("taesd")
    shards = make_shards(tmp_path, fashion_source(max_train=96, max_val=32, max_test=8))
    finetune = TrainConfig(batch_size=16, steps=24, checkpoint_every=12, log_every=12, num_workers=0, shuffle_buffer=32,
                           optim={"base_lr": 1e-4, "lr_scaling": "none", "weight_decay": 0.0})
    result = vae_train.run(VAEConfig(pretrained_dir=str(weights), image_size=32, decoder_finetune=finetune), [shards],
                           StageContext(data_root=tmp_path))
    outputs, metrics = result.manifest()["outputs"], result.metrics
    assert outputs["pretrained"] and outputs["decoder_finetuned"]
    # Fashion-MNIST is far from TAEF2's natural images: 24 steps of the decoder already gain (measured 1.9 dB).
    assert metrics["val_psnr"] > metrics["pretrained_val_psnr"] + 0.5, metrics
    tuned, pretrained = vae_train.load_vae(result).state_dict(), vae_train.load_pretrained(str(weights)).state_dict()
    assert all(torch.equal(tuned[k], pretrained[k]) for k in tuned if k.startswith("encoder."))  # latents unchanged
    assert not all(torch.equal(tuned[k], pretrained[k]) for k in tuned if k.startswith("decoder."))
    row = next(r for r in headlines({"vae": result}) if r.stage == "vae")
    assert row.baseline == f"pretrained TAEF2 before its decoder was fine-tuned {metrics['pretrained_val_psnr']:.1f} dB"


def test_wrong_shaped_vae_weights_are_named(tmp_path):
    weights = require_shared("taesd")
    for name in vae_train.TAEF2_FILES:
        state = torch.load(weights / name, weights_only=True)
        if "encoder" in name:
            state["13.conv.0.weight"] = torch.zeros(64, 64, 1, 1)  # not a key the sizes are inferred from
        torch.save(state, tmp_path / name)
    shards = make_shards(tmp_path / "root", fashion_source(max_train=8, max_val=8, max_test=8))
    with pytest.raises(ValueError, match=r"encoder key '13\.conv\.0\.weight': expected shape \(64, 64, 3, 3\), got \(64, 64, 1, 1\)"):
        vae_train.run(VAEConfig(pretrained_dir=str(tmp_path)), [shards], StageContext(data_root=tmp_path / "root"))
    with pytest.raises(ValueError, match="taef2_encoder.pth does not exist"):
        vae_train.run(VAEConfig(pretrained_dir=str(tmp_path / "nowhere")), [shards], StageContext(data_root=tmp_path / "root"))


def test_trained_vae_and_latents_with_flip_copies(branch):
    _, _, shards, vae, lat = branch
    assert (Path(vae.output_dir) / "vae.pt").is_file() and not vae.manifest()["outputs"]["pretrained"]
    outputs = lat.manifest()["outputs"]
    assert outputs["latent_shape"] == [8, 4, 4]
    assert outputs["splits"]["train"]["num_samples"] == 2 * 160 and outputs["splits"]["val"]["num_samples"] == 2 * 60
    assert outputs["vae_fingerprint"] == vae.manifest()["outputs"]["parameter_fingerprint"]
    tensors, labels = latents.load_latents(lat.manifest_path, "train")
    assert tensors.shape == (320, 8, 4, 4) and set(labels.tolist()) <= set(range(10))


def test_killed_encoding_redoes_only_missing_shards(branch):
    root, context, shards, vae, lat = branch
    victim = Path(lat.output_dir) / "train-000002.tar"
    victim.unlink()
    Path(lat.manifest_path).unlink()
    again = latents.run(LatentConfig(batch_size=64), [shards, vae], context)
    assert again.metrics["encoded_now"] == 80  # one shard of 40 images, plus their flips
    assert again.digest == lat.digest  # deterministic: the re-encoded shard is byte-identical


def test_latent_stream_resumes_exactly():
    tensors, labels = torch.randn(50, 2, 2, 2), torch.arange(50)
    stream = latents.latent_batches(tensors, labels, batch_size=8, seed=3)
    full = [(e, i, b["label"].tolist()) for e, i, b in (next(stream) for _ in range(15))]
    epoch, index, _ = full[9]
    resumed = latents.latent_batches(tensors, labels, batch_size=8, seed=3, start_epoch=epoch, skip=index)
    assert [(e, i, b["label"].tolist()) for e, i, b in (next(resumed) for _ in range(6))] == full[9:]


def test_latent_ranks_get_equal_disjoint_shares_and_end_epochs_together():
    tensors, labels = torch.randn(50, 2, 2, 2), torch.arange(50)  # 50 = 16 + 17 + 17 if dealt every 3rd
    streams = [latents.latent_batches(tensors, labels, batch_size=4, seed=3, rank=r, world_size=3) for r in range(3)]
    runs = [[next(stream) for _ in range(9)] for stream in streams]
    assert all([(e, i) for e, i, _ in run] == [(e, i) for e, i, _ in runs[0]] for run in runs)  # epoch ends line up
    first_epoch = [set(label for e, _, b in run if e == 0 for label in b["label"].tolist()) for run in runs]
    assert all(len(share) == 16 for share in first_epoch) and not first_epoch[0] & first_epoch[1]


def test_dit_training_lowers_the_loss_scores_samples_and_keeps_the_vae_frozen(branch):
    _, context, shards, vae, lat = branch
    config = DiTConfig(model="DiT-N/1", samples_per_class=3, sample_steps=8, classifier_steps=60, cfg_scale=2.0,
                       train=TrainConfig(batch_size=32, steps=80, checkpoint_every=80, log_every=10, eval_every=80,
                                         ema_decay=0.9, optim={"base_lr": 1e-3, "weight_decay": 0.0}))
    result = dit_stage.run(config, [shards, vae, lat], context)
    metrics = result.metrics
    assert metrics["final_loss"] < 0.9 * metrics["first_loss"]
    for name in ("sample_accuracy", "real_accuracy", "reconstruction_accuracy", "frechet_distance", "real_frechet_distance"):
        assert math.isfinite(metrics[name])
    assert metrics["real_accuracy"] > 0.3  # the classifier learned something
    assert metrics["real_frechet_distance"] >= 0 and metrics["frechet_distance"] >= 0
    assert (Path(result.output_dir) / "dit.pt").is_file()


def test_a_vae_changed_during_the_stage_is_refused(branch, tmp_path, monkeypatch):
    _, _, shards, vae, lat = branch
    real_sample_images = dit_stage.sample_images

    def tampering(model, diffusion, vae_model, *args, **kwargs):
        with torch.no_grad():
            next(vae_model.parameters()).view(-1)[0] += 1e-3
        return real_sample_images(model, diffusion, vae_model, *args, **kwargs)

    monkeypatch.setattr(dit_stage, "sample_images", tampering)
    config = DiTConfig(model="DiT-N/1", samples_per_class=1, sample_steps=2, classifier_steps=2,
                       train=TrainConfig(batch_size=16, steps=2, checkpoint_every=2, log_every=1, eval_every=2))
    with pytest.raises(BadInputError, match="the frozen VAE from .* changed during DiT training"):
        dit_stage.run(config, [shards, vae, lat], StageContext(data_root=tmp_path))


def test_dit_trains_under_torchrun_with_two_cpu_processes(branch, tmp_path):
    _, _, shards, vae, lat = branch
    config = DiTConfig(model="DiT-N/1", samples_per_class=2, sample_steps=2, classifier_steps=5,
                       train=TrainConfig(batch_size=16, steps=6, checkpoint_every=3, log_every=1, eval_every=6,
                                         ema_decay=0.9, nproc_per_node=2, optim={"base_lr": 5e-4, "weight_decay": 0.0}))
    result = dit_stage.run(config, [shards, vae, lat], StageContext(data_root=tmp_path))
    summary = json.loads((Path(result.output_dir) / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and all(math.isfinite(x) for x in summary["losses"])
    assert result.manifest()["outputs"]["world_size"] == 2 and math.isfinite(result.metrics["frechet_distance"])
    # Rank 0 logged the loss and a sample grid into the stage's MLflow run.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [a.path for a in client.list_artifacts(result.mlflow_run_id, "samples")] == ["samples/step-000006.png"]


def test_patch_that_does_not_tile_the_latents_fails_before_training(branch):
    _, context, shards, vae, lat = branch
    with pytest.raises(ValueError, match="latent size 4 .* not divisible by patch size 8"):
        dit_stage.run(DiTConfig(model="DiT-N/8"), [shards, vae, lat], context)


def test_guidance_below_one_and_bad_vae_size_are_config_errors():
    with pytest.raises(ValueError, match="cfg_scale"):
        DiTConfig(cfg_scale=0.5)
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 8"):
        VAEConfig(image_size=30)


def test_frechet_distance_matches_closed_form_for_gaussians():
    from tasks.quality import frechet_distance

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=generator)
    b = torch.randn(4000, 3, generator=generator) * 2 + 1
    # N(0, I) vs N(1, 4I): |Δμ|² = 3, tr = 3 + 12 - 2·tr(2I) = 3 → 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------- DiT's optimiser and EMA recipe


def test_dit_recipe_is_constant_unscaled_lr_with_dit_betas_even_under_partial_presets():
    from tasks.config import load_config
    from tasks.engine import lr_factor, peak_learning_rate

    for train in (DiTConfig().train, load_config("smoke").dit.train,
                  DiTConfig(train=TrainConfig(batch_size=32, steps=80)).train):
        optim = train.optim
        assert optim.betas == (0.9, 0.999) and optim.weight_decay == 0.0 and train.ema_warmup
        assert peak_learning_rate(optim, global_batch=1024) == optim.base_lr  # not rescaled by batch
        assert all(lr_factor(step, 1000, optim, optim.base_lr) == 1.0 for step in (0, 500, 999, 1000))
    assert (DiTConfig().train.optim.base_lr, DiTConfig().train.ema_decay) == (1e-4, 0.9999)
    # MAE keeps its linear scaling and cosine decay.
    mae = TrainConfig().optim
    assert peak_learning_rate(mae, global_batch=512) == pytest.approx(2 * mae.base_lr)
    assert lr_factor(999, 1000, mae, peak_learning_rate(mae, 512)) < 1e-3


def test_constant_schedule_warms_up_then_stays_flat():
    from tasks.config import OptimConfig
    from tasks.engine import lr_factor

    optim = OptimConfig(base_lr=1e-3, warmup_steps=4, schedule="constant", lr_scaling="none")
    assert [lr_factor(step, 20, optim, 1e-3) for step in range(8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_ema_warmup_follows_the_step_and_tracks_a_short_run(tmp_path):
    from tasks.engine import TrainJob, ema_decay_at, train

    config = TrainConfig(ema_decay=0.9999, ema_warmup=True)
    assert [ema_decay_at(t, config) for t in (0, 1, 90)] == pytest.approx([0.1, 2 / 11, 0.91])
    assert ema_decay_at(10**6, config) == 0.9999
    assert ema_decay_at(0, TrainConfig(ema_decay=0.9999)) == 0.9999  # no warm-up unless asked

    def run(warmup: bool) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        target = torch.nn.Linear(4, 1)

        def batches(epoch, skip):
            generator = torch.Generator().manual_seed(0)
            while True:
                x = torch.randn(16, 4, generator=generator)
                yield 0, 0, {"image": x, "target": target(x).detach()}

        summary = train(TrainJob(
            model=model, loss_fn=lambda m, b: (((m(b["image"]) - b["target"]) ** 2).mean(), {}), batches=batches,
            config=TrainConfig(steps=50, batch_size=16, ema_decay=0.9999, ema_warmup=warmup, checkpoint_every=50,
                               optim={"base_lr": 0.05, "lr_scaling": "none", "schedule": "constant", "weight_decay": 0.0}),
            checkpoint_dir=tmp_path / f"warmup-{warmup}", signature={}))
        return float(sum((e - p.detach()).abs().sum() for e, p in zip(summary.ema.parameters(), model.parameters())))

    # 50 steps at 0.9999 leave the EMA at the init; with warm-up it follows the trained weights.
    assert run(warmup=True) < 0.2 * run(warmup=False)


def test_guidance_without_label_dropout_is_a_config_error_naming_both_fields():
    with pytest.raises(ValueError, match=r"cfg_scale.*class_dropout_prob|class_dropout_prob.*cfg_scale"):
        DiTConfig(cfg_scale=4.0, class_dropout_prob=0.0)
    assert DiTConfig(cfg_scale=1.0, class_dropout_prob=0.0).cfg_scale == 1.0  # unguided sampling needs no null class


# ------------------------------------------------- devices: every stage computes where it is told
# No GPU in CI: weights on the `meta` device stand in for one. A step that forced the CPU would meet
# meta weights with CPU tensors and fail; fakes hand CPU results back where real code would copy them.


class _DeviceRecorder(torch.nn.Module):
    """Weights on `meta`; records the device of what it is given and answers with CPU tensors."""

    def __init__(self, latent_channels: int = 2):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.latent_channels, self.seen = latent_channels, []

    def encode(self, x):
        self.seen.append(x.device.type)
        return torch.zeros(len(x), self.latent_channels, x.shape[-2] // 8, x.shape[-1] // 8)


def test_sampling_runs_on_the_models_device_and_decodes_on_the_vaes(monkeypatch):
    from models.diffusion import GaussianDiffusion
    from models.dit import dit_from_name
    from models.vae import TinyAutoencoder

    with torch.device("meta"):
        model = dit_from_name("DiT-N/1", input_size=4, in_channels=8, num_classes=3, learn_sigma=True)
        vae = TinyAutoencoder(latent_channels=8, width=8, midblock_gn=False)
    generators, noise, decoded = [], [], []

    class RecordingGenerator:  # torch cannot make a generator on `meta`; record where one is asked for
        def __init__(self, device="cpu"):
            self.device = torch.device(device)
            generators.append(self.device.type)

        def manual_seed(self, seed):
            return self

    def randn(shape, generator, device):
        noise.append((generator.device.type, torch.device(device).type))
        return torch.randn(shape, device=device)

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    monkeypatch.setattr(GaussianDiffusion, "_randn", staticmethod(randn))
    vae.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].device.type))
    codec = dit_stage.LatentCodec({"mean": [0.0] * 8, "std": [1.0] * 8})
    labels = torch.tensor([0, 1, 2, 0, 1])
    for sampler in ("ddim", "ddpm"):
        config = DiTConfig(sampler=sampler, sample_steps=3, cfg_scale=2.0)
        images = dit_stage.sample_images(model, GaussianDiffusion(), vae, codec, labels, config, seed=0, chunk=4)
        assert images.shape == (5, 3, 32, 32) and images.device.type == "meta"
    assert set(generators) == {"meta"} and set(noise) == {("meta", "meta")} and decoded == ["meta"] * 4


def test_vae_encoding_and_statistics_run_on_the_vaes_device(monkeypatch, tmp_path):
    batches = [{"image": torch.rand(4, 3, 16, 16), "label": torch.arange(4), "key": [f"k{i}-{j}" for j in range(4)]}
               for i in range(3)]
    monkeypatch.setattr(latents, "evaluation_batches", lambda spec: iter(batches))
    monkeypatch.setattr(vae_train, "evaluation_batches", lambda spec: iter(batches))
    vae = _DeviceRecorder()
    count = latents.encode_shard(vae, "unused.tar", tmp_path / "train-000000.tar", 16, 4, hflip=True, device="meta")
    assert count == 24 and vae.seen == ["meta"] * 6
    vae.seen.clear()
    stats = vae_train.latent_statistics(vae, vae_train.rgb01_spec(("unused.tar",), 16, batch_size=4), max_images=8)
    assert vae.seen == ["meta"] * 2 and len(stats["mean"]) == 2


def test_a_gpu_host_trains_the_vae_and_scores_on_the_gpu(monkeypatch, tmp_path):
    from tasks.devices import default_device, stage_device
    from tasks.quality import ImageClassifier

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda" and stage_device(StageContext(data_root=tmp_path)) == "cuda"
    assert stage_device(StageContext(data_root=tmp_path, extra={"device": "cpu"})) == "cpu"
    jobs = []
    monkeypatch.setattr(vae_train, "train", lambda job: jobs.append(job) or TrainSummary(
        steps=0, resumed_from=0, losses=[], images_per_s=0.0, wall_s=0.0))
    monkeypatch.setattr(vae_train, "image_spec", lambda *args, **kwargs: None)
    vae_train.train_vae(VAEConfig(), "unused.json", tmp_path, device="cuda")
    assert jobs[0].dist.device == "cuda"

    class Classifier(_DeviceRecorder):
        def embed(self, x):
            self.seen.append(x.device.type)
            return torch.ones(len(x), 4)

        def head(self, pooled):
            return pooled[:, :2]

    classifier = ImageClassifier(Classifier(), 8, 3, (0.5,) * 3, (0.5,) * 3)
    logits, features = classifier.logits_and_features(torch.rand(5, 3, 8, 8), batch_size=2)
    assert classifier.model.seen == ["meta"] * 3 and logits.device.type == features.device.type == "cpu"

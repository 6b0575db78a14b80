"""The shared training engine: schedule, resume to the step, DDP equivalence, failure modes."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.vit import VisionTransformer
from tasks import mae_pretrain
from tasks.checkpoint import CheckpointMismatch, DamagedFileError, list_checkpoints, load_latest, load_torch_file, save_checkpoint
from tasks.config import MAEConfig, OptimConfig, TrainConfig
from tasks.distributed import DistInfo, leave_process
from tasks.engine import NonFiniteLossError, TrainJob, default_param_groups, lr_factor, peak_learning_rate, train, wrap_model
from tasks.stage import StageContext
from tests.helpers import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), samples_per_shard=50)


def _mae_config(**train_args) -> MAEConfig:
    train = {"batch_size": 16, "steps": 8, "checkpoint_every": 3, "log_every": 1, "eval_every": 100,
             "num_workers": 1, "shuffle_buffer": 64, "optim": {"base_lr": 2e-3, "warmup_steps": 2}} | train_args
    return MAEConfig(encoder_size="nano", image_size=28, patch_size=4, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2, train=TrainConfig.model_validate(train))


def _pretrain(shards, root: Path, config: MAEConfig, stop_after: int | None = None):
    return mae_pretrain.run(config, [shards], StageContext(data_root=root, extra={"stop_after": stop_after}))


def test_warmup_then_cosine_and_linear_scaling():
    optim = OptimConfig(base_lr=1e-3, warmup_steps=10, min_lr=1e-5)
    peak = peak_learning_rate(optim, global_batch=512)
    assert peak == pytest.approx(2e-3)
    factors = [lr_factor(step, 100, optim, peak) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, 100, optim, peak) * peak == pytest.approx(1e-5)
    assert factors[55] == pytest.approx((1e-5 / peak) + (1 - 1e-5 / peak) * 0.5 * (1 + math.cos(math.pi * 0.5)))


class _Mixer(torch.nn.Module):
    """A weight that merely has "token" in its name, and a declared 3-D parameter that has not."""

    def __init__(self, declared: set[str]):
        super().__init__()
        self.token_mixer = torch.nn.Linear(4, 4)
        self.queries = torch.nn.Parameter(torch.zeros(1, 3, 4))
        self.norm = torch.nn.LayerNorm(4)
        self.declared = declared

    def no_weight_decay(self) -> set[str]:
        return self.declared


def _group_names(model: torch.nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in groups]


def test_weight_decay_follows_the_models_declared_set_not_the_spelling():
    model = _Mixer({"queries"})
    decay, plain = _group_names(model, default_param_groups(model, 0.05))
    assert decay == {"token_mixer.weight"}
    assert plain == {"token_mixer.bias", "queries", "norm.weight", "norm.bias"}


def test_a_declared_name_without_a_parameter_is_refused():
    with pytest.raises(ValueError, match=r"_Mixer.no_weight_decay\(\) names no parameter: \['qeuries'\]"):
        default_param_groups(_Mixer({"qeuries"}), 0.05)


def test_mae_declares_its_tokens_and_positions():
    from models.mae import mae_from_name

    model = mae_from_name("nano", img_size=8, patch_size=4, in_chans=1, decoder_embed_dim=16, decoder_depth=1,
                          decoder_num_heads=2)
    decay, plain = _group_names(model, default_param_groups(model, 0.05))
    assert {"mask_token", "encoder.cls_token"} <= plain  # the frozen positions are not trained at all
    assert "decoder_embed.weight" in decay and "encoder.blocks.0.attn.qkv.weight" in decay


def test_norms_biases_and_tokens_are_not_decayed():
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    decay, plain = default_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} >= {"cls_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0


def _curve(result) -> dict:
    return json.loads((Path(result.output_dir) / "train_summary.json").read_text())


def test_kill_and_resume_reproduces_the_uninterrupted_loss_curve(shards, tmp_path, caplog):
    config = _mae_config()
    straight = _pretrain(shards, tmp_path / "straight", config)
    with pytest.raises(RuntimeError, match="run again to resume"):
        _pretrain(shards, tmp_path / "killed", config, stop_after=7)  # dies after step 7; checkpoints: steps 3, 6
    newest = list_checkpoints(tmp_path / "killed" / "stages" / "mae_pretrain" / Path(straight.output_dir).name / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:5000])  # the newest checkpoint is damaged: the older one is used
    resumed = _pretrain(shards, tmp_path / "killed", config)
    assert f"{newest}: damaged" in caplog.text
    assert _curve(resumed)["resumed_from"] == 3
    assert _curve(resumed)["losses"] == _curve(straight)["losses"]  # bit-identical on CPU with a fixed seed
    assert [p.name for p in list_checkpoints(Path(resumed.output_dir) / "checkpoints")] == ["step-00000006.pt", "step-00000008.pt"]


def test_every_checkpoint_damaged_is_named(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"signature": {}}, keep=2)
        (tmp_path / f"step-{step:08d}.pt").write_bytes(b"not a torch file")
    with pytest.raises(DamagedFileError, match=r"every checkpoint is damaged \(step-00000002\.pt, step-00000001\.pt\)"):
        load_latest(tmp_path, {})
    with pytest.raises(DamagedFileError, match=r"step-00000001\.pt: damaged or not a torch file"):
        load_torch_file(tmp_path / "step-00000001.pt")


@pytest.mark.slow
def test_two_rank_kill_and_resume_ends_identical_to_an_uninterrupted_two_rank_run(tmp_path):
    # 200 train samples in 7 shards (6 of 30, one of 20): whole shards dealt to 2 ranks give them unequal
    # epochs, so by step 14 the ranks' data positions differ unless each rank's is saved and balanced.
    uneven = make_shards(tmp_path / "shards", samples_per_shard=30)
    config = _mae_config(steps=16, batch_size=8, checkpoint_every=4, nproc_per_node=2, num_workers=0, shuffle_buffer=16)
    straight = _pretrain(uneven, tmp_path / "straight", config)
    with pytest.raises(RuntimeError, match="run again to resume"):
        _pretrain(uneven, tmp_path / "killed", config, stop_after=14)
    resumed = _pretrain(uneven, tmp_path / "killed", config)
    assert _curve(resumed)["resumed_from"] == 12 and _curve(resumed)["losses"] == _curve(straight)["losses"]
    weights = [torch.load(Path(r.output_dir) / "mae.pt") for r in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_short_real_run_lowers_the_loss_and_exports_a_loadable_encoder(shards, tmp_path):
    result = _pretrain(shards, tmp_path, _mae_config(steps=40, checkpoint_every=40, num_workers=0))
    assert result.metrics["final_loss"] < 0.8 * result.metrics["first_loss"]
    manifest = result.manifest()
    arch = manifest["outputs"]["architecture"]
    encoder = VisionTransformer(img_size=arch["image_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"],
                                embed_dim=64, depth=4, num_heads=4)
    encoder.load_state_dict(torch.load(Path(result.output_dir) / "encoder.pt"), strict=True)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    model = torch.nn.Linear(2, 1)
    batches = lambda epoch, skip: iter([(0, 0, {"image": torch.ones(4, 2)})] * 3)
    job = TrainJob(model=model, loss_fn=lambda m, b: (m(b["image"]).sum() * float("nan"), {}), batches=batches,
                   config=TrainConfig(steps=2, batch_size=4), checkpoint_dir=tmp_path, signature={})
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        train(job)
    assert not list_checkpoints(tmp_path)


def test_train_compile_runs_the_loss_through_the_compiled_model_and_saves_the_plain_one(monkeypatch, tmp_path):
    compiled = []

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper: same forward, another object
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(options) or Compiled(module))
    called_with = []
    model = torch.nn.Linear(2, 1)
    batches = lambda epoch, skip: iter([(0, 0, {"image": torch.ones(4, 2)})] * 3)

    def loss_fn(m, batch):
        called_with.append(type(m).__name__)
        return m(batch["image"]).pow(2).mean(), {}

    job = TrainJob(model=model, loss_fn=loss_fn, batches=batches, config=TrainConfig(steps=2, batch_size=4, compile=True),
                   checkpoint_dir=tmp_path, signature={})
    train(job)
    assert compiled == [{"dynamic": False}] and called_with == ["Compiled", "Compiled"]
    saved = torch.load(list_checkpoints(tmp_path)[-1], weights_only=False)["model"]
    assert set(saved) == {"weight", "bias"}  # no wrapper prefix: a compiled run resumes and exports as usual


def test_checkpoint_of_another_model_config_is_refused_before_training(shards, tmp_path):
    config = _mae_config(steps=3)
    _pretrain(shards, tmp_path, config, stop_after=3)  # leaves checkpoints, no export: stop_after == steps exports
    output = next((tmp_path / "stages" / "mae_pretrain").iterdir())
    checkpoint = list_checkpoints(output / "checkpoints")[-1]
    state = torch.load(checkpoint, weights_only=False)
    state["signature"]["decoder_depth"] = 7
    save_checkpoint(output / "checkpoints", 99, state, keep=5)
    (output / "manifest.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointMismatch, match="decoder_depth: checkpoint 7 vs config 1"):
        _pretrain(shards, tmp_path, config)


def test_bad_geometry_fails_before_training():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        MAEConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0)


def _ddp_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    images, labels = torch.load(Path(out_dir) / "batch.pt")
    wrapped = wrap_model(model, DistInfo(rank=rank, world_size=world))
    half = len(images) // world
    piece = slice(rank * half, (rank + 1) * half)
    torch.nn.functional.cross_entropy(wrapped(images[piece]), labels[piece]).backward()
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, Path(out_dir) / f"grads-{rank}.pt")
    torch.distributed.destroy_process_group()
    leave_process(0)  # as a torchrun rank leaves: no interpreter finalization racing gloo's threads (SIGABRT)


def test_two_process_gloo_ddp_gives_the_single_process_gradients(tmp_path):
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    torch.save((images, labels), tmp_path / "batch.pt")
    mp.start_processes(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads-{rank}.pt")
        assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, param in model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_stage_under_torchrun_with_two_cpu_processes(shards, tmp_path):
    result = _pretrain(shards, tmp_path, _mae_config(steps=4, nproc_per_node=2, num_workers=0))
    assert (Path(result.output_dir) / "encoder.pt").is_file()
    assert result.metrics["steps"] == 4 and result.manifest()["config"]["train"]["nproc_per_node"] == 2
    summary = json.loads((Path(result.output_dir) / "train_summary.json").read_text())
    assert len(summary["losses"]) == 4 and all(math.isfinite(x) for x in summary["losses"])


@pytest.mark.slow
def test_a_damaged_shard_read_by_a_torchrun_rank_reaches_the_launcher_as_that_error(tmp_path):
    """torchrun passes on only an exit code; the rank's ShardError (which shard, what to do) must
    still be what the stage raises, as a BadInputError the pipeline does not retry."""
    from data_shards.errors import BadInputError

    damaged = make_shards(tmp_path / "shards", samples_per_shard=50)
    for shard in Path(damaged.output_dir).glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut mid-member
    with pytest.raises(BadInputError, match=r"ShardError on rank \d: .*train-\d+\.tar") as caught:
        _pretrain(damaged, tmp_path, _mae_config(steps=4, nproc_per_node=2, num_workers=0))
    assert caught.value.hint and "shard" in caught.value.hint


@pytest.mark.slow
def test_two_nodes_of_one_process_match_one_node_of_two(shards, tmp_path, monkeypatch):
    """Training past one machine: two torchrun agents meet at a c10d rendezvous on a loopback port,
    the second started from the join script the stage writes, as another node would; the loss
    curve and weights equal one node running two processes. One compute thread everywhere: torchrun
    sets it only when a node runs several processes, and another thread split sums the matmuls in
    another order (a 1e-7 difference that Adam's normalised steps can grow). Pinned, the runs come out
    bit-identical here; the tolerance only keeps another machine's kernels from failing the test."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import socket
    import subprocess
    import threading

    from tasks.stage import stage_output_dir

    one_node = _pretrain(shards, tmp_path / "one", _mae_config(steps=6, nproc_per_node=2, num_workers=0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _mae_config(steps=6, nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", num_workers=0)
    root = tmp_path / "two"
    outcome: dict = {}
    first = threading.Thread(target=lambda: outcome.update(result=_pretrain(shards, root, config)))
    first.start()  # node A: the stage itself, waiting at the rendezvous
    join = stage_output_dir(root, "mae_pretrain", config, [shards]) / "job.join.sh"
    deadline = time.monotonic() + 120
    while not join.is_file():
        assert first.is_alive() and time.monotonic() < deadline, "the stage wrote no join script"
        time.sleep(0.2)
    node_b = subprocess.run(["sh", str(join)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    first.join(timeout=300)
    assert node_b.returncode == 0, node_b.stdout[-2000:] + node_b.stderr[-2000:]
    two_nodes = outcome["result"]
    assert _curve(two_nodes)["losses"] == pytest.approx(_curve(one_node)["losses"], rel=1e-5)
    weights = [torch.load(Path(r.output_dir) / "encoder.pt") for r in (one_node, two_nodes)]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-3, atol=1e-4, msg=name)

import pytest

from tasks.config import (TRAINING_SECTIONS, ConfigError, MAEConfig, PipelineConfig, available_presets, load_config,
                          parse_override)


@pytest.mark.parametrize("preset", ["smoke", "demo", "small", "base"])
def test_every_named_preset_validates(preset, tmp_path):
    config = load_config(preset, data_root=tmp_path)
    assert config.preset == preset
    assert config.data_root == str(tmp_path.resolve())


def test_presets_listed():
    assert {"smoke", "demo", "small", "base"} <= set(available_presets())


def test_unknown_key_names_its_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"mae\.train\.stepz"):
        load_config("smoke", ["mae.train.stepz=3"], data_root=tmp_path)


def test_bad_value_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"mae\.mask_ratio"):
        load_config("smoke", ["mae.mask_ratio=1.5"], data_root=tmp_path)
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        load_config("smoke", ["mae.patch_size=5"], data_root=tmp_path)


def test_overrides_are_typed(tmp_path):
    config = load_config("smoke", ["mae.train.steps=17", "shard.source.max_train=64"], data_root=tmp_path)
    assert config.mae.train.steps == 17 and config.shard.source.max_train == 64
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("novalue")


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        load_config("nonexistent")


def test_data_root_flag_beats_env_beats_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_DATA_ROOT", str(tmp_path / "env"))
    assert load_config("smoke").data_root == str(tmp_path / "env")
    assert load_config("smoke", data_root=tmp_path / "flag").data_root == str(tmp_path / "flag")
    monkeypatch.delenv("PATCHFLOW_DATA_ROOT")
    assert load_config("smoke").data_root.endswith(".patchflow")


def test_stage_key_follows_config_and_upstream_outputs_only(tmp_path):
    from tasks.stage import StageResult, stage_key

    def upstream(digest: str) -> StageResult:
        return StageResult(stage="shard", output_dir="x", manifest_path="x/manifest.json", digest=digest)

    config = load_config("smoke", data_root=tmp_path).mae
    same = load_config("smoke", data_root=tmp_path / "elsewhere").mae
    changed = load_config("smoke", ["mae.mask_ratio=0.6"], data_root=tmp_path).mae
    key = stage_key("mae_pretrain", config, [upstream("a")])
    assert key == stage_key("mae_pretrain", same, [upstream("a")])  # the data root is not part of the key
    assert key != stage_key("mae_pretrain", changed, [upstream("a")])
    assert key != stage_key("mae_pretrain", config, [upstream("b")])
    assert key != stage_key("evaluate", config, [upstream("a")])


def test_pipeline_precision_sets_every_training_stage_that_leaves_it_at_auto(tmp_path):
    from tasks.stage import stage_key

    default = load_config("smoke", data_root=tmp_path)
    trains = [getattr(getattr(default, section), field) for section, field in TRAINING_SECTIONS]
    trains = {train.precision for train in trains if train is not None}  # smoke trains no decoder fine-tune
    assert default.precision == "auto" and trains == {"auto"}
    config = load_config("demo", ["precision=bf16", "dit.train.precision=fp32"], data_root=tmp_path)
    assert config.mae.train.precision == config.evaluate.finetune_train.precision == config.clip.train.precision == "bf16"
    assert config.vae.train.precision == config.vae.decoder_finetune.precision == "bf16"
    assert config.dit.train.precision == "fp32"  # a stage's own setting wins
    # The precision is in each stage's own section, so a bf16 stage never reuses an fp32 one's outputs.
    demo = load_config("demo", data_root=tmp_path)
    assert stage_key("mae_pretrain", config.mae, []) != stage_key("mae_pretrain", demo.mae, [])
    assert config.mae.model_copy(update={"train": demo.mae.train}) == demo.mae  # and nothing else changed
    # A written-out config carries each stage's value, not the switch, so it reloads to the same stages.
    dumped = config.model_dump()
    assert "precision" not in dumped and dumped["mae"]["train"]["precision"] == "bf16"
    assert PipelineConfig.model_validate(dumped).model_dump() == dumped
    # The caller's own sections are copied, not changed.
    mine = MAEConfig()
    assert PipelineConfig(precision="bf16", mae=mine).mae.train.precision == "bf16"
    assert mine.train.precision == "auto"
    with pytest.raises(ConfigError, match=r"precision: Input should be 'auto', 'fp32' or 'bf16'"):
        load_config("smoke", ["precision=fp16"], data_root=tmp_path)


# Each override breaks one check that used to fail only when its stage started (or never).
@pytest.mark.parametrize("override, message", [
    ("mae.train.steps=true", r"mae\.train\.steps: expected int, got true"),
    ("mae.mask_ratio=false", r"mae\.mask_ratio: expected float, got false"),
    ("shard.source.max_train=true", r"shard\.source\.max_train: expected int \| None, got true"),
    ("clip.train.optim.betas=[true, 0.98]", r"clip\.train\.optim\.betas: expected tuple\[float, float\], got a boolean"),
    ("evaluate.feature_blocks=5", r"evaluate\.feature_blocks=5 exceeds the depth 4 of the mae\.encoder_size='nano' "
                                  r"encoder; allowed: 1\.\.4"),
    ("dit.model=DiT-N/3", r"dit\.model='DiT-N/3': patch size 3 does not tile the 4x4 latents of vae\.image_size=32 "
                          r"\(/8\); allowed patch sizes: \[1, 2, 4\]"),
    ("dit.model=DiT-Q/2", r"dit\.model: unknown DiT name 'DiT-Q/2'.*size in \['B', 'L', 'N', 'S', 'T', 'XL'\]"),
    ("mae.encoder_size=gigantic", r"mae\.encoder_size: unknown ViT size 'gigantic'; allowed: nano, micro"),
    ("clip.vision_size=gigantic", r"clip\.vision_size: unknown ViT size 'gigantic'"),
    ("clip.vision_size=micro", r"clip\.vision_size='micro' differs from mae\.encoder_size='nano'"),
    ("clip.image_size=32", r"clip\.image_size=32 differs from mae\.image_size=28"),
    ("clip.patch_size=7", r"clip\.patch_size=7 differs from mae\.patch_size=4"),
    ("stages=[shard, clip_train]", r"clip\.image_init='mae' needs mae_pretrain in stages"),
    ("stages=[shard, mae_pretrain, index]", r"index\.targets\[1\] \('pairs-clip'\): dataset 'pairs' is not produced"),
    ("mae.decoder_num_heads=3", r"decoder_embed_dim 32 is not divisible by decoder_num_heads 3"),
    # A stage without its upstream would be skipped and the run would exit 0 having done nothing asked.
    ("stages=[evaluate]", r"stages: evaluate needs mae_pretrain \(its upstream\)"),
    ("stages=[shard, vae, dit_train]", r"stages: dit_train needs encode_latents \(its upstream\)"),
    ("vae.train.nproc_per_node=2", r"vae\.train: the VAE trains in one process"),
])
def test_bad_override_fails_at_load_naming_the_fields(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override], data_root=tmp_path)


def test_checks_follow_the_enabled_stages(tmp_path):
    # A mismatch in a stage that does not run is no reason to refuse the run.
    config = load_config("smoke", ["stages=[shard, mae_pretrain]", "dit.model=DiT-N/3", "evaluate.feature_blocks=9",
                                   "clip.vision_size=micro"], data_root=tmp_path)
    assert config.dit.patch_size == 3
    assert load_config("smoke", ["clip.image_init=random", "clip.vision_size=micro"], data_root=tmp_path).clip.vision_size == "micro"
    assert load_config("smoke", ["mae.norm_pix_loss=false"], data_root=tmp_path).mae.norm_pix_loss is False


def test_config_loading_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tasks.config; tasks.config.load_config('demo'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

import pytest

from tasks.config import ConfigError, available_presets, load_config, parse_override


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

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


def test_config_digest_changes_with_values(tmp_path):
    a = load_config("smoke", data_root=tmp_path).shard
    b = load_config("smoke", ["shard.samples_per_shard=7"], data_root=tmp_path).shard
    assert a.digest() == load_config("smoke", data_root=tmp_path).shard.digest()
    assert a.digest() != b.digest()

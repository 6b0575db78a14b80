"""Stage keys follow what a stage's outputs depend on: the source files, the stage's code, the config
values that change results; and nothing else (execution settings, unrelated modules, comments)."""

from __future__ import annotations

import builtins
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_shards import fashion_mnist
from data_shards.samples import SourceError
from data_shards.sources import SOURCE_UNAVAILABLE, source_fingerprint
from tasks import shard, vae_train
from tasks.config import STAGES, CLIPConfig, DiTConfig, EvalConfig, MAEConfig, ShardConfig, SourceConfig, VAEConfig
from tasks.stage import STAGE_MODULES, StageContext, StageResult, code_modules, stage_key, stage_output_dir

REPO = Path(__file__).resolve().parent.parent


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def _touch(path: Path) -> None:
    """Move the file's modification time a second on, keeping its bytes."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _image_folder(root: Path, per_class: int = 3) -> Path:
    for cls in ("cat", "dog"):
        for i in range(per_class):
            _png(root / "train" / cls / f"{cls}{i}.png", (40 * i + (100 if cls == "dog" else 0)) % 256)
    return root


def _shard_config(source: SourceConfig) -> ShardConfig:
    return ShardConfig(source=source, samples_per_shard=4, workers=1)


def _shard_dir(data_root: Path, config: ShardConfig) -> Path:
    return stage_output_dir(data_root, "shard", config, [])


# ----------------------------------------------------------------------------- (a) image folders

def test_image_folder_that_gains_an_image_is_sharded_again(tmp_path, monkeypatch):
    folder = _image_folder(tmp_path / "images")
    config = _shard_config(SourceConfig(kind="image_folder", path=str(folder), val_fraction=0.0))
    context = StageContext(data_root=tmp_path / "root")
    first = shard.run(config, [], context)
    assert first.output_dir == str(_shard_dir(context.data_root, config))
    recorded = first.manifest()["external_inputs"]["source"]
    assert recorded.startswith("image_folder: 6 files")

    real_write = shard.write_split
    monkeypatch.setattr("tasks.shard.write_split", lambda *a, **k: pytest.fail("unchanged source was sharded again"))
    again = shard.run(config, [], context)
    assert again.reused and again.output_dir == first.output_dir

    _png(folder / "train" / "cat" / "cat9.png", 7)
    assert _shard_dir(context.data_root, config) != Path(first.output_dir)
    monkeypatch.setattr("tasks.shard.write_split", real_write)
    grown = shard.run(config, [], context)
    assert not grown.reused and grown.output_dir != first.output_dir
    assert grown.manifest()["outputs"]["splits"]["train"]["num_samples"] == 7
    assert grown.manifest()["external_inputs"]["source"] != recorded


def test_prefect_cache_key_sees_the_new_image_before_any_lookup(tmp_path):
    from flows.pipeline import stage_cache_key

    folder = _image_folder(tmp_path / "images")
    config = _shard_config(SourceConfig(kind="image_folder", path=str(folder)))
    context = SimpleNamespace(task=SimpleNamespace(name="shard"))
    parameters = {"config": config, "inputs": [], "context": StageContext(data_root=tmp_path / "root")}
    before = stage_cache_key(context, parameters)
    assert before == stage_cache_key(context, parameters)
    (folder / "train" / "dog" / "dog0.png").unlink()
    assert stage_cache_key(context, parameters) != before


def test_fingerprinting_a_folder_reads_no_image(tmp_path, monkeypatch):
    folder = _image_folder(tmp_path / "images", per_class=50)
    source = SourceConfig(kind="image_folder", path=str(folder))
    real_open = builtins.open

    def no_image_reads(file, *args, **kwargs):
        if str(file).endswith(".png"):
            pytest.fail(f"fingerprint read {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_image_reads)
    assert source_fingerprint(source, tmp_path).startswith("image_folder: 100 files")


def test_a_touched_image_or_a_zip_with_another_member_changes_the_key(tmp_path):
    folder = _image_folder(tmp_path / "images")
    source = SourceConfig(kind="image_folder", path=str(folder))
    before = source_fingerprint(source, tmp_path)
    _touch(folder / "train" / "cat" / "cat0.png")
    assert source_fingerprint(source, tmp_path) != before

    archive = Path(shutil.make_archive(str(tmp_path / "images"), "zip", folder))
    zipped = SourceConfig(kind="image_folder", path=str(archive))
    before_zip = source_fingerprint(zipped, tmp_path)
    _png(folder / "train" / "dog" / "dog0.png", 1)  # same size, other pixels: another CRC
    shutil.make_archive(str(tmp_path / "images"), "zip", folder)
    assert source_fingerprint(zipped, tmp_path) != before_zip


# ----------------------------------------------------------------------------- (b) caption tables

def test_caption_table_key_follows_the_table_bytes_and_its_images(tmp_path):
    folder = tmp_path / "pairs"
    for name, value in (("a.png", 10), ("b.png", 200)):
        _png(folder / "images" / name, value)
    table = folder / "captions.tsv"
    table.write_text("file\tname\na.png\tred apple\nb.png\tblue bird\n")
    config = _shard_config(SourceConfig(kind="caption_table", path=str(folder)))
    first = _shard_dir(tmp_path, config)

    stat = table.stat()
    table.write_text("file\tname\na.png\tred apples\nb.png\tblue bir\n")  # same size, same times
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _shard_dir(tmp_path, config) != first, "a rewritten caption must re-shard even with size and time kept"

    table.write_text("file\tname\na.png\tred apple\nb.png\tblue bird\n")
    assert _shard_dir(tmp_path, config) == first, "touching the table without changing its bytes keeps the shards"
    _touch(folder / "images" / "b.png")
    assert _shard_dir(tmp_path, config) != first


def test_webdataset_key_follows_its_tar_files(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-0.tar").write_bytes(b"x" * 512)
    source = SourceConfig(kind="webdataset", path=str(tmp_path / "shards"))
    before = source_fingerprint(source, tmp_path)
    (tmp_path / "shards" / "train-1.tar").write_bytes(b"y" * 512)
    assert source_fingerprint(source, tmp_path) != before


def test_missing_source_gives_a_key_and_the_stage_reports_it(tmp_path):
    source = SourceConfig(kind="image_folder", path=str(tmp_path / "nowhere"))
    assert source_fingerprint(source, tmp_path) == SOURCE_UNAVAILABLE
    with pytest.raises(SourceError, match="does not exist"):
        shard.run(_shard_config(source), [], StageContext(data_root=tmp_path))


# ----------------------------------------------------------------------------- fashion_mnist, vae weights

def _write_idx(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("t10k", count // 2)):
        images = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = (2049).to_bytes(4, "big") + n.to_bytes(4, "big")
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def test_fashion_mnist_fetched_by_the_first_run_is_reused_by_the_next(tmp_path, monkeypatch):
    """Before its download the source has no fingerprint; the run that fetches it names its shards by the
    fetched files, so the next run (which fingerprints them) reuses those shards."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-package")

    def fake_download(root: Path) -> Path:
        _write_idx(root / "FashionMNIST" / "raw", 40)
        return root / "FashionMNIST" / "raw"

    monkeypatch.setattr(fashion_mnist, "_try_torchvision_download", fake_download)
    config = _shard_config(SourceConfig(kind="fashion_mnist", max_train=20, max_val=4, max_test=4))
    context = StageContext(data_root=tmp_path / "root")
    assert source_fingerprint(config.source, context.data_root) == SOURCE_UNAVAILABLE
    first = shard.run(config, [], context)
    assert first.manifest()["external_inputs"]["source"].startswith("fashion_mnist: 8 files")
    assert Path(first.output_dir) == _shard_dir(context.data_root, config)
    assert shard.run(config, [], context).reused


def test_pretrained_vae_weights_are_part_of_the_vae_key(tmp_path):
    weights = tmp_path / "taef2"
    weights.mkdir()
    for name in vae_train.TAEF2_FILES:
        (weights / name).write_bytes(b"weights-v1")
    upstream = [StageResult(stage="shard", output_dir="x", manifest_path="x/manifest.json", digest="abc")]
    config = VAEConfig(pretrained_dir=str(weights))
    first = stage_output_dir(tmp_path, "vae", config, upstream)
    (weights / vae_train.TAEF2_FILES[1]).write_bytes(b"weights-v2")
    assert stage_output_dir(tmp_path, "vae", config, upstream) != first
    assert vae_train.external_inputs(VAEConfig(), tmp_path) == {}  # trained here: nothing outside the data root


# ----------------------------------------------------------------------------- (c) code changes

_KEYS_SCRIPT = """
import json
from tasks.config import DiTConfig, EvalConfig, MAEConfig, ShardConfig
from tasks.stage import StageResult, stage_key
up = [StageResult(stage="shard", output_dir="x", manifest_path="x/manifest.json", digest="abc")]
print(json.dumps({"shard": stage_key("shard", ShardConfig(), [], {"source": "fixed"}),
                  "mae_pretrain": stage_key("mae_pretrain", MAEConfig(), up),
                  "evaluate": stage_key("evaluate", EvalConfig(), up),
                  "dit_train": stage_key("dit_train", DiTConfig(), up)}))
"""


def _copy_project(destination: Path) -> Path:
    for package in ("models", "data_shards", "tasks"):
        shutil.copytree(REPO / package, destination / package, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def _keys_of(project: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _KEYS_SCRIPT], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not once in {path}"
    path.write_text(text.replace(old, new))


def test_a_code_change_rekeys_the_stages_that_run_that_code_only(tmp_path):
    project = _copy_project(tmp_path / "project")
    original = _keys_of(project)
    assert original == _keys_of(REPO)  # the key does not depend on where the project lives

    mae_file = project / "models" / "mae.py"
    _edit(mae_file, "import torch\n", "import torch  # a comment changes no output\n")
    assert _keys_of(project) == original

    _edit(project / "tasks" / "config.py", '"Loader worker processes per rank."', '"Loader worker processes, per rank."')
    assert _keys_of(project) == original, "config classes are outside the code hash: their values are in the key"

    _edit(mae_file, "# a comment changes no output\n", "\nPATCH_ORDER = 'row-major'\n")
    changed = _keys_of(project)
    assert changed["mae_pretrain"] != original["mae_pretrain"]
    assert {k: changed[k] for k in ("shard", "evaluate", "dit_train")} == {
        k: original[k] for k in ("shard", "evaluate", "dit_train")}


def test_every_stage_names_the_module_it_runs():
    assert set(STAGE_MODULES) == set(STAGES)
    assert all(importlib.import_module(module).STAGE == stage for stage, module in STAGE_MODULES.items())


def test_stage_code_is_found_by_following_its_imports():
    modules = code_modules("tasks.mae_pretrain")
    assert {"tasks.mae_pretrain", "tasks.engine", "models.mae", "models.vit", "models.layers", "data_shards.loader"} <= set(modules)
    assert "models.dit" not in modules and "tasks.config" not in modules
    assert "models.dit" in code_modules("tasks.dit_stage")


# ----------------------------------------------------------------------------- (d) execution-only settings

UP = [StageResult(stage="shard", output_dir="x", manifest_path="x/manifest.json", digest="abc")]


def _mae(**train: object) -> MAEConfig:
    return MAEConfig(train=MAEConfig().train.model_copy(update=train))


@pytest.mark.parametrize("setting", [{"log_every": 3}, {"num_workers": 4}, {"checkpoint_every": 7},
                                     {"keep_checkpoints": 5}, {"rdzv_endpoint": "node0:29500"}])
def test_execution_settings_keep_the_key(setting):
    assert stage_key("mae_pretrain", _mae(**setting), UP) == stage_key("mae_pretrain", _mae(), UP)


@pytest.mark.parametrize("setting", [{"steps": 7}, {"nproc_per_node": 2}, {"batch_size": 16}])
def test_settings_that_change_results_change_the_key(setting):
    assert stage_key("mae_pretrain", _mae(**setting), UP) != stage_key("mae_pretrain", _mae(), UP)


def test_execution_settings_are_ignored_in_nested_and_derived_sections_too():
    dit, evaluate, clip = DiTConfig(), EvalConfig(), CLIPConfig()
    quieter = DiTConfig(train=dit.train.model_copy(update={"log_every": 1, "num_workers": 3}))
    assert stage_key("dit_train", quieter, UP) == stage_key("dit_train", dit, UP)
    finetune = evaluate.finetune_train.model_copy(update={"checkpoint_every": 1})
    assert stage_key("evaluate", EvalConfig(finetune_train=finetune), UP) == stage_key("evaluate", evaluate, UP)
    assert stage_key("clip_train", CLIPConfig(eval_batch_size=32), UP) == stage_key("clip_train", clip, UP)
    assert stage_key("shard", ShardConfig(workers=8), [], {}) == stage_key("shard", ShardConfig(), [], {})


# ----------------------------------------------------------------------------- through Prefect

@pytest.mark.slow
def test_scheduled_rerun_is_cached_until_the_folder_gains_an_image(prefect_harness, tmp_path):
    from flows.pipeline import pipeline
    from tests.test_pipeline import _task_states

    folder = _image_folder(tmp_path / "images")
    overrides = ["stages=[shard]", "shard.source.kind=image_folder", f"shard.source.path={folder}"]
    runs = []
    for grow in (False, False, True):
        if grow:
            _png(folder / "train" / "dog" / "dog9.png", 3)
        state = pipeline(preset="smoke", overrides=overrides, data_root=str(tmp_path / "root"), return_state=True)
        runs.append((_task_states(state.state_details.flow_run_id)["shard"], state.result()["shard"]))
    (first_state, first), (second_state, second), (third_state, third) = runs
    assert (first_state, second_state, third_state) == ("Completed", "Cached", "Completed")
    assert second.output_dir == first.output_dir != third.output_dir
    assert sum(split["num_samples"] for split in third.manifest()["outputs"]["splits"].values()) == 7

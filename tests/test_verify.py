"""Reused outputs are verified: damaged files are named, `patchflow verify` reports them, and the
next run recomputes the damaged stage; `patchflow run --rerun STAGE` recomputes a stage and its dependants."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import verify
from tasks.verify import verify_stage
from tests._shared_data import REPO_ROOT, require_shared
from tests.helpers import make_shards


def _flip_byte(path: Path, offset: int = 700) -> None:
    """Damage a file in place without changing its size (what a bad disk or a stray write does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def built_shards(tmp_path_factory) -> Path:
    return Path(make_shards(tmp_path_factory.mktemp("shards")).output_dir)


@pytest.fixture
def shards(built_shards, tmp_path) -> Path:
    """A private copy of one finished shard stage (each test damages its own)."""
    return Path(shutil.copytree(built_shards, tmp_path / built_shards.name))


def test_manifest_records_size_and_sha256_of_every_output(shards):
    files = json.loads((shards / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in shards.glob("*.tar"))
    tar = files["train-000000.tar"]
    assert tar["bytes"] == (shards / "train-000000.tar").stat().st_size and len(tar["sha256"]) == 64
    assert verify_stage(shards) == []


def test_damage_is_named_by_file(shards):
    _flip_byte(shards / "train-000001.tar")
    (shards / "val-000000.tar").write_bytes(b"short")
    (shards / "test-000000.tar").unlink()
    assert verify_stage(shards) == [
        "test-000000.tar: missing",
        "train-000001.tar: sha256 differs from the manifest (contents changed since the stage finished)",
        "val-000000.tar: 5 bytes, the manifest says " + str(json.loads((shards / "manifest.json").read_text())
                                                              ["files"]["val-000000.tar"]["bytes"]),
    ]
    (shards / "manifest.json").unlink()
    assert verify_stage(shards) == ["manifest.json: missing (the stage did not finish, or its folder was removed)"]


def test_hashes_are_cached_per_path_size_and_mtime(shards, monkeypatch):
    calls = []
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda path: calls.append(Path(path).name) or real(path))
    verify._hashes.clear()
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert verify_stage(shards) == [] and sorted(calls) == tars  # every shard hashed once
    assert verify_stage(shards) == [] and len(calls) == len(tars)  # the second check in this process is free
    _flip_byte(shards / "val-000000.tar")  # a new mtime: hashed again, and the change is seen
    assert verify_stage(shards)[0].startswith("val-000000.tar: sha256 differs")
    assert calls[len(tars):] == ["val-000000.tar"]


def test_old_manifest_without_file_records_is_checked_for_existence(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["files"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    _flip_byte(shards / "train-000000.tar")
    assert verify_stage(shards) == []  # no record of its hash to compare with
    (shards / "train-000001.tar").unlink()
    assert verify_stage(shards) == ["train-000001.tar: missing"]


# ------------------------------------------------ through the CLI, on one finished smoke run

STAGES = "[shard, mae_pretrain, evaluate, vae]"  # mae_pretrain's dependant (evaluate) and a bystander (vae)


def _patchflow(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_HOME": str(root / "prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # its own temporary Prefect server, never the session's test harness
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--data-root", str(root)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)


def _run(root: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"shard.source.path={require_shared('fashion-mnist')}", f"stages={STAGES}", "mae.train.steps=2",
                 "evaluate.finetune=false", "vae.train.steps=2"]
    done = _patchflow(root, "run", "--preset", "smoke", *[a for o in overrides for a in ("--set", o)], *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _manifests(root: Path) -> dict[str, int]:
    """Stage name -> mtime of its newest manifest: a stage that recomputed writes a new one."""
    found: dict[str, int] = {}
    for path in (root / "stages").glob("*/*/manifest.json"):
        found[path.parent.parent.name] = max(found.get(path.parent.parent.name, 0), path.stat().st_mtime_ns)
    assert set(found) == {"shard", "mae_pretrain", "evaluate", "vae"}
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-run")
    _run(root)
    return root


@pytest.mark.slow
def test_flipped_shard_byte_is_reported_then_recomputed(finished_run):
    root = finished_run
    (shard_dir,) = (root / "stages" / "shard").iterdir()
    assert _patchflow(root, "verify").returncode == 0
    _flip_byte(shard_dir / "train-000002.tar")
    before = _manifests(root)

    report = _patchflow(root, "verify")
    assert report.returncode == 1
    assert (f"shard/{shard_dir.name}: DAMAGED: train-000002.tar: sha256 differs from the manifest"
            in report.stdout), report.stdout
    assert "mae_pretrain/" in report.stdout and "4 finished stage folder(s)" in report.stdout

    rerun = _run(root)
    log = rerun.stdout + rerun.stderr
    assert f"shard: reused outputs in {shard_dir} are damaged (train-000002.tar: sha256 differs" in log
    after = _manifests(root)
    assert after["shard"] != before["shard"]  # the shard stage ran again ...
    # ... and wrote the same bytes, so the stages after it kept their cache keys and were reused.
    assert {k: after[k] for k in ("mae_pretrain", "evaluate", "vae")} == {k: before[k] for k in ("mae_pretrain", "evaluate", "vae")}
    assert _patchflow(root, "verify").returncode == 0


@pytest.mark.slow
def test_rerun_recomputes_the_stage_and_its_dependants_only(finished_run):
    root = finished_run
    before = _manifests(root)
    rerun = _run(root, "--rerun", "mae_pretrain")
    log = rerun.stdout + rerun.stderr
    assert "mae_pretrain: recomputing (--rerun mae_pretrain)" in log and "evaluate: recomputing (--rerun mae_pretrain)" in log
    after = _manifests(root)
    assert after["mae_pretrain"] != before["mae_pretrain"] and after["evaluate"] != before["evaluate"]
    assert after["shard"] == before["shard"] and after["vae"] == before["vae"]
    assert len(list((root / "stages" / "mae_pretrain").iterdir())) == 1  # the old folder was replaced, not left beside
    assert _patchflow(root, "verify").returncode == 0


def test_rerun_rejects_an_unknown_stage(tmp_path):
    done = _patchflow(tmp_path, "run", "--preset", "smoke", "--rerun", "mae")
    assert done.returncode == 2 and "argument --rerun: invalid choice: 'mae'" in done.stderr

"""A stage run in a process of its own (how stages run side by side) computes what it computes in
the pipeline's process, and its failure comes back as the same error, with its hint and traceback."""

from __future__ import annotations

import pickle
import traceback
from pathlib import Path

import pytest

from data_shards.errors import BadInputError, TransientError
from data_shards.samples import SourceError
from flows.stage_process import run_in_process
from tasks import shard
from tasks.config import ShardConfig, SourceConfig
from tasks.stage import StageContext
from tests.helpers import fashion_source, manifest


def test_a_stage_in_its_own_process_writes_the_same_outputs_and_logs_through_the_parent(tmp_path, caplog):
    config = ShardConfig(source=fashion_source(), samples_per_shard=50)
    here = shard.run(config, [], StageContext(data_root=tmp_path / "here"))
    with caplog.at_level("INFO", logger="patchflow"):
        there = run_in_process("shard", config, [], StageContext(data_root=tmp_path / "there", process_threads=1))
    assert Path(there.output_dir).parent.parent.parent == tmp_path / "there"
    assert Path(there.output_dir).name == Path(here.output_dir).name  # the same key
    assert there.digest == here.digest  # byte-identical shards, so the same outputs digest
    assert manifest(there)["outputs"] == manifest(here)["outputs"]
    relayed = [r for r in caplog.records if r.name == "patchflow.shard" and "wrote 280 samples" in r.getMessage()]
    assert relayed, [r.getMessage() for r in caplog.records]  # the child's record, under its own logger name


def test_bad_input_in_the_stage_process_is_raised_here_with_its_class_hint_and_traceback(tmp_path):
    missing = tmp_path / "no-such-folder"
    config = ShardConfig(source=SourceConfig(kind="image_folder", path=str(missing)))
    with pytest.raises(SourceError) as raised:
        run_in_process("shard", config, [], StageContext(data_root=tmp_path / "root", process_threads=1))
    assert str(missing) in str(raised.value)
    assert isinstance(raised.value, BadInputError)  # not retried by the pipeline
    in_process = pytest.raises(SourceError, shard.run, config, [], StageContext(data_root=tmp_path / "root2"))
    assert raised.value.hint and raised.value.hint == in_process.value.hint  # the fix, not only the fault
    assert "raised in shard's own process" in "".join(traceback.format_exception(raised.value))


def test_errors_keep_their_hint_through_pickle():
    error = pickle.loads(pickle.dumps(TransientError("lost the API", hint="run it again")))
    assert isinstance(error, TransientError) and str(error) == "lost the API" and error.hint == "run it again"

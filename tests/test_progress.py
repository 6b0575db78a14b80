"""Progress where work is long: a bar in a terminal only, and training log lines that name the
stage, rank, step and time left."""

from __future__ import annotations

import sys
from pathlib import Path

from data_shards import progress as progress_module
from data_shards.progress import progress
from tasks.engine import _clock, _job_label


def test_no_bar_outside_a_terminal(capsys):
    assert list(progress(range(5), "shard: writing train", 5)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_that_names_the_work(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("PATCHFLOW_PROGRESS", "auto")
    assert progress_module.show_progress()
    assert list(progress(iter("abc"), "index: embedding pairs-clip", 3)) == ["a", "b", "c"]
    assert "index: embedding pairs-clip" in capsys.readouterr().err
    monkeypatch.setenv("PATCHFLOW_PROGRESS", "off")
    assert not progress_module.show_progress()


def test_training_lines_name_the_stage_and_the_time_left():
    root = Path("/data/stages")
    assert _job_label(root / "mae_pretrain" / "0a1b" / "checkpoints") == "mae_pretrain"
    assert _job_label(root / "evaluate" / "0a1b" / "finetune" / "checkpoints") == "evaluate/finetune"
    assert _job_label(Path("/tmp/checkpoints")) == "train"
    assert _clock(75) == "1m15s" and _clock(3 * 3600 + 120) == "3h02m"

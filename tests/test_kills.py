"""A SIGKILLed training process resumes and ends bit-identical to an uninterrupted run.

The core of ``benchmarks/bench_kills.py`` on one stage with one kill; the script itself covers every
training stage with five kills and the data stages (sharding, latents, index).
"""

import pytest

from benchmarks.bench_kills import Scenario, checkpoint_write, overrides, run_benchmark
from tests._shared_data import require_shared


@pytest.mark.slow
def test_mae_killed_while_writing_a_checkpoint_resumes_to_identical_weights(tmp_path):
    require_shared("fashion-mnist")
    scenario = Scenario("mae_pretrain", [checkpoint_write("checkpoints", 6)])  # checkpoints at 3, 6, 8
    rows, ok = run_benchmark(tmp_path, sets=overrides(steps=8, every=3), scenarios=[scenario])
    (row,) = rows
    assert row["kills"][0] in ("in ckpt 6 write", "just after ckpt 6"), row
    assert row["resumes"] in (["@3"], ["@6"]), row  # the half-written checkpoint is never read
    assert ok and row["identical"], row["problems"]

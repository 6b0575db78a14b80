"""What orchestration costs: the `smoke` DAG through Prefect and MLflow against the same stage
functions called directly, and a fully cached rerun.

1. direct: a fresh process calls each stage's plain ``run(config, inputs, context)`` in the flow's
   order and wiring (``benchmarks.bench_kills``' runner). The stages still log their own MLflow runs;
   what is left out is Prefect (its temporary API server, task runs, result persistence, cache
   lookups), the pipeline's parent run and stage tags, output verification before reuse, model
   registration and the lock.
2. flow: ``patchflow run --preset smoke`` in a fresh data root, a fresh process.
3. cached: the same command again on that data root: every stage comes back Cached.

Each is the wall time of a whole process, imports included, in a data root of its own; the two
fresh runs are timed back to back on the same machine, so their ratio is what to read. Takes about
5 minutes on 2 cores.

    cd REPO && PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_orchestration.py [--keep DIR]

Goals (issue 11): overhead under 10% of a `demo` run; a fully cached rerun under 15 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests._shared_data import shared_data_dir  # noqa: E402

STAGES = "[shard,mae_pretrain,evaluate,vae,encode_latents,dit_train,clip_train,index]"


def _sets() -> list[str]:
    data = shared_data_dir()
    return [f"shard.source.path={data / 'fashion-mnist'}", f"pairs.source.path={data / 'emoji-captions' / 'twemoji'}",
            f"stages={STAGES}"]


def _timed(command: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    elapsed = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{' '.join(command[:4])} … exited {code}; see {log}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="keep the data roots in this folder")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = _sets()
    direct_cmd = [sys.executable, "-m", "benchmarks.bench_kills", "--child", str(work / "direct"), "index"]
    flow_cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--data-root", str(work / "flow")]
    direct_cmd += sets  # the runner takes the overrides as plain arguments
    for value in sets:
        flow_cmd += ["--set", value]
    direct = _timed(direct_cmd, work / "direct.log")
    flow = _timed(flow_cmd, work / "flow.log")
    cached = _timed(flow_cmd, work / "cached.log")
    overhead = flow - direct
    print(f"smoke DAG, every stage ({STAGES}), whole processes, {os.cpu_count()} CPUs")
    print(f"  stage functions called directly  {direct:7.1f} s")
    print(f"  patchflow run (Prefect + MLflow) {flow:7.1f} s   overhead {overhead:+.1f} s ({overhead / direct:+.0%})")
    print(f"  fully cached rerun               {cached:7.1f} s   (goal: under 15 s)")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

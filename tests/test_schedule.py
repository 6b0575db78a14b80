"""The stage scheduler: dependency order, at most ``slots`` stages at once, the listed-first stage
first, a failure stopping new starts without abandoning running ones, and an interrupt of the
waiting thread reaching the stages it waits on."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

from flows import schedule
from flows.schedule import StageJob, check_plan, run_jobs

WAIT_S = 30  # generous: only a broken scheduler waits this long


class Recorder:
    """Jobs that note when they start and end, and how many ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.running = self.most_running = 0
        self.threads: set[str] = set()

    def job(self, name: str, needs: tuple[str, ...] = (), body=lambda done: None) -> StageJob:
        def start(done: dict) -> str:
            with self.lock:
                self.events.append(f"start {name}")
                self.running += 1
                self.most_running = max(self.most_running, self.running)
                self.threads.add(threading.current_thread().name)
            try:
                assert set(needs) <= set(done), f"{name} started before {set(needs) - set(done)}"
                body(done)
                return f"{name}({','.join(done[n] for n in needs)})"
            finally:
                with self.lock:
                    self.running -= 1
                    self.events.append(f"end {name}")

        return StageJob(name, needs, start)


def test_one_slot_runs_the_list_in_order_in_the_calling_thread():
    recorder = Recorder()
    jobs = [recorder.job("shard"), recorder.job("mae", ("shard",)), recorder.job("vae", ("shard",)),
            recorder.job("dit", ("shard", "vae"))]
    results = run_jobs(jobs, slots=1)
    assert recorder.events == ["start shard", "end shard", "start mae", "end mae", "start vae", "end vae",
                               "start dit", "end dit"]
    assert recorder.threads == {threading.current_thread().name}
    assert results == {"shard": "shard()", "mae": "mae(shard())", "vae": "vae(shard())", "dit": "dit(shard(),vae(shard()))"}


def test_independent_branches_overlap_and_dependants_wait_for_their_inputs():
    recorder = Recorder()
    both_running = threading.Barrier(2, timeout=WAIT_S)  # passes only if mae and vae run at the same time
    meet = lambda done: both_running.wait()  # noqa: E731
    jobs = [recorder.job("shard"), recorder.job("mae", ("shard",), meet), recorder.job("evaluate", ("shard", "mae")),
            recorder.job("vae", ("shard",), meet), recorder.job("dit", ("vae",))]
    results = run_jobs(jobs, slots=2)
    assert list(results) == ["shard", "mae", "evaluate", "vae", "dit"]  # list order, not finishing order
    assert results["evaluate"] == "evaluate(shard(),mae(shard()))"
    order = recorder.events
    assert order.index("end shard") < order.index("start mae") and order.index("end vae") < order.index("start dit")
    assert order.index("end mae") < order.index("start evaluate")
    assert recorder.most_running == 2
    assert threading.current_thread().name not in recorder.threads


def test_never_more_stages_at_once_than_slots():
    recorder = Recorder()
    jobs = [recorder.job(f"stage{i}", body=lambda done: time.sleep(0.05)) for i in range(6)]  # long enough to overlap
    assert len(run_jobs(jobs, slots=3)) == 6
    assert recorder.most_running == 3


def test_the_stage_listed_first_gets_the_free_slot_first():
    recorder = Recorder()
    release = threading.Event()
    jobs = [recorder.job("long", body=lambda done: release.wait(WAIT_S)),
            recorder.job("first", body=lambda done: None), recorder.job("second"), recorder.job("third"),
            recorder.job("last", body=lambda done: release.set())]
    run_jobs(jobs, slots=2)
    starts = [event.split()[1] for event in recorder.events if event.startswith("start")]
    assert starts == ["long", "first", "second", "third", "last"]


def test_a_failure_stops_new_starts_lets_running_stages_finish_and_is_raised(monkeypatch):
    recorder = Recorder()
    mae_failed, failure_seen = threading.Event(), threading.Event()
    real_wait = schedule.wait

    def wait(futures, return_when):  # the scheduler waiting on vae alone, after mae's failure: it has seen it
        if mae_failed.is_set() and len(futures) == 1:
            failure_seen.set()
        return real_wait(futures, return_when=return_when)

    monkeypatch.setattr(schedule, "wait", wait)

    def fail(done: dict) -> None:
        mae_failed.set()
        raise ValueError("mae: bad shard train-000003.tar")

    def still_running(done: dict) -> None:
        assert failure_seen.wait(WAIT_S), "the scheduler never waited on vae alone after mae failed"

    jobs = [recorder.job("shard"), recorder.job("mae", ("shard",), fail), recorder.job("vae", ("shard",), still_running),
            recorder.job("evaluate", ("mae",)), recorder.job("latents", ("vae",)), recorder.job("dit", ("latents",))]
    with pytest.raises(ValueError, match="train-000003.tar"):
        run_jobs(jobs, slots=2)
    started = {event.split()[1] for event in recorder.events if event.startswith("start")}
    assert "end vae" in recorder.events  # running when mae failed: finished
    assert started == {"shard", "mae", "vae"}  # nothing new after the failure


def test_an_interrupt_of_the_waiting_thread_stops_the_running_stages():
    stop_requested = threading.Event()

    def interrupt_then_wait_for_stop(done: dict) -> None:
        _thread.interrupt_main()  # what Ctrl-C does: an exception in the main thread, not in this one
        assert stop_requested.wait(WAIT_S), "on_stop was not called"

    jobs = [StageJob("train", (), interrupt_then_wait_for_stop), StageJob("other", (), lambda done: None)]
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, slots=2, on_stop=stop_requested.set)
    assert stop_requested.is_set()


def test_a_plan_whose_stage_needs_a_later_or_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="evaluate needs"):
        check_plan([StageJob("evaluate", ("mae",), lambda done: None), StageJob("mae", (), lambda done: None)])
    with pytest.raises(ValueError, match="slots"):
        run_jobs([StageJob("shard", (), lambda done: None)], slots=0)

"""The engine loop's between-steps jobs are atomic: a job that calls back into the loop (as the server's
resolve-and-submit job does through ``submit``) finishes before any other queued job runs.

Why it matters: a reload's "is this adapter version still in use?" check that ran in the middle of a
request's submit job saw no request yet, removed the version, and the engine died loading its deleted
files for the request the job then admitted (CI, 2026-12-02). These tests use a stand-in engine with no
work, so they take milliseconds and need no vLLM."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from trainserve.engine.loop import EngineLoop


class _IdleEngine:
    def has_unfinished_requests(self) -> bool:
        return False


@pytest.fixture()
def loop():
    engine_loop = EngineLoop(SimpleNamespace(llm_engine=_IdleEngine()))
    engine_loop.start_background()
    yield engine_loop
    engine_loop.stop_background(drain=False)


def _queue_behind(loop: EngineLoop, job_started: threading.Event, fn) -> threading.Thread:
    """Another thread's job, queued while the first job runs."""
    job_started.wait(5)
    other = threading.Thread(target=lambda: loop.call(fn))
    other.start()
    time.sleep(0.2)  # long enough for it to be in the queue (its caller then blocks on the result)
    return other


def test_a_job_that_calls_the_loop_again_finishes_before_other_queued_jobs(loop) -> None:
    order: list[str] = []
    started, other_queued = threading.Event(), threading.Event()

    def outer() -> str:
        order.append("outer: start")
        started.set()
        other_queued.wait(5)
        order.append(loop.call(lambda: "outer: inner call"))  # runs at once, in this job
        order.append("outer: end")
        return "outer"

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(loop.call(outer)))
    first.start()
    other = _queue_behind(loop, started, lambda: order.append("other job"))
    other_queued.set()
    first.join(5)
    other.join(5)
    assert results == ["outer"]
    assert order == ["outer: start", "outer: inner call", "outer: end", "other job"]


def test_an_inner_call_that_raises_reaches_the_job_and_the_loop_keeps_running(loop) -> None:
    def outer() -> str:
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: 1 / 0)
        return "survived"

    assert loop.call(outer) == "survived"
    with pytest.raises(KeyError):
        loop.call(lambda: {}["missing"])
    assert loop.call(lambda: "still serving") == "still serving" and loop.fatal is None


def test_jobs_queued_behind_a_failing_job_still_run(loop) -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def failing() -> None:
        started.set()
        release.wait(5)
        raise RuntimeError("this job fails")

    errors: list[BaseException] = []

    def run_failing() -> None:
        try:
            loop.call(failing)
        except RuntimeError as exc:
            errors.append(exc)

    first = threading.Thread(target=run_failing)
    first.start()
    other = _queue_behind(loop, started, lambda: ran.append("after"))
    release.set()
    first.join(5)
    other.join(5)
    assert [str(e) for e in errors] == ["this job fails"] and ran == ["after"]

"""Job runner and batcher fixes from the session 14 review: a job enqueued during an
erasure, a publish that fails halfway, a returning user's known-bad v1, a batcher worker
that must survive a failing hook, a submit after stop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from metarlhf.adapters import Adapter
from metarlhf.feedback_store import FeedbackInput, SQLiteFeedbackStore
from metarlhf.jobs import AdaptationRunner
from metarlhf.retrieval import PreferenceIndex
from metarlhf.store import AdapterStore
from server.batcher import Batcher, Overloaded
from server.runtime import engine_key


def _ad(kind: str) -> Adapter:
    return Adapter({"x.lora_A.weight": torch.ones(2, 2)}, {"r": 2}, {"kind": kind, "base_model": "tiny"})


class FakePersonalizer:
    policy_base = "tiny"
    embed_dim = 4

    def adapt_reward(self, records):
        return _ad("reward")

    def adapt_policy(self, records, init):
        return _ad("policy")

    def embed(self, prompts, completions):
        return np.array([[1.0, float(len(p)), 0.0, 1.0] for p in prompts], dtype=np.float32)


@pytest.fixture
def runner(tmp_path):
    fb = SQLiteFeedbackStore(tmp_path / "fb.sqlite")
    store = AdapterStore(tmp_path / "ad")
    index = PreferenceIndex(4)
    r = AdaptationRunner(fb, store, FakePersonalizer(), index, threshold=2)
    yield r, fb, store, index
    r.close()
    fb.close()


def _thumbs(fb, user, *ids):
    for i in ids:
        fb.store_feedback("t", user, FeedbackInput("thumbs", f"p{i}", completion="c", label=1), None, None)


def test_a_job_enqueued_during_an_erasure_never_publishes(runner):
    r, fb, store, index = runner
    with r.erasing("t", "u"):  # feedback racing the erasure, and a job enqueued while it runs
        _thumbs(fb, "u", 0, 1)
        assert r.maybe_enqueue("t", "u") is not None
        r.wait_idle(10)
        assert fb.latest_job("t", "u")["state"] == "failed"  # was: succeeded, published inside the erasure
        assert store.current("t", "u", "policy") is None and index.get("t", "u") is None


def test_a_publish_that_fails_halfway_leaves_the_previous_versions_serving(runner):
    r, fb, store, _ = runner
    _thumbs(fb, "u", 0, 1)
    r.maybe_enqueue("t", "u")
    r.wait_idle(10)
    assert store.current("t", "u", "reward") == 1
    real = store.set_current

    def full_disk(tenant, user, kind, version):
        if kind == "policy":
            raise OSError(28, "No space left on device")
        return real(tenant, user, kind, version)

    store.set_current = full_disk
    _thumbs(fb, "u", 2, 3)
    r.maybe_enqueue("t", "u")
    r.wait_idle(10)
    assert fb.latest_job("t", "u")["state"] == "failed"
    cur = store.current("t", "u", "reward")
    # was: reward CURRENT -> v2, and v2 removed with the failed job's files
    assert cur == 1 and store.path("t", "u", "reward", cur).is_dir()


def test_a_published_version_is_never_shadowed_by_an_old_bad_mark(client):
    rt = client.app.state.runtime
    key = engine_key("acme", "zoe")
    rt._bad.add((key, 1))  # marked after an erasure by a request still queued when the files went
    rt._on_new_version("acme", "zoe", {"policy_version": 1})
    assert (key, 1) not in rt._bad


class _Engine:
    def generate(self, reqs):
        return [r * 10 for r in reqs]


def test_the_batcher_survives_a_failing_hook_and_refuses_work_after_stop():
    def bad_hook(rows, seconds):
        raise ZeroDivisionError("metrics")

    b = Batcher(_Engine(), max_batch=4, wait_s=0.001, limit=8, on_batch=bad_hook)
    b.start()

    async def go():
        return await asyncio.wait_for(b.submit_many([1, 2]), 5)

    assert asyncio.run(go()) == [10, 20]  # was: the worker died with the hook, callers hung
    assert asyncio.run(go()) == [10, 20] and b.depth == 0
    b.stop()
    with pytest.raises(Overloaded, match="shutting down"):
        asyncio.run(go())  # was: queued with no worker, waited forever
    assert b.depth == 0


def test_close_stops_a_running_policy_adaptation_at_its_next_step(tmp_path):
    """close() used to wait for a running job to finish its whole adaptation (~45 s on CPU)."""
    from server.testing import TinyPersonalizer

    pers = TinyPersonalizer(policy_steps=10_000)
    real = pers.adapt_policy
    started = threading.Event()

    def adapt_policy(records, init, should_stop=None):
        started.set()
        return real(records, init, should_stop=should_stop)

    pers.adapt_policy = adapt_policy
    fb = SQLiteFeedbackStore(tmp_path / "fb.sqlite")
    store = AdapterStore(tmp_path / "ad")
    r = AdaptationRunner(fb, store, pers, None, threshold=2)
    _thumbs(fb, "u", 0, 1)
    jid = r.maybe_enqueue("t", "u")
    assert jid is not None and started.wait(30)
    time.sleep(0.2)  # a few steps in
    t0 = time.perf_counter()
    r.close()
    assert time.perf_counter() - t0 < 10
    job = fb.latest_job("t", "u")
    assert job["state"] == "failed" and "shut down while the job ran" in job["error"]
    assert store.current("t", "u", "policy") is None and store.current("t", "u", "reward") is None
    fb.close()


def test_a_personalizer_without_should_stop_still_works(runner):
    r, fb, store, _ = runner
    assert not r._cancellable
    _thumbs(fb, "u", 0, 1)
    assert r.maybe_enqueue("t", "u") is not None and r.wait_idle(10)
    assert fb.latest_job("t", "u")["state"] == "succeeded"


def test_starting_a_job_does_not_hold_the_runner_lock_across_sqlite(runner, monkeypatch):
    """A job's row is an fsync'd commit: while one is written, other users' requests
    (inflight, erasure_epoch, queue_depth) must not wait for it."""
    r, fb, _, _ = runner
    _thumbs(fb, "u", 0, 1)
    real, writing, release = fb.create_job, threading.Event(), threading.Event()

    def slow_create_job(*a, **k):
        writing.set()
        release.wait(5)
        return real(*a, **k)

    monkeypatch.setattr(fb, "create_job", slow_create_job)
    t = threading.Thread(target=r.maybe_enqueue, args=("t", "u"))
    t.start()
    assert writing.wait(5)
    t0 = time.perf_counter()
    assert r.inflight("t", "v") is None and r.erasure_epoch("t", "v") == 0 and r.queue_depth == 0
    assert time.perf_counter() - t0 < 1  # (the commit is held for 5 s)
    threading.Timer(0.3, release.set).start()
    assert r.maybe_enqueue("t", "u") is None  # the same user waits for the decision: at most one job
    assert 0.2 < time.perf_counter() - t0 < 4
    t.join(5)
    assert r.wait_idle(10) and fb.latest_job("t", "u")["state"] == "succeeded"
    assert fb._reader().execute("SELECT COUNT(*) FROM jobs WHERE tenant='t' AND user_id='u'").fetchone()[0] == 1


def test_feedback_committed_while_a_job_finishes_still_starts_the_next_job(runner, monkeypatch):
    """The end of a job recounts; feedback committed just after that recount must find the
    ended job not in flight (its request's pre-check passes) and start the next job."""
    r, fb, _, _ = runner
    real, seen = fb.new_count, {}

    def request():  # the feedback route's pre-check, then its enqueue (which waits for the decision)
        if r.wants_job("t", "u", real("t", "u")):
            seen["job"] = r.maybe_enqueue("t", "u")

    def new_count(tenant, user):
        n = real(tenant, user)
        if threading.current_thread().name.startswith("adapt") and "thread" not in seen:
            _thumbs(fb, "u", 10, 11)  # feedback commits right after the job's own recount...
            seen["thread"] = threading.Thread(target=request)  # ...and its request runs
            seen["thread"].start()
            time.sleep(0.2)  # its pre-check, while the job is still deciding
        return n

    monkeypatch.setattr(fb, "new_count", new_count)
    _thumbs(fb, "u", 0, 1)
    assert r.maybe_enqueue("t", "u") is not None
    time.sleep(0.5)
    seen["thread"].join(5)
    assert r.wait_idle(10)
    assert seen.get("job") is not None  # was: the pre-check saw the ended job in flight, and no job started
    assert fb.new_count("t", "u") == 0  # the second job covered the feedback
    assert fb._reader().execute("SELECT COUNT(*) FROM jobs WHERE user_id='u'").fetchone()[0] == 2


def test_a_job_the_pool_refuses_is_failed_not_left_in_flight(runner, monkeypatch):
    r, fb, _, _ = runner

    def refuse(*a, **k):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(r._pool, "submit", refuse)
    _thumbs(fb, "u", 0, 1)
    assert r.maybe_enqueue("t", "u") is None
    assert r.queue_depth == 0 and fb.latest_job("t", "u")["state"] == "failed"


def test_close_racing_a_job_start_records_it_failed(runner, monkeypatch):
    r, fb, _, _ = runner
    real = fb.create_job

    def create_then_close(*a, **k):
        job = real(*a, **k)
        with r._lock:
            r._closed = True  # close() lands during the commit
        return job

    monkeypatch.setattr(fb, "create_job", create_then_close)
    _thumbs(fb, "u", 0, 1)
    with pytest.raises(Exception, match="shut down"):
        r.enqueue("t", "u")
    assert r.queue_depth == 0 and fb.latest_job("t", "u")["state"] == "failed"


def test_starting_over_a_job_in_flight_raises_before_writing_a_row(runner, monkeypatch):
    """_start may only replace the finished job _finish hands over from: a job in flight that
    is not it stays tracked, and no second row is written (was: popped, then untracked)."""
    r, fb, _, _ = runner
    gate = threading.Event()
    slow = r.personalizer.adapt_policy

    def held(records, init):
        gate.wait(10)
        return slow(records, init)

    monkeypatch.setattr(r.personalizer, "adapt_policy", held)
    _thumbs(fb, "u", 0, 1)
    first = r.maybe_enqueue("t", "u")
    assert first is not None
    with r._start_lock("t", "u"), pytest.raises(RuntimeError, match="in flight"):
        r._start("t", "u", "manual", replaces="some-other-job")
    assert r.inflight("t", "u") == first["id"]
    gate.set()
    assert r.wait_idle(10)
    assert fb._reader().execute("SELECT COUNT(*) FROM jobs WHERE user_id='u'").fetchone()[0] == 1
    assert fb.latest_job("t", "u")["state"] == "succeeded"

"""Store, index and feedback-database fixes from the session 14 review: erasure order and
leftovers, a returning user's versions, the prune/rollback race, all-or-nothing rollback of
both kinds, durable new directories, a corrupted database refused at start."""

from __future__ import annotations

import os
import sqlite3
import threading

import numpy as np
import pytest
import torch

import metarlhf.io as mio
import metarlhf.store as store_mod
from metarlhf.adapters import Adapter
from metarlhf.errors import ConfigError
from metarlhf.feedback_store import FeedbackInput, SQLiteFeedbackStore
from metarlhf.store import AdapterStore
from server.runtime import engine_key

KEY_A = "sk-tenant-a-key"
A = {"Authorization": f"Bearer {KEY_A}"}


def _ad(kind: str, v: float = 1.0) -> Adapter:
    return Adapter({"x.lora_A.weight": torch.full((2, 2), v)}, {"r": 2}, {"kind": kind, "base_model": "tiny"})


def _thumb(client, user):
    r = client.post("/v1/feedback", json={"user_id": user, "prompt": "p", "completion": "c", "rating": "up"},
                    headers=A)
    assert r.status_code == 202, r.text


def test_a_prune_never_removes_the_version_a_concurrent_rollback_makes_current(tmp_path, monkeypatch):
    s = AdapterStore(tmp_path, keep=2)
    for v in (1.0, 2.0, 3.0):
        s.save("t", "u", "policy", _ad("policy", v))  # v2, v3 kept; CURRENT v3
    real_write, checked, done = mio.atomic_write_bytes, threading.Event(), threading.Event()

    def slow_write(path, data):  # the rollback, between its version check and its CURRENT write
        if path.name == "CURRENT" and threading.current_thread().name == "rollback":
            checked.set()
            done.wait(1)
        real_write(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", slow_write)

    def job():  # a job's save of v4 (not made current), whose prune drops the oldest but the current
        checked.wait(5)
        s.save("t", "u", "policy", _ad("policy", 4.0), make_current=False)
        done.set()

    threads = [threading.Thread(target=s.rollback, args=("t", "u", "policy", 2), name="rollback"),
               threading.Thread(target=job)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.current("t", "u", "policy") == 2 and 2 in s.versions("t", "u", "policy")  # was: CURRENT v2, v2 gone
    assert s.resolve("t", "u", "policy") is not None


def test_opening_the_store_removes_tombstones_of_an_interrupted_erasure(tmp_path):
    s = AdapterStore(tmp_path)
    s.save("t", "u", "policy", _ad("policy"))
    d = s.user_dir("t", "u")
    os.replace(d, d.with_name("u~deleted"))  # a crash between the rename and the removal
    AdapterStore(tmp_path)
    assert not d.with_name("u~deleted").exists() and not d.exists()


def test_rollback_of_both_kinds_changes_neither_when_one_cannot(client):
    rt = client.app.state.runtime
    _thumb(client, "carol")
    for v in (1.0, 2.0, 3.0):
        rt.store.save("acme", "carol", "policy", _ad("policy", v))
    rt.store.save("acme", "carol", "reward", _ad("reward"))  # a single reward version: nothing older
    r = client.post("/v1/users/carol/rollback", json={"kind": "both"}, headers=A)
    assert r.status_code == 404, r.text
    assert rt.store.current("acme", "carol", "policy") == 3  # was: rolled back to v2 before the reward failed


def test_erasure_forgets_known_bad_versions_of_the_user(client):
    rt = client.app.state.runtime
    _thumb(client, "dave")
    key = engine_key("acme", "dave")
    rt._bad |= {(key, 1), (engine_key("acme", "other"), 1)}  # v1 failed to load, e.g. deleted under a request
    assert client.delete("/v1/users/dave", headers=A).status_code == 204
    assert (key, 1) not in rt._bad  # the user's next v1 (numbers restart) is served
    assert (engine_key("acme", "other"), 1) in rt._bad


def test_an_erasure_cut_short_leaves_no_vector_and_can_be_repeated(client, monkeypatch):
    rt = client.app.state.runtime
    _thumb(client, "erin")
    rt.store.save("acme", "erin", "policy", _ad("policy"))
    rt.index.upsert("acme", "erin", np.ones(rt.index.dim, dtype=np.float32))
    rt.index.save()

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(rt.store, "delete_user", crash)
    with pytest.raises(OSError):
        rt.delete_user("acme", "erin")
    # the vector went first, and is gone from the saved index too: no one is served erin's adapter
    assert rt.index.get("acme", "erin") is None
    assert type(rt.index).load(rt.settings.index_location, rt.index.dim).get("acme", "erin") is None
    monkeypatch.undo()
    assert client.delete("/v1/users/erin", headers=A).status_code == 204  # the adapters are still found
    assert not rt.store.user_dir("acme", "erin").exists()


def test_vectors_of_users_with_nothing_stored_are_dropped_at_start(client):
    rt = client.app.state.runtime
    rt.index.upsert("acme", "ghost", np.ones(rt.index.dim, dtype=np.float32))  # e.g. an index older than an erasure
    _thumb(client, "frank")
    rt.index.upsert("acme", "frank", np.ones(rt.index.dim, dtype=np.float32))
    rt._rebuild_index()
    assert rt.index.get("acme", "ghost") is None and rt.index.get("acme", "frank") is not None


def test_new_directories_are_made_durable_in_their_parents(tmp_path, monkeypatch):
    synced = []
    real = mio.fsync_dir
    monkeypatch.setattr(mio, "fsync_dir", lambda p: (synced.append(os.fspath(p)), real(p)))
    mio.atomic_write_bytes(tmp_path / "a" / "b" / "f.txt", b"x")
    # each new directory's entry is fsynced in its parent, then the file's rename in its own
    assert [os.fspath(tmp_path), os.fspath(tmp_path / "a"), os.fspath(tmp_path / "a" / "b")] == synced[:3]


def test_a_corrupted_feedback_database_is_refused_at_open(tmp_path):
    path = tmp_path / "fb.db"
    s = SQLiteFeedbackStore(path)
    for _ in range(300):
        s.add_feedback("t", "u", FeedbackInput("thumbs", "p" * 500, completion="c", label=1))
    s.close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    with open(path, "r+b") as f:  # scribble over three pages of the table
        f.seek(4096 * 2)
        f.write(np.random.default_rng(0).bytes(4096 * 3))
    with pytest.raises(ConfigError, match="corrupted|cannot"):
        SQLiteFeedbackStore(path)


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_that_an_erasure_overtakes_keeps_no_completion(client, monkeypatch, stream):
    """The user is erased while their request generates: the served completion is not
    stored afterwards (it kept the erased user known, and their data on disk)."""
    rt = client.app.state.runtime
    _thumb(client, "fay")
    real = rt.generate

    async def generate_then_erase(tenant, user, reqs):
        got = await real(tenant, user, reqs)
        rt.delete_user(tenant, user)  # the DELETE lands while the response is on its way
        return got

    monkeypatch.setattr(rt, "generate", generate_then_erase)
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "user": "fay", "stream": stream},
                    headers=A)
    assert r.status_code == 200, r.text
    assert client.get("/v1/users/fay", headers=A).status_code == 404
    assert not rt.user_known("acme", "fay")


def test_record_completions_keeps_rows_only_outside_an_erasure(client):
    rt = client.app.state.runtime
    _thumb(client, "gus")
    epoch = rt.erasure_epoch("acme", "gus")
    assert rt.record_completions("acme", "gus", [("c-1", "p", "t")], {}, epoch, None)
    assert rt.feedback.get_completion("acme", "gus", "c-1")["completion"] == "t"
    with rt.runner.erasing("acme", "gus"):  # in progress (odd): written, then removed again
        assert not rt.record_completions("acme", "gus", [("c-2", "p", "t")], {}, epoch, None)
    assert not rt.record_completions("acme", "gus", [("c-3", "p", "t")], {}, epoch, None)  # one ran since
    for cid in ("c-2", "c-3"):
        with pytest.raises(Exception, match="not found"):
            rt.feedback.get_completion("acme", "gus", cid)
    assert rt.feedback.get_completion("acme", "gus", "c-1")["completion"] == "t"


def test_record_completions_drops_a_neighbour_erased_or_being_erased_from_its_own_rows_only(client):
    rt = client.app.state.runtime
    _thumb(client, "gus")
    info = {"source": "neighbor", "user_id": "gus", "neighbor": "hal", "neighbor_version": 1}
    epoch, nb = rt.erasure_epoch("acme", "gus"), rt.erasure_epoch("acme", "hal")

    def neighbor_of(cid):
        return rt.feedback.get_completion("acme", "gus", cid)["adapter"].get("neighbor")

    assert rt.record_completions("acme", "gus", [("n-1", "p", "t")], info, epoch, nb) and neighbor_of("n-1") == "hal"
    with rt.runner.erasing("acme", "hal"):  # the neighbour's erasure is running (odd epoch)
        assert rt.record_completions("acme", "gus", [("n-2", "p", "t")], info, epoch, nb)
    assert rt.record_completions("acme", "gus", [("n-3", "p", "t")], info, epoch, nb)  # it ran meanwhile
    assert rt.record_completions("acme", "gus", [("n-4", "p", "t")], info, epoch, None)  # epoch unknown
    assert [neighbor_of(c) for c in ("n-1", "n-2", "n-3", "n-4")] == ["hal", None, None, None]
    assert rt.feedback.get_completion("acme", "gus", "n-2")["adapter"]["neighbor_erased"] is True

import sqlite3
import threading

import pytest

from metarlhf.data import Pair, Thumbs
from metarlhf.errors import ConfigError, DataError, NotFoundError
from metarlhf.feedback_store import FeedbackInput, SQLiteFeedbackStore, body_sha256, open_feedback_store


@pytest.fixture
def store(tmp_path):
    s = SQLiteFeedbackStore(tmp_path / "fb.db")
    yield s
    s.close()


def thumbs(label: int, text: str = "c") -> FeedbackInput:
    return FeedbackInput("thumbs", "p", completion=text, label=label)


def test_wal_and_full_sync(store):
    conn = store._reader()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.schema_version == 1


def test_records_round_trip_and_counts(store):
    store.add_feedback("t", "u", thumbs(1, "good"))
    store.add_feedback("t", "u", thumbs(0, "bad"))
    store.add_feedback("t", "u", FeedbackInput("pair", "q", chosen="a", rejected="b"))
    store.add_feedback("t", "other", thumbs(1))
    assert store.records("t", "u") == [Thumbs("u", "p", "good", 1), Thumbs("u", "p", "bad", 0), Pair("u", "q", "a", "b")]
    assert store.records("t", "u", limit=1) == [Pair("u", "q", "a", "b")]
    assert store.counts("t", "u") == {"total": 3, "up": 1, "down": 1, "pairs": 1, "new": 3}
    assert store.counts("t", "nobody")["total"] == 0
    assert sorted(store.users("t")) == [("t", "other"), ("t", "u")]


def test_invalid_items_are_rejected():
    with pytest.raises(DataError):
        FeedbackInput("thumbs", "p", completion="c", label=2)
    with pytest.raises(DataError):
        FeedbackInput("pair", "p", chosen="a")
    with pytest.raises(DataError):
        FeedbackInput("stars", "p")


def test_idempotency_key_replays_and_detects_a_different_body(store):
    h = body_sha256({"a": 1})
    fid, created = store.add_feedback("t", "u", thumbs(1), "key-1", h)
    assert created
    assert store.add_feedback("t", "u", thumbs(1), "key-1", h) == (fid, False)
    with pytest.raises(DataError, match="different request body"):
        store.add_feedback("t", "u", thumbs(0), "key-1", body_sha256({"a": 2}))
    # keys are per tenant
    assert store.add_feedback("t2", "u", thumbs(1), "key-1", h)[1]
    assert store.counts("t", "u")["total"] == 1


def test_body_hash_is_canonical():
    assert body_sha256({"a": 1, "b": 2}) == body_sha256({"b": 2, "a": 1})
    assert body_sha256({"a": 1}) != body_sha256({"a": 2})


def test_concurrent_writes_are_all_durable_and_group_committed(tmp_path):
    s = SQLiteFeedbackStore(tmp_path / "fb.db")
    ids, errors = [], []

    def writer(i):
        try:
            for j in range(20):
                ids.append(s.add_feedback("t", f"u{i}", thumbs(j % 2))[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert not errors
    assert s.commits < len(ids) == 320  # several writes shared one fsync
    conn = sqlite3.connect(tmp_path / "fb.db")  # a fresh process view of the file
    got = {r[0] for r in conn.execute("SELECT id FROM feedback")}
    assert got == set(ids)


def test_a_failing_write_does_not_sink_its_batch(store):
    h = body_sha256({"x": 1})
    store.add_feedback("t", "u", thumbs(1), "k", h)
    results, errors = [], []

    def ok():
        results.append(store.add_feedback("t", "u", thumbs(1)))

    def bad():
        try:
            store.add_feedback("t", "u", thumbs(0), "k", body_sha256({"x": 2}))
        except DataError as e:
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (ok, bad, ok, bad, ok)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(errors) == 2
    assert store.counts("t", "u")["total"] == 4


def test_completions_are_scoped_to_tenant_and_user(store):
    store.add_completion("t", "u", "cmpl-1", "p", "c", {"source": "base"})
    assert store.get_completion("t", "u", "cmpl-1")["completion"] == "c"
    for tenant, user in (("t2", "u"), ("t", "v")):
        with pytest.raises(NotFoundError):
            store.get_completion(tenant, user, "cmpl-1")
    with pytest.raises(NotFoundError):
        store.get_completion("t", "u", "cmpl-404")


def test_jobs_and_new_feedback_watermark(store):
    for i in range(3):
        store.add_feedback("t", "u", thumbs(i % 2))
    job = store.create_job("t", "u", "threshold")
    assert job["state"] == "queued" and job["feedback_upto"] == store.max_seq("t", "u")
    assert store.counts("t", "u")["new"] == 3  # creating a job consumes nothing
    store.add_feedback("t", "u", thumbs(1))
    assert store.counts("t", "u")["new"] == store.new_count("t", "u") == 4
    assert store.start_job(job["id"]) == store.max_seq("t", "u")  # it covers the record that came meanwhile
    store.update_job(job["id"], "failed", error="boom")
    got = store.get_job("t", job["id"])
    assert got["state"] == "failed" and got["error"] == "boom" and got["finished_at"] and got["started_at"]
    assert store.new_count("t", "u") == 4  # a failed job consumes nothing either
    assert store.latest_job("t", "u")["id"] == job["id"]
    with pytest.raises(NotFoundError):
        store.get_job("other-tenant", job["id"])
    j2 = store.create_job("t", "u", "manual")
    assert store.fail_unfinished_jobs() == 1
    assert store.get_job("t", j2["id"])["state"] == "failed"
    assert store.new_count("t", "u") == 4  # nor does an interrupted one


def test_only_a_successful_job_moves_the_watermark_to_what_it_trained_on(store):
    for i in range(2):
        store.add_feedback("t", "u", thumbs(i % 2))
    job = store.create_job("t", "u", "threshold")
    upto = store.start_job(job["id"])
    store.add_feedback("t", "u", thumbs(1))  # arrives while the job runs: not trained on
    assert [r.label for r in store.records("t", "u", upto=upto)] == [0, 1]
    store.update_job(job["id"], "succeeded", result={"ok": True})
    assert store.new_count("t", "u") == 1 and store.counts("t", "u")["new"] == 1
    # a job whose user was erased neither starts nor recreates the user's watermark
    j2 = store.create_job("t", "u", "manual")
    store.delete_user("t", "u")
    with pytest.raises(NotFoundError):
        store.start_job(j2["id"])
    store.update_job(j2["id"], "succeeded", result={})
    assert store._reader().execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0


def test_feedback_text_must_be_encodable():
    with pytest.raises(DataError, match="prompt is not valid Unicode"):
        FeedbackInput("thumbs", "bad \ud800", completion="c", label=1)
    with pytest.raises(DataError, match="rejected"):
        FeedbackInput("pair", "p", chosen="a", rejected="\udfff")


def test_delete_user_erases_everything(store):
    fid, _ = store.add_feedback("t", "u", thumbs(1), "k", "h")
    store.add_completion("t", "u", "cmpl-1", "p", "c", {})
    store.create_job("t", "u", "manual")
    store.add_feedback("t", "keep", thumbs(1))
    assert store.user_exists("t", "u")
    assert store.delete_user("t", "u") == 1
    assert not store.user_exists("t", "u") and not store.has_feedback(fid)
    assert store.user_exists("t", "keep")
    # the idempotency key is gone too: reusing it stores a new record
    assert store.add_feedback("t", "u", thumbs(0), "k", "other")[1]


def test_delete_user_scrubs_their_id_from_completions_served_with_their_adapter(store):
    served = {"source": "neighbor", "user_id": "new", "neighbor": "u", "neighbor_version": 2}
    store.add_completion("t", "new", "cmpl-n", "p", "c", served)
    store.add_completion("t", "new", "cmpl-o", "p", "c", {**served, "neighbor": "other"})
    store.add_completion("t2", "new", "cmpl-t", "p", "c", served)  # another tenant's "u" is someone else
    store.add_feedback("t", "u", thumbs(1))
    store._write(lambda conn: conn.execute(  # a row whose adapter column is not JSON (hand-edited, say)
        "INSERT INTO completions (id, tenant, user_id, prompt, completion, adapter, created_at) "
        "VALUES ('cmpl-bad', 't', 'new', 'p', 'c', '{not json', 0)"))
    store.delete_user("t", "u")
    got = store.get_completion("t", "new", "cmpl-n")["adapter"]
    assert got["neighbor"] is None and got["neighbor_erased"] is True and got["neighbor_version"] == 2
    assert store.get_completion("t", "new", "cmpl-o")["adapter"]["neighbor"] == "other"
    assert store.get_completion("t2", "new", "cmpl-t")["adapter"]["neighbor"] == "u"


def test_survives_reopen_and_refuses_newer_schema(tmp_path):
    s = SQLiteFeedbackStore(tmp_path / "fb.db")
    fid, _ = s.add_feedback("t", "u", thumbs(1))
    s.close()
    s = SQLiteFeedbackStore(tmp_path / "fb.db")
    assert s.has_feedback(fid)
    s.close()
    conn = sqlite3.connect(tmp_path / "fb.db")
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="newer"):
        SQLiteFeedbackStore(tmp_path / "fb.db")


def test_url_dispatch(tmp_path, monkeypatch):
    s = open_feedback_store(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(s, SQLiteFeedbackStore) and s.path == tmp_path / "a.db"
    s.close()
    s = open_feedback_store(tmp_path / "b.db")
    s.close()
    import builtins

    real_import = builtins.__import__

    def no_psycopg(name, *a, **kw):
        if name == "psycopg":
            raise ImportError("no psycopg")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(ConfigError, match="psycopg"):
        open_feedback_store("postgresql://user@localhost/metarlhf")
    with pytest.raises(ConfigError, match="unsupported"):
        open_feedback_store("mysql://x")
    with pytest.raises(ConfigError):
        open_feedback_store("sqlite:///")


def test_unopenable_database_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError):
        SQLiteFeedbackStore(bad)


def test_store_feedback_counts_new_records_in_its_transaction(store):
    assert [store.store_feedback("t", "u", thumbs(i % 2)).new for i in range(3)] == [1, 2, 3]
    job = store.create_job("t", "u", "threshold")
    store.start_job(job["id"])
    store.update_job(job["id"], "succeeded", result={})  # moves the watermark
    assert store.store_feedback("t", "u", thumbs(0)).new == 1
    assert store.store_feedback("t", "other", thumbs(0)).new == 1
    first = store.store_feedback("t", "u", thumbs(1), "key", "h")
    assert first.created and first.new == 2
    replay = store.store_feedback("t", "u", thumbs(1), "key", "h")
    assert (replay.id, replay.created) == (first.id, False)
    assert store.new_count("t", "u") == 2


def test_async_writes_are_durable_and_group_committed(store, tmp_path):
    import asyncio

    async def main() -> list:
        return await asyncio.gather(*(store.astore_feedback("t", f"u{i % 3}", thumbs(i % 2)) for i in range(40)))

    commits0 = store.commits
    acks = asyncio.run(main())
    assert len({a.id for a in acks}) == 40 and all(a.created for a in acks)
    assert max(a.new for a in acks[0::3]) == 14  # u0 got i = 0, 3, ..., 39
    assert store.commits - commits0 < 40  # batched: fewer fsyncs than writes
    asyncio.run(store.astore_feedback("t", "u0", thumbs(0), "k", "a"))
    with pytest.raises(DataError):  # the writer's error reaches the awaiting caller
        asyncio.run(store.astore_feedback("t", "u0", thumbs(0), "k", "b"))
    fresh = sqlite3.connect(tmp_path / "fb.db")
    assert fresh.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 41

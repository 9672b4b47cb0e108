"""Regression tests for server bugs: event-loop stalls during adaptation, batch isolation,
adaptation triggering, erasure during a job, stale serving decisions, request validation
and OpenAI compatibility. Tiny random models, as in test_server.py."""

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from metarlhf.engine import GenerationRequest, GenerationResult, SamplingParams
from metarlhf.errors import ConfigError
from metarlhf.retrieval import PreferenceIndex
from server.batcher import Batcher
from server.runtime import choice_id
from server.schemas import NO_OPS

KEY_A = "sk-tenant-a-key"
A = {"Authorization": f"Bearer {KEY_A}"}
JSON = {**A, "Content-Type": "application/json"}


def rt(c):
    return c.app.state.runtime


def chat(c, user="alice", **kw):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0, **kw}
    if user is not None:
        body["user"] = user
    return c.post("/v1/chat/completions", json=body, headers=A)


def thumbs(c, user, i, prompt=None, completion=None):
    r = c.post("/v1/feedback", json={"user_id": user, "prompt": prompt or f"p{i}",
                                     "completion": completion or f"answer {i}",
                                     "rating": "up" if i % 2 == 0 else "down"}, headers=A)
    assert r.status_code == 202, r.text
    return r


def assert_error(r, status, type_=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}
    assert body["error"]["code"] == body["error"]["type"]  # OpenAI's shape: clients branch on code
    if type_:
        assert body["error"]["type"] == type_, body
    return body["error"]["message"]


def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


# ------------------------------------------------------------------ 1. no endpoint waits on adaptation
def _gate(obj, name, timeout=20):
    """Replace ``obj.name`` by a wrapper that sets ``entered`` and then waits for ``gate``
    (or ``timeout`` s) before calling the original; returns ``(gate, entered)``."""
    gate, entered = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def slow(*args, **kwargs):
        entered.set()
        gate.wait(timeout)
        return real(*args, **kwargs)

    setattr(obj, name, slow)
    return gate, entered


def test_cold_start_chat_does_not_wait_for_a_policy_adaptation(client, monkeypatch):
    import metarlhf.policy as mp

    monkeypatch.setattr(mp, "adapt_policy", mp.adapt_policy)  # restored after the test
    gate, entered = _gate(mp, "adapt_policy")  # inside the personalizer's lock, like a minutes-long adaptation
    thumbs(client, "carol", 0)  # cold start: her serving decision embeds her feedback
    thumbs(client, "bob", 0)
    thumbs(client, "bob", 1)
    assert entered.wait(20)
    t, out = in_thread(lambda: chat(client, "carol"))
    t.join(10)
    done = not t.is_alive()
    gate.set()
    assert rt(client).runner.wait_idle(60)
    assert done, "the cold-start chat waited for the adaptation job"
    assert out["r"].status_code == 200


def test_event_loop_stays_free_while_a_serving_decision_is_computed(client):
    thumbs(client, "carol", 0)
    gate, entered = _gate(rt(client).personalizer, "embed", timeout=10)
    t, out = in_thread(lambda: chat(client, "carol"))
    assert entered.wait(10)
    t0 = time.monotonic()
    health = client.get("/healthz")
    took = time.monotonic() - t0
    gate.set()
    t.join(30)
    assert health.status_code == 200 and took < 3, f"healthz took {took:.1f}s"
    assert out["r"].status_code == 200


# ------------------------------------------------------------------ 2. batch isolation and typed 500s
class PickyEngine:
    """Fails the whole batch if any row's prompt is 'bad'; streams one piece per row first."""

    def __init__(self, stream_first: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.stream_first = stream_first

    def generate(self, reqs):
        self.calls.append([r.prompt for r in reqs])
        if self.stream_first:
            for r in reqs:
                if r.on_text is not None:
                    r.on_text("partial")
        if any(r.prompt == "bad" for r in reqs):
            raise RuntimeError("a bug triggered by row 'bad'")
        return [GenerationResult(r.prompt.upper(), [1], 1, 1, "stop") for r in reqs]


def _rows(*prompts):
    return [GenerationRequest(prompt=p, params=SamplingParams(max_new_tokens=2)) for p in prompts]


def test_batcher_isolates_the_faulty_row():
    eng = PickyEngine()
    b = Batcher(eng, max_batch=8, wait_s=0.05, limit=10)
    b.start()

    async def main():
        return await asyncio.gather(*(b.submit_many(_rows(p)) for p in ("a", "bad", "c")),
                                    return_exceptions=True)

    out = asyncio.run(main())
    b.stop()
    assert out[0][0].text == "A" and out[2][0].text == "C"
    assert isinstance(out[1], RuntimeError) and "row 'bad'" in str(out[1])
    assert len(eng.calls[0]) == 3 and sorted(map(tuple, eng.calls[1:])) == [("a",), ("bad",), ("c",)]
    assert b.depth == 0


def test_batcher_does_not_rerun_a_row_that_already_streamed():
    eng = PickyEngine(stream_first=True)
    b = Batcher(eng, max_batch=8, wait_s=0.05, limit=10)
    b.start()
    seen = []
    streamed = _rows("s")[0]
    streamed.on_text = seen.append

    async def main():
        return await asyncio.gather(b.submit_many([streamed]), b.submit_many(_rows("bad")),
                                    b.submit_many(_rows("c")), return_exceptions=True)

    out = asyncio.run(main())
    b.stop()
    assert isinstance(out[0], RuntimeError) and seen == ["partial"]  # its client saw text: not run again
    assert isinstance(out[1], RuntimeError) and out[2][0].text == "C"
    assert streamed.on_text == seen.append  # the callback is given back


def test_an_engine_bug_is_a_typed_500(client, monkeypatch):
    eng = rt(client).engine
    real = eng.generate

    def buggy(reqs):
        if any(r.messages and r.messages[-1]["content"] == "boom" for r in reqs):
            raise RuntimeError("engine bug")
        return real(reqs)

    monkeypatch.setattr(eng, "generate", buggy)
    r = chat(client, messages=[{"role": "user", "content": "boom"}])
    assert "RuntimeError" in assert_error(r, 500, "internal_error")
    assert chat(client).status_code == 200


def test_any_unhandled_exception_is_a_typed_500(make_client, monkeypatch):
    c = make_client(raise_server_exceptions=False)
    thumbs(c, "alice", 0)

    def broken(*a):
        raise RuntimeError("bug")

    monkeypatch.setattr(rt(c), "user_info", broken)
    assert_error(c.get("/v1/users/alice", headers=A), 500, "internal_error")


def test_a_stream_failing_after_its_first_chunk_ends_with_an_error_event(client, monkeypatch):
    eng = rt(client).engine

    def fails_midway(reqs):
        for r in reqs:
            if r.on_text is not None:
                r.on_text("Hel")
        time.sleep(0.3)  # the response has started (else the error is an ordinary HTTP 500)
        raise RuntimeError("engine bug after the first token")

    monkeypatch.setattr(eng, "generate", fails_midway)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=A) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["type"] == "internal_error"
    assert any(json.loads(e).get("choices", [{}])[0].get("delta", {}).get("content") == "Hel" for e in events[:-1])


@pytest.mark.parametrize("url,body", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}'),
    ("/v1/completions", '{"prompt": "x\\ud800y"}'),
    ("/v1/feedback", '{"user_id": "alice", "prompt": "\\ud800", "completion": "c", "rating": "up"}'),
    ("/v1/feedback", '{"user_id": "alice", "prompt": "p", "chosen": "c", "rejected": "\\udc00"}'),
])
def test_lone_surrogates_are_rejected_with_a_typed_4xx(client, url, body):
    status = 422 if url == "/v1/feedback" else 400  # the OpenAI routes answer as OpenAI does
    msg = assert_error(client.post(url, content=body, headers=JSON), status, "invalid_request")
    assert "Unicode" in msg


# ------------------------------------------------------------------ 3. feedback during or before a job
def _gate_reward(c):
    """Make adaptation jobs wait (inside the job, after it started) until ``gate`` is set."""
    return _gate(rt(c).personalizer, "adapt_reward")


def test_feedback_during_a_job_starts_the_next_job_when_it_ends(client):
    gate, entered = _gate_reward(client)
    thumbs(client, "alice", 0)
    assert thumbs(client, "alice", 1).json()["job"] is not None  # threshold 2: job 1
    assert entered.wait(20)  # job 1 runs (on records 1-2)
    thumbs(client, "alice", 2)
    thumbs(client, "alice", 3)  # 2 more while it runs
    gate.set()
    assert rt(client).runner.wait_idle(60)
    info = client.get("/v1/users/alice", headers=A).json()
    assert info["policy"]["current"] == 2, info
    assert info["feedback"]["new"] == 0 and info["job"]["latest"]["feedback_upto"] == 4


def test_jobs_cancelled_at_shutdown_keep_their_records_new(make_client):
    c1 = make_client()
    gate, _ = _gate_reward(c1)
    for u in ("u1", "u2"):  # one worker: u2's job waits behind u1's
        thumbs(c1, u, 0)
        thumbs(c1, u, 1)
    threading.Timer(0.5, gate.set).start()
    c1.__exit__(None, None, None)
    c2 = make_client()
    info = c2.get("/v1/users/u2", headers=A).json()
    assert info["job"]["latest"]["state"] == "failed" and "shut down" in info["job"]["latest"]["error"]
    assert info["feedback"]["new"] == 2 and info["policy"]["current"] is None
    thumbs(c2, "u2", 2)  # new = 3 >= 2
    assert rt(c2).runner.wait_idle(60)
    assert c2.get("/v1/users/u2", headers=A).json()["policy"]["current"] == 1


def test_a_failed_job_keeps_its_records_new_and_the_next_waits_for_threshold_more(client):
    pers, runner = rt(client).personalizer, rt(client).runner
    real, tried = pers.adapt_reward, []

    def failing(records):
        tried.append(len(records))
        raise RuntimeError("injected adaptation failure")

    pers.adapt_reward = failing
    for i in range(5):  # threshold 2: fails on records 1-2, then on 1-4; not one job per feedback
        thumbs(client, "alice", i)
        assert runner.wait_idle(60)
    assert tried == [2, 4]
    info = client.get("/v1/users/alice", headers=A).json()
    assert info["job"]["latest"]["state"] == "failed" and info["feedback"]["new"] == 5
    pers.adapt_reward = real
    thumbs(client, "alice", 5)  # 2 past the last failure: retried, and it succeeds
    assert runner.wait_idle(60)
    info = client.get("/v1/users/alice", headers=A).json()
    assert info["policy"]["current"] == 1 and info["feedback"]["new"] == 0


def test_a_stale_new_count_does_not_start_a_job(client):
    runner = rt(client).runner
    thumbs(client, "alice", 0)
    thumbs(client, "alice", 1)
    assert runner.wait_idle(60)
    assert client.get("/v1/users/alice", headers=A).json()["feedback"]["new"] == 0
    # a count returned by a feedback write before the job moved the watermark
    assert runner.maybe_enqueue("acme", "alice", 3) is None
    assert runner.inflight("acme", "alice") is None


# ------------------------------------------------------------------ 4. erasure while a job runs
def test_erasure_during_a_job_discards_its_output_even_after_new_feedback(client):
    gate, entered = _gate(rt(client).personalizer, "adapt_policy")
    thumbs(client, "zed", 0, prompt="SECRET-1")
    thumbs(client, "zed", 1, prompt="SECRET-2")
    assert entered.wait(20)
    assert client.delete("/v1/users/zed", headers=A).status_code == 204
    # the user comes back (below the threshold): the erased job is not theirs any more
    assert thumbs(client, "zed", 0, prompt="new").json()["job"] is None
    assert client.get("/v1/users/zed", headers=A).json()["job"]["in_flight"] is None
    r = client.post("/v1/users/zed/adapt", headers=A)  # the erased job is still finishing
    assert r.status_code == 400 and "retry in a moment" in r.json()["error"]["message"], r.text
    gate.set()
    assert rt(client).runner.wait_idle(60)
    info = client.get("/v1/users/zed", headers=A).json()
    assert info["policy"]["current"] is None and info["policy"]["versions"] == []
    assert info["reward"]["current"] is None and info["feedback"]["total"] == 1
    assert rt(client).index.get("acme", "zed") is None
    assert rt(client).engine.evict("acme/zed") == 0  # the discarded v1 was validated (loaded): not resident
    assert chat(client, "zed").json()["adapter"]["source"] != "own"


def test_an_erasure_right_after_a_job_publishes_leaves_no_trace_of_it(client):
    R = rt(client)
    gate, entered = _gate(R.runner, "on_new_version")  # the job has made v1 current
    thumbs(client, "zed", 0)
    thumbs(client, "zed", 1)
    assert entered.wait(20)
    eraser = threading.Thread(target=lambda: client.delete("/v1/users/zed", headers=A))
    eraser.start()
    eraser.join(1.0)  # the erasure waits for the job's publication to end, callback included
    gate.set()
    eraser.join(20)
    assert not eraser.is_alive() and R.runner.wait_idle(60)
    assert ("acme", "zed") not in R._changed  # the callback did not land after the erasure
    assert client.get("/v1/users/zed", headers=A).status_code == 404


def test_a_rollback_while_a_job_runs_is_not_published_over(client):
    for i in range(4):  # threshold 2: v1, then v2
        thumbs(client, "bob", i)
        assert rt(client).runner.wait_idle(60)
    assert client.get("/v1/users/bob", headers=A).json()["policy"]["current"] == 2
    gate, entered = _gate(rt(client).personalizer, "adapt_policy")
    thumbs(client, "bob", 4)
    thumbs(client, "bob", 5)  # job 3 starts and waits inside the adaptation
    assert entered.wait(20)
    r = client.post("/v1/users/bob/rollback", json={"kind": "both", "version": 1}, headers=A)
    assert r.status_code == 200 and r.json()["current"] == {"policy": 1, "reward": 1}, r.text
    gate.set()
    assert rt(client).runner.wait_idle(60)
    info = client.get("/v1/users/bob", headers=A).json()
    assert info["policy"]["current"] == 1 and info["reward"]["current"] == 1, info  # the rollback stands
    assert 3 in [v["version"] for v in info["policy"]["versions"]]  # stored: bob can roll forward to it
    latest = info["job"]["latest"]
    assert latest["state"] == "succeeded" and latest["result"]["published"] is False, latest
    assert info["feedback"]["new"] == 0  # its records are consumed: no job re-publishes them at once
    assert chat(client, "bob").json()["adapter"]["version"] == 1
    thumbs(client, "bob", 6)
    thumbs(client, "bob", 7)  # new feedback after the rollback: its job publishes
    assert rt(client).runner.wait_idle(60)
    assert client.get("/v1/users/bob", headers=A).json()["policy"]["current"] == 4
    assert chat(client, "bob").json()["adapter"]["version"] == 4


# ------------------------------------------------------------------ 5. stale serving decisions
def test_a_version_landing_while_a_decision_is_computed_is_not_cached_over(client):
    for i in range(2):
        thumbs(client, "bob", i)
    R = rt(client)
    assert R.runner.wait_idle(60)
    orig, done = R.own_adapter, []

    def own_then_job_lands(t, u):
        r = orig(t, u)  # reads CURRENT = v1; meanwhile v2 lands
        if not done:
            done.append(1)
            R.runner.enqueue(t, u, reason="manual")
            R.runner.wait_idle(60)
        return r

    R.own_adapter = own_then_job_lands
    R.invalidate("acme", "bob")
    assert chat(client, "bob").json()["adapter"]["version"] == 1  # the racing request itself
    assert R.store.current("acme", "bob", "policy") == 2
    assert chat(client, "bob").json()["adapter"]["version"] == 2
    assert client.get("/v1/users/bob", headers=A).json()["serving"]["version"] == 2


def test_a_cold_start_user_picks_up_a_neighbour_that_appears_later(client):
    thumbs(client, "carol", 0)
    assert chat(client, "carol").json()["adapter"]["source"] == "base"  # nobody to borrow from yet
    for i in range(2):
        thumbs(client, "bob", i)
    assert rt(client).runner.wait_idle(60)
    adapter = chat(client, "carol").json()["adapter"]
    assert adapter["source"] == "neighbor" and adapter["neighbor"] == "bob" and adapter["neighbor_version"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_neighbour_erased_while_its_adapter_generates_is_not_named_in_the_stored_completion(
        client, monkeypatch, stream):
    """carol is served with bob's adapter; bob is erased before carol's completion is
    stored. The stored row must not name bob (his erasure scrubbed only the rows already
    there); the rows of an erasure-free request keep the neighbour."""
    thumbs(client, "carol", 0)
    for i in range(2):
        thumbs(client, "bob", i)
    R = rt(client)
    assert R.runner.wait_idle(60)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0, "user": "carol"}
    kept = client.post("/v1/chat/completions", json=body, headers=A).json()
    assert kept["adapter"]["neighbor"] == "bob"
    assert R.feedback.get_completion("acme", "carol", choice_id(kept["id"], 0))["adapter"]["neighbor"] == "bob"
    real = R.generate

    async def generate_then_erase_neighbour(tenant, user, reqs):
        got = await real(tenant, user, reqs)
        R.delete_user(tenant, "bob")  # the DELETE of the neighbour lands while carol's answer is on its way
        return got

    monkeypatch.setattr(R, "generate", generate_then_erase_neighbour)
    r = client.post("/v1/chat/completions", json={**body, "stream": stream}, headers=A)
    assert r.status_code == 200, r.text
    rows = R.feedback._reader().execute(
        "SELECT id, adapter FROM completions WHERE tenant='acme' AND user_id='carol'").fetchall()
    stored = {row[0]: json.loads(row[1]) for row in rows}
    assert len(stored) >= 2 and all(a.get("neighbor") is None and a.get("neighbor_erased") for a in stored.values())


def test_index_save_writes_under_the_lock(tmp_path, monkeypatch):
    import metarlhf.io

    idx = PreferenceIndex(4, tmp_path / "idx.safetensors")
    idx.upsert("t", "u", np.ones(4, np.float32))
    real, held = metarlhf.io.save_tensors, []

    def probe():
        got = idx._lock.acquire(blocking=False)
        if got:
            idx._lock.release()
        held.append(not got)

    def check(*a, **k):
        t = threading.Thread(target=probe)
        t.start()
        t.join()
        real(*a, **k)

    monkeypatch.setattr(metarlhf.io, "save_tensors", check)
    idx.save()
    assert held == [True]
    assert PreferenceIndex.load(tmp_path / "idx.safetensors", 4).get("t", "u") is not None


# ------------------------------------------------------------------ 7, 8. OpenAI compatibility, strict ints
def test_models_endpoint_lists_the_served_model(client):
    body = client.get("/v1/models", headers=A).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == "metarlhf" and card["object"] == "model" and card["owned_by"] == "metarlhf"
    assert isinstance(card["created"], int)
    assert client.get("/v1/models/metarlhf", headers=A).json() == card
    assert_error(client.get("/v1/models/gpt-4", headers=A), 404, "not_found")
    assert_error(client.get("/v1/models"), 401, "unauthorized")
    assert "/v1/models" in client.get("/openapi.json").json()["paths"]


def test_message_content_parts_and_the_developer_role(client):
    plain = chat(client, messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "hello\nthere"}]).json()
    parts = chat(client, messages=[{"role": "developer", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                {"type": "text", "text": "there"}]}]).json()
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    r = chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "text parts" in assert_error(r, 400, "invalid_config")


def test_any_int64_seed_is_accepted_and_deterministic(client):
    def sample(**kw):
        r = chat(client, user=None, temperature=1.0, max_tokens=6, **kw)
        assert r.status_code == 200, r.text
        return [ch["message"]["content"] for ch in r.json()["choices"]]

    assert sample(seed=-1) == sample(seed=-1)
    assert len(sample(seed=2**63 - 1, n=3)) == 3  # seed + i wraps instead of overflowing
    assert len(sample(seed=-(2**63), n=2)) == 2
    assert_error(chat(client, seed=2**63), 400, "invalid_request")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p"])
def test_booleans_are_not_numbers(client, field):
    r = chat(client, **{field: True})
    assert_error(r, 400, "invalid_request")
    assert r.json()["error"]["param"] == field


def test_engine_seed_mapping():
    from server.routes import engine_seed

    assert engine_seed(None) is None and engine_seed(5, 2) == 7
    assert engine_seed(-1) == 2**63 - 1 and engine_seed(2**63 - 1, 1) == 0
    with pytest.raises(ConfigError):
        SamplingParams(seed=2**63)  # the engine's range, which the mapping stays inside


def test_no_op_values_of_unsupported_openai_fields_are_accepted(client):
    assert chat(client, presence_penalty=0, frequency_penalty=0.0, logprobs=False).status_code == 200
    # what the openai SDK and LangChain send for fields left unset: null, or the no-op value
    nulls = {name: None for name in NO_OPS}
    assert chat(client, **nulls).status_code == 200
    assert chat(client, logit_bias={}, best_of=1, echo=False, tools=[], tool_choice="none",
                response_format={"type": "text"}, top_logprobs=0, service_tier="auto").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logprobs": 0, "logit_bias": None,
                                             "suffix": None, "echo": False}, headers=A)
    assert r.status_code == 200, r.text
    assert "presence_penalty" in assert_error(chat(client, presence_penalty=0.5), 400, "invalid_request")
    assert "logprobs" in assert_error(chat(client, logprobs=True), 400, "invalid_request")
    for bad in [{"logprobs": 1}, {"best_of": 2}, {"best_of": True}, {"logit_bias": {"50256": -100}},
                {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"echo": True},
                {"response_format": {"type": "json_object"}}, {"parallel_tool_calls": False}]:
        (name,) = bad
        assert f"{name} is not supported" in assert_error(chat(client, **bad), 400, "invalid_request"), bad
    assert_error(chat(client, frequency_penalty_typo=0), 400, "invalid_request")  # unknown fields: refused


def test_a_list_of_prompts_gets_n_choices_each_in_openai_order(client):
    r = client.post("/v1/completions", json={"prompt": ["one", "two", "three"], "n": 2, "max_tokens": 3,
                                             "temperature": 0, "user": "lister"}, headers=A)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    single = [client.post("/v1/completions", json={"prompt": p, "max_tokens": 3, "temperature": 0},
                          headers=A).json() for p in ("one", "two", "three")]
    # greedy: choice i*n + j answers prompt i
    assert [c["text"] for c in body["choices"]] == [s["choices"][0]["text"] for s in single for _ in range(2)]
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    # each choice is stored with the prompt it answers, so rating choice 5 rates prompt "three"
    r = client.post("/v1/feedback", json={"user_id": "lister", "completion_id": body["id"], "choice_index": 5,
                                          "rating": "up"}, headers=A)
    assert r.status_code == 202, r.text
    records = rt(client).feedback.records("acme", "lister")
    assert [(rec.prompt, rec.completion) for rec in records] == [("three", body["choices"][5]["text"])]
    one = client.post("/v1/completions", json={"prompt": ["solo"], "max_tokens": 2, "stream": True}, headers=A)
    assert one.status_code == 200
    assert_error(client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True}, headers=A), 400,
                 "invalid_config")
    assert_error(client.post("/v1/completions", json={"prompt": []}, headers=A), 400, "invalid_request")
    assert_error(client.post("/v1/completions", json={"prompt": [1, 2]}, headers=A), 400, "invalid_request")
    assert "at most 16 prompts" in assert_error(
        client.post("/v1/completions", json={"prompt": ["p"] * 17}, headers=A), 400, "invalid_config")


# ------------------------------------------------------------------ feedback on one choice of an n > 1 response
def test_feedback_names_a_choice_of_an_n2_response_or_picks_one_over_the_other(client):
    r = chat(client, "alice", n=2, temperature=1.0, seed=3, max_tokens=6)
    assert r.status_code == 200, r.text
    cid, texts = r.json()["id"], [c["message"]["content"] for c in r.json()["choices"]]
    ok = client.post("/v1/feedback", json={"user_id": "alice", "completion_id": cid, "rating": "up",
                                           "choice_index": 1}, headers=A)
    assert ok.status_code == 202, ok.text
    ok = client.post("/v1/feedback", json={"user_id": "alice", "completion_id": cid, "chosen_index": 1,
                                           "rejected_index": 0}, headers=A)
    assert ok.status_code == 202, ok.text
    records = rt(client).feedback.records("acme", "alice")
    assert records[0].completion == texts[1] and records[0].label == 1  # the rated choice, not choices[0]
    assert (records[1].chosen, records[1].rejected) == (texts[1], texts[0])
    for bad, status in [({"choice_index": 2, "rating": "up"}, 404), ({"chosen_index": 0, "rejected_index": 0}, 422),
                        ({"chosen_index": 0, "rating": "up"}, 422), ({"choice_index": -1, "rating": "up"}, 422)]:
        assert_error(client.post("/v1/feedback", json={"user_id": "alice", "completion_id": cid, **bad}, headers=A),
                     status)


def test_a_lower_token_limit_caps_the_default_instead_of_failing_every_request(make_client):
    c = make_client(max_tokens_limit=3, default_max_tokens=6)
    r = c.post("/v1/completions", json={"prompt": "hello", "temperature": 0}, headers=A)
    assert r.status_code == 200, r.text  # was: 400 "max_tokens must be in [1, 3], got 6", a value never sent
    assert r.json()["usage"]["completion_tokens"] <= 3
    assert_error(c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4}, headers=A), 400,
                 "invalid_config")


def test_a_pair_with_the_same_text_twice_is_refused(client):
    r = client.post("/v1/feedback", json={"user_id": "alice", "prompt": "p", "chosen": "same", "rejected": "same"},
                    headers=A)
    assert "same text" in assert_error(r, 422, "invalid_request")


def test_stream_chunks_carry_the_system_fingerprint(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "user": "alice"}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=A) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and all(e["system_fingerprint"] == "base-v0" for e in events if e["choices"])

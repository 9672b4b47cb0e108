"""API tests on a tiny random policy and the real adaptation code (tiny models)."""

import json
import logging

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.testing import TinyPersonalizer, tiny_engine

KEY_A, KEY_B = "sk-tenant-a-key", "sk-tenant-b-key"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def chat(c, user="alice", headers=A, **kw):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0, **kw}
    if user is not None:
        body["user"] = user
    return c.post("/v1/chat/completions", json=body, headers=headers)


def rt(c):
    return c.app.state.runtime


def adapt(c, user="alice", headers=A, n=2):
    """Give n thumbs (threshold 2 -> one job) and wait for it."""
    for i in range(n):
        r = c.post("/v1/feedback", json={"user_id": user, "prompt": f"p{i}", "completion": f"answer {i}",
                                         "rating": "up" if i % 2 == 0 else "down"}, headers=headers)
        assert r.status_code == 202, r.text
    assert rt(c).runner.wait_idle(60)


def assert_error(r, status, type_=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}
    assert body["error"]["code"] == body["error"]["type"]  # OpenAI's shape: clients branch on code
    if type_:
        assert body["error"]["type"] == type_
    return body["error"]["message"]


# ------------------------------------------------------------------------- ops and auth
def test_health_ready_and_docs_need_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/feedback", "/v1/users/{user_id}",
              "/v1/users/{user_id}/adapt", "/v1/users/{user_id}/rollback", "/v1/users/{user_id}/neighbors",
              "/v1/jobs/{job_id}", "/metrics"):
        assert p in paths


def test_every_api_route_needs_a_valid_key(client):
    for method, path in [("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("post", "/v1/feedback"),
                         ("get", "/v1/users/alice"), ("delete", "/v1/users/alice"), ("get", "/metrics"),
                         ("get", "/v1/jobs/x"), ("get", "/v1/users/alice/neighbors")]:
        r = getattr(client, method)(path)
        assert_error(r, 401, "unauthorized")
        r = getattr(client, method)(path, headers={"Authorization": "Bearer sk-wrong-key"})
        assert_error(r, 401, "unauthorized")


def test_metrics_prometheus_text(client):
    chat(client)
    text = client.get("/metrics", headers=A).text
    for name in ("metarlhf_requests_total", "metarlhf_request_seconds_bucket", "metarlhf_queue_depth",
                 "metarlhf_adapter_cache_hits", "metarlhf_adapter_cache_misses", "metarlhf_adaptation_queue_depth"):
        assert name in text
    assert 'route="/v1/chat/completions"' in text


# ------------------------------------------------------------------------- completions
def test_chat_completion_is_openai_shaped_and_names_the_adapter(client):
    r = chat(client, n=2, seed=3, temperature=0.8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert len(body["choices"]) == 2 and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 12
    assert body["adapter"] == {"source": "base", "user_id": "alice", "version": None}
    # greedy decoding is deterministic
    assert chat(client).json()["choices"][0]["message"] == chat(client).json()["choices"][0]["message"]


def test_text_completion(client):
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 4, "user": "bob", "stop": ["\n"]},
                    headers=A)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion" and isinstance(r.json()["choices"][0]["text"], str)


def test_streaming_sse(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": True,
            "user": "alice", "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=A) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    # same greedy text as the non-streamed call, and the completion is stored for feedback
    assert text == chat(client, user="alice", max_tokens=5, messages=body["messages"]).json()[
        "choices"][0]["message"]["content"]
    cid = chunks[0]["id"]
    r = client.post("/v1/feedback", json={"user_id": "alice", "completion_id": cid, "rating": "up"}, headers=A)
    assert r.status_code == 202


def _stream_text(c, user, content="hi"):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0,
            "stream": True, "user": user}
    with c.stream("POST", "/v1/chat/completions", json=body, headers=A) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def test_concurrent_streams_are_batched_together(make_client):
    import threading

    c = make_client(batch_wait_ms=400)  # long window: both streams must land in one batch
    alone = [_stream_text(c, u, content=u) for u in ("alice", "bob")]
    b = rt(c).batcher
    batches, rows = b.batches, b.rows
    out: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, u=u: out.__setitem__(i, _stream_text(c, u, content=u)))
               for i, u in enumerate(("alice", "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (b.batches - batches, b.rows - rows) == (1, 2)
    assert [out[0], out[1]] == alone  # greedy: the same text alone or batched


def test_stream_gets_http_errors_before_the_first_byte(client):
    b = rt(client).batcher
    b._pending = b.limit
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True, "user": "alice"}
    r = client.post("/v1/chat/completions", json=body, headers=A)
    assert_error(r, 429, "overloaded")
    b._pending = 0
    r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x" * 5000}]},
                    headers=A)
    assert "limit" in assert_error(r, 400, "invalid_config")


@pytest.mark.parametrize("field,value,needle", [
    ("max_tokens", 0, "max_tokens"), ("max_tokens", 33, "max_tokens"), ("max_tokens", -5, "max_tokens"),
    ("temperature", -0.1, "temperature"), ("top_p", 0, "top_p"), ("top_p", 1.5, "top_p"), ("n", 4, "n must"),
])
def test_invalid_generation_parameters(client, field, value, needle):
    msg = assert_error(chat(client, **{field: value}), 400, "invalid_config")
    assert needle in msg


def test_nan_temperature_is_rejected(client):
    raw = '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    r = client.post("/v1/chat/completions", content=raw, headers={**A, "Content-Type": "application/json"})
    assert r.status_code in (400, 422)
    assert r.json()["error"]["type"] in ("invalid_config", "invalid_request")


def test_prompt_over_the_context_limit(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 400, "max_tokens": 4}, headers=A)
    assert "limit" in assert_error(r, 400, "invalid_config")


def test_unknown_fields_are_rejected(client):
    assert_error(chat(client, frequency_penalty_typo=1), 400, "invalid_request")  # OpenAI's status
    r = client.post("/v1/feedback", json={"user_id": "a", "prompt": "p", "completion": "c", "rating": "up",
                                          "extra": 1}, headers=A)
    assert_error(r, 422, "invalid_request")


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "", "x" * 129, "sp ace"])
def test_bad_user_ids_are_rejected(client, bad):
    assert_error(chat(client, user=bad), 400, "invalid_request")
    r = client.post("/v1/feedback", json={"user_id": bad, "prompt": "p", "completion": "c", "rating": "up"}, headers=A)
    assert_error(r, 422, "invalid_request")


def test_path_shaped_user_ids_in_urls(client):
    assert_error(client.get("/v1/users/%2E%2E", headers=A), 422, "invalid_request")
    r = client.get("/v1/users/..%2Fx", headers=A)  # decodes to ../x: no such route
    assert r.status_code in (404, 422) and "error" in r.json()


def test_body_over_one_mib_is_413(client):
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert_error(client.post("/v1/chat/completions", json=big, headers=A), 413, "request_too_large")

    def chunks():
        for _ in range(20):
            yield b"x" * 65536

    r = client.post("/v1/feedback", content=chunks(), headers={**A, "Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_queue_full_is_429_with_retry_after(client):
    chat(client)
    b = rt(client).batcher
    b._pending = b.limit  # every admission slot taken
    r = chat(client)
    assert_error(r, 429, "overloaded")
    assert r.headers["Retry-After"] == "1"
    b._pending = 0
    assert chat(client).status_code == 200


# ------------------------------------------------------------------------- feedback
def test_feedback_shapes_and_completion_ids(client):
    cid = chat(client).json()["id"]
    for body in ({"user_id": "alice", "completion_id": cid, "rating": "up"},
                 {"user_id": "alice", "prompt": "p", "completion": "c", "rating": "down"},
                 {"user_id": "alice", "prompt": "p", "chosen": "a", "rejected": "b"}):
        r = client.post("/v1/feedback", json=body, headers=A)
        assert r.status_code == 202, r.text
        assert r.json()["id"].startswith("fb-")
    recs = rt(client).feedback.records("acme", "alice")
    assert recs[0].prompt == "hello" and recs[0].completion == chat(client).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/feedback", json={"user_id": "alice", "completion_id": "chatcmpl-nope", "rating": "up"},
                    headers=A)
    assert_error(r, 404, "not_found")
    # a completion id of another user is not found either
    r = client.post("/v1/feedback", json={"user_id": "bob", "completion_id": cid, "rating": "up"}, headers=A)
    assert_error(r, 404, "not_found")
    r = client.post("/v1/feedback", json={"user_id": "alice", "prompt": "p", "rating": "up"}, headers=A)
    assert_error(r, 422, "invalid_request")
    r = client.post("/v1/feedback", json={"user_id": "alice", "prompt": "p", "completion": "c", "rating": "meh"},
                    headers=A)
    assert_error(r, 422, "invalid_request")


def test_idempotency_key(client):
    body = {"user_id": "alice", "prompt": "p", "completion": "c", "rating": "up"}
    h = {**A, "Idempotency-Key": "abc-123"}
    r1 = client.post("/v1/feedback", json=body, headers=h)
    r2 = client.post("/v1/feedback", json=body, headers=h)
    assert r1.status_code == r2.status_code == 202
    assert r1.json()["id"] == r2.json()["id"] and r2.json()["replayed"]
    assert rt(client).feedback.counts("acme", "alice")["total"] == 1
    r3 = client.post("/v1/feedback", json={**body, "rating": "down"}, headers=h)
    assert "Idempotency-Key" in assert_error(r3, 422, "invalid_data")


# ------------------------------------------------------------------------- adaptation
def test_threshold_triggers_adaptation_and_the_new_version_serves(client):
    assert chat(client).json()["adapter"]["source"] == "base"
    client.post("/v1/feedback", json={"user_id": "alice", "prompt": "p", "completion": "c", "rating": "up"}, headers=A)
    assert rt(client).runner.wait_idle(30)
    assert client.get("/v1/users/alice", headers=A).json()["policy"]["current"] is None  # 1 < threshold 2
    adapt(client, n=1)
    info = client.get("/v1/users/alice", headers=A).json()
    assert info["policy"]["current"] == 1 and info["reward"]["current"] == 1
    assert info["feedback"] == {"total": 2, "up": 2, "down": 0, "pairs": 0, "new": 0}
    assert info["job"]["latest"]["state"] == "succeeded" and info["job"]["latest"]["result"]["policy_version"] == 1
    assert info["policy"]["versions"][0]["metrics"]["losses"]
    assert info["policy_changed_at"] is not None
    body = chat(client).json()
    assert body["adapter"] == {"source": "own", "user_id": "alice", "version": 1}
    assert body["system_fingerprint"] == "own-v1"
    on_disk = rt(client).store.path("acme", "alice", "policy", 1)
    assert (on_disk / "adapter_model.safetensors").is_file()


def test_manual_adapt_job_endpoint_and_single_flight(client):
    client.post("/v1/feedback", json={"user_id": "alice", "prompt": "p", "completion": "c", "rating": "up"}, headers=A)
    runner = rt(client).runner
    j1 = client.post("/v1/users/alice/adapt", headers=A)
    j2 = client.post("/v1/users/alice/adapt", headers=A)
    assert j1.status_code == j2.status_code == 202
    if j2.json()["state"] in ("queued", "running"):
        assert j1.json()["id"] == j2.json()["id"]  # single-flight: the job in flight is returned
    assert runner.wait_idle(30)
    job = client.get(f"/v1/jobs/{j1.json()['id']}", headers=A).json()
    assert job["state"] == "succeeded"
    assert_error(client.get(f"/v1/jobs/{j1.json()['id']}", headers=B), 404, "not_found")
    assert_error(client.get("/v1/jobs/job-unknown", headers=A), 404, "not_found")
    assert_error(client.post("/v1/users/nobody/adapt", headers=A), 404, "not_found")


def test_single_flight_under_a_slow_job(client):
    import threading

    gate = threading.Event()
    pers = rt(client).personalizer
    real = pers.adapt_reward

    def slow(records):
        gate.wait(10)
        return real(records)

    pers.adapt_reward = slow
    client.post("/v1/feedback", json={"user_id": "alice", "prompt": "p", "completion": "c", "rating": "up"}, headers=A)
    j1 = client.post("/v1/users/alice/adapt", headers=A).json()
    j2 = client.post("/v1/users/alice/adapt", headers=A).json()
    assert j1["id"] == j2["id"]
    assert client.get("/v1/users/alice", headers=A).json()["job"]["in_flight"] == j1["id"]
    gate.set()
    assert rt(client).runner.wait_idle(30)
    assert pers.calls == 1


def test_failed_job_keeps_the_previous_version_serving(client, caplog):
    adapt(client)
    rt(client).personalizer.fail_next = True
    with caplog.at_level(logging.ERROR):
        adapt(client)
    info = client.get("/v1/users/alice", headers=A).json()
    assert info["job"]["latest"]["state"] == "failed"
    assert "injected adaptation failure" in info["job"]["latest"]["error"]
    assert info["policy"]["current"] == 1 and [v["version"] for v in info["policy"]["versions"]] == [1]
    assert chat(client).json()["adapter"]["version"] == 1
    assert "failed" in caplog.text


def test_rollback(client):
    adapt(client)
    adapt(client)
    assert chat(client).json()["adapter"]["version"] == 2
    r = client.post("/v1/users/alice/rollback", json={"kind": "both"}, headers=A)
    assert r.status_code == 200 and r.json()["current"] == {"policy": 1, "reward": 1}
    assert chat(client).json()["adapter"]["version"] == 1
    r = client.post("/v1/users/alice/rollback", json={"version": 2}, headers=A)
    assert r.json()["current"] == {"policy": 2}
    assert chat(client).json()["adapter"]["version"] == 2
    assert_error(client.post("/v1/users/alice/rollback", json={"version": 7}, headers=A), 404)
    assert_error(client.post("/v1/users/alice/rollback", json={"kind": "optimizer"}, headers=A), 422)


def test_corrupted_adapter_falls_back_and_other_users_are_unaffected(client, caplog):
    adapt(client, "alice")
    adapt(client, "alice")
    adapt(client, "bob")
    rt(client).engine.evict("acme/alice")
    rt(client).invalidate("acme", "alice")
    weights = rt(client).store.path("acme", "alice", "policy", 2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with caplog.at_level(logging.ERROR):
        body = chat(client, "alice").json()
    assert body["adapter"]["version"] == 1 and body["adapter"]["fallback_from"] == 2
    assert "checksum" in caplog.text or "unusable" in caplog.text
    assert chat(client, "bob").json()["adapter"] == {"source": "own", "user_id": "bob", "version": 1}
    # every version broken: base
    w1 = rt(client).store.path("acme", "alice", "policy", 1) / "adapter_model.safetensors"
    w1.write_bytes(b"junk")
    rt(client).invalidate("acme", "alice")
    assert chat(client, "alice").json()["adapter"]["source"] in ("base", "neighbor")


def test_cold_start_uses_the_nearest_users_adapter(client):
    adapt(client, "bob")
    # carol: one thumbs (below the threshold of 2), same feedback as bob's first record
    r = client.post("/v1/feedback", json={"user_id": "carol", "prompt": "p0", "completion": "answer 0",
                                          "rating": "up"}, headers=A)
    assert r.status_code == 202
    body = chat(client, "carol").json()
    assert body["adapter"]["source"] == "neighbor" and body["adapter"]["neighbor"] == "bob"
    nb = client.get("/v1/users/carol/neighbors", headers=A).json()["neighbors"]
    assert nb[0]["user_id"] == "bob" and nb[0]["policy_version"] == 1
    # a user with no feedback at all gets the base model
    assert chat(client, "dave").json()["adapter"]["source"] == "base"
    assert client.get("/v1/users/dave/neighbors", headers=A).json()["neighbors"] == []
    assert_error(client.get("/v1/users/erin/neighbors", headers=A), 404)  # never seen


def test_index_is_persisted_and_rebuilt_at_start_up(make_client, tmp_path):
    c1 = make_client()
    adapt(c1, "bob")
    assert rt(c1).index.get("acme", "bob") is not None
    c1.__exit__(None, None, None)
    c2 = make_client()
    assert rt(c2).index.get("acme", "bob") is not None
    (tmp_path / "adapters" / "preferences.safetensors").unlink()
    c2.__exit__(None, None, None)
    c3 = make_client()  # file lost: rebuilt from the stored feedback of users with adapters
    import time

    for _ in range(100):
        if rt(c3).index.get("acme", "bob") is not None:
            break
        time.sleep(0.05)
    assert rt(c3).index.get("acme", "bob") is not None
    assert chat(c3, "bob").json()["adapter"]["version"] == 1


# ------------------------------------------------------------------------- users and tenancy
def test_delete_user_erases_feedback_and_adapters(client):
    adapt(client, "alice")
    adapt(client, "bob")
    udir = rt(client).store.user_dir("acme", "alice")
    assert udir.exists()
    r = client.delete("/v1/users/alice", headers=A)
    assert r.status_code == 204 and r.content == b""
    assert not udir.exists()
    assert rt(client).feedback.counts("acme", "alice")["total"] == 0
    assert rt(client).index.get("acme", "alice") is None
    assert_error(client.get("/v1/users/alice", headers=A), 404, "not_found")
    assert_error(client.delete("/v1/users/alice", headers=A), 404, "not_found")
    assert chat(client, "alice").json()["adapter"]["source"] in ("base", "neighbor")
    assert client.get("/v1/users/bob", headers=A).json()["policy"]["current"] == 1


def test_a_tenant_can_never_read_feed_or_erase_another_tenants_users(client):
    adapt(client, "alice", headers=A)
    cid = chat(client, "alice", headers=A).json()["id"]
    assert_error(client.get("/v1/users/alice", headers=B), 404)
    assert_error(client.get("/v1/users/alice/neighbors", headers=B), 404)
    assert_error(client.post("/v1/users/alice/adapt", headers=B), 404)
    assert_error(client.post("/v1/users/alice/rollback", json={}, headers=B), 404)
    assert_error(client.delete("/v1/users/alice", headers=B), 404)
    r = client.post("/v1/feedback", json={"user_id": "alice", "completion_id": cid, "rating": "up"}, headers=B)
    assert_error(r, 404)
    # B's "alice" is a different user: B's requests never get A's adapter
    assert chat(client, "alice", headers=B).json()["adapter"]["source"] == "base"
    assert client.get("/v1/users/alice", headers=A).json()["feedback"]["total"] == 2


def test_web_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "metarlhf" in r.text and "/v1/feedback" in r.text


def test_erasure_while_a_job_runs_leaves_nothing_behind(client):
    import threading

    gate = threading.Event()
    pers = rt(client).personalizer
    real = pers.adapt_policy

    def slow(records, init):
        gate.wait(10)
        return real(records, init)

    pers.adapt_policy = slow
    client.post("/v1/feedback", json={"user_id": "eve", "prompt": "p", "completion": "c", "rating": "up"}, headers=A)
    client.post("/v1/users/eve/adapt", headers=A)
    assert client.delete("/v1/users/eve", headers=A).status_code == 204
    gate.set()
    assert rt(client).runner.wait_idle(30)
    assert not rt(client).store.user_dir("acme", "eve").exists()
    assert rt(client).index.get("acme", "eve") is None
    assert_error(client.get("/v1/users/eve", headers=A), 404)


def test_serve_command_generates_and_prints_a_key(monkeypatch, capsys, tmp_path):
    import uvicorn

    from metarlhf.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    monkeypatch.delenv("METARLHF_API_KEYS", raising=False)
    assert main(["serve", "--port", "8123", "--adapter-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    key = out.split("tenant 'default':")[1].split()[0]
    assert key.startswith("sk-") and seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert seen["app"].state.settings.api_keys == {key: "default"}
    assert main(["serve", "--adapt-threshold", "0"]) == 2  # invalid setting -> exit 2


def test_serve_device_setting(monkeypatch, capsys, tmp_path):
    import torch
    import uvicorn

    from metarlhf.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app))
    monkeypatch.setenv("METARLHF_API_KEYS", '{"sk-test-key-1": "acme"}')
    assert main(["serve", "--device", "cpu", "--adapter-root", str(tmp_path)]) == 0
    assert seen["app"].state.settings.device == "cpu"
    assert main(["serve", "--device", "tpu", "--adapter-root", str(tmp_path)]) == 2
    assert "invalid device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # refused before uvicorn starts or any model loads
        seen.clear()
        assert main(["serve", "--device", "cuda", "--adapter-root", str(tmp_path)]) == 2
        assert "'cuda' is not available" in capsys.readouterr().err and not seen
    assert Settings(device="cuda:1").device == "cuda:1" and Settings().device == "auto"


def test_serve_refuses_a_reward_init_that_is_not_one(monkeypatch, capsys, tmp_path):
    import uvicorn

    from metarlhf.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app))
    monkeypatch.setenv("METARLHF_API_KEYS", '{"sk-test-key-1": "acme"}')
    root = ["--adapter-root", str(tmp_path)]
    assert main(["serve", "--reward-init", str(tmp_path / "missing"), *root]) == 2
    assert "no reward init there" in capsys.readouterr().err and not seen
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "metarlhf.json").write_text('{"kind": "reward"}')
    assert main(["serve", "--reward-init", str(tmp_path / "user"), *root]) == 2
    assert "not a reward init" in capsys.readouterr().err and not seen
    assert main(["serve", "--reward-init", "scratch", *root]) == 0
    assert seen["app"].state.settings.reward_init == "scratch"


def test_lifespan_loads_the_policy_on_the_configured_device(monkeypatch, tmp_path):
    import metarlhf.engine
    import metarlhf.jobs

    seen = {}

    def fake_engine(model_dir=None, device="not passed", **kw):
        seen["engine"] = device
        return tiny_engine()

    class FakePersonalizer(TinyPersonalizer):
        def __init__(self, policy_dir=None, encoder_dir=None, reward_steps=None, policy_steps=None,
                     device="not passed", reward_init="not passed"):
            seen["personalizer"] = device
            seen["reward_init"] = reward_init
            super().__init__()

    import torch

    import metarlhf.runtime

    monkeypatch.setattr(metarlhf.engine.MultiAdapterEngine, "from_pretrained", staticmethod(fake_engine))
    monkeypatch.setattr(metarlhf.jobs, "DefaultPersonalizer", FakePersonalizer)
    resolved = []
    monkeypatch.setattr(metarlhf.runtime, "resolve_device",
                        lambda name: resolved.append(name) or torch.device("cuda", 3))  # as if a 4th GPU existed
    s = Settings(api_keys={KEY_A: "acme"}, adapter_root=str(tmp_path / "adapters"), device="cuda:3")
    with TestClient(create_app(s)) as c:
        assert c.get("/readyz").status_code == 200
    assert resolved == ["cuda:3"] and seen == {"engine": "cuda:3", "personalizer": "cuda:3", "reward_init": None}

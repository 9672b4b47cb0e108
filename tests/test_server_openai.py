"""The official ``openai`` client against a live uvicorn server (tiny models)."""

import pytest

openai = pytest.importorskip("openai", reason="the openai package is in the test extra: pip install openai")

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.testing import LiveServer, TinyPersonalizer, tiny_engine  # noqa: E402

KEY = "sk-openai-client-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Settings(api_keys={KEY: "acme"}, adapter_root=str(tmp_path_factory.mktemp("adapters")),
                 adapt_threshold=2, max_tokens_limit=32)
    app = create_app(s, engine=tiny_engine(), personalizer=TinyPersonalizer())
    with LiveServer(app) as url:
        yield url, app


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_completion_with_user(server):
    url, _ = server
    r = client(url).chat.completions.create(model="metarlhf", messages=[{"role": "user", "content": "Hi"}],
                                            user="alice", max_tokens=5, temperature=0, seed=1)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    assert r.model_extra["adapter"]["source"] == "base"


def test_streaming(server):
    url, _ = server
    c = client(url)
    kw = {"model": "metarlhf", "messages": [{"role": "user", "content": "Hi"}], "user": "alice", "max_tokens": 5,
          "temperature": 0}
    stream = c.chat.completions.create(stream=True, **kw)
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length")
    assert "".join(parts) == c.chat.completions.create(**kw).choices[0].message.content


def test_text_completions(server):
    url, _ = server
    r = client(url).completions.create(model="metarlhf", prompt="Once upon", max_tokens=4, user="bob")
    assert isinstance(r.choices[0].text, str)


def test_errors_become_openai_exceptions(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-not-a-valid-key").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}])
    # a request that fails validation is a 400, as OpenAI answers it (was a 422: UnprocessableEntityError)
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                            extra_body={"not_an_openai_field": 1})
    assert e.value.code == "invalid_request" and e.value.param == "not_an_openai_field"
    with pytest.raises(openai.BadRequestError, match="logit_bias is not supported"):
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                            logit_bias={"1": 5})


def test_what_langchain_sends_is_served(server):
    """LangChain's OpenAI (text) class sends prompt as a list and logit_bias as null."""
    url, _ = server
    r = client(url).completions.create(model="metarlhf", prompt=["Once upon", "Hello"], max_tokens=3,
                                       temperature=0, extra_body={"logit_bias": None, "best_of": 1})
    assert [c.index for c in r.choices] == [0, 1] and all(isinstance(c.text, str) for c in r.choices)


def test_feedback_then_personalised_completion(server):
    url, app = server
    import httpx

    c = client(url)
    h = {"Authorization": f"Bearer {KEY}"}
    for rating in ("up", "down"):
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me"}], user="zoe",
                                      max_tokens=4)
        fb = httpx.post(url + "/v1/feedback", json={"user_id": "zoe", "completion_id": r.id, "rating": rating},
                        headers=h)
        assert fb.status_code == 202
    assert app.state.runtime.runner.wait_idle(60)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me"}], user="zoe",
                                  max_tokens=4)
    assert r.model_extra["adapter"] == {"source": "own", "user_id": "zoe", "version": 1}


def test_models_and_content_parts(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == ["metarlhf"]
    assert c.models.retrieve("metarlhf").owned_by == "metarlhf"
    kw = {"model": "metarlhf", "max_tokens": 4, "temperature": 0}
    parts = c.chat.completions.create(messages=[{"role": "developer", "content": "Be brief."},
                                                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], **kw)
    plain = c.chat.completions.create(messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi"}], **kw)
    assert parts.choices[0].message.content == plain.choices[0].message.content

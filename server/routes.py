"""HTTP routes. Thin: validate (schemas), authenticate (tenant), call the Runtime."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from metarlhf.engine import GenerationRequest, SamplingParams
from metarlhf.errors import ConfigError, MetaRLHFError, NotFoundError
from metarlhf.store import check_id
from server.batcher import Overloaded
from server.errors import ApiError, error_body, status_of, typed
from server.runtime import Runtime, choice_id
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    GenerationFields,
    RollbackRequest,
)
from server.settings import Settings, get_settings

log = logging.getLogger(__name__)
router = APIRouter()
SEED_RANGE = 2**63  # the engine's seeds are ints in [0, 2**63)
bearer = HTTPBearer(auto_error=False, description="API key; each key belongs to one tenant")


async def get_runtime(request: Request) -> Runtime:
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise ApiError(503, "not_ready", "the server is still loading its models")
    return rt


async def get_tenant(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                     settings: Annotated[Settings, Depends(get_settings)]) -> str:
    if creds is None or creds.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})
    tenant = settings.api_keys.get(creds.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
    return tenant


def user_path(user_id: str) -> str:
    try:
        return check_id(user_id)
    except ConfigError as e:
        raise ApiError(422, "invalid_request", str(e)) from e


Tenant = Annotated[str, Depends(get_tenant)]
RT = Annotated[Runtime, Depends(get_runtime)]
UserId = Annotated[str, Depends(user_path)]


# ------------------------------------------------------------------------------ operations
@router.get("/healthz", tags=["ops"])
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
def readyz(request: Request) -> JSONResponse:
    ready = bool(getattr(request.app.state, "ready", False))
    return JSONResponse({"status": "ready" if ready else "loading"}, status_code=200 if ready else 503)


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
def metrics(rt: RT, tenant: Tenant) -> PlainTextResponse:
    return PlainTextResponse(rt.metrics.render(), media_type="text/plain; version=0.0.4")


# ------------------------------------------------------------------------------ completions
def sampling(body: GenerationFields, settings: Settings) -> tuple[SamplingParams, int]:
    """SamplingParams from OpenAI fields; invalid values raise ConfigError (400)."""
    n_tok = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if n_tok is None:  # a smaller limit also caps the default, which the client never sent
        n_tok = min(settings.default_max_tokens, settings.max_tokens_limit)
    if not 1 <= n_tok <= settings.max_tokens_limit:
        raise ConfigError(f"max_tokens must be in [1, {settings.max_tokens_limit}], got {n_tok}")
    if not 1 <= body.n <= settings.max_n:
        raise ConfigError(f"n must be in [1, {settings.max_n}], got {body.n}")
    if body.stream and body.n != 1:
        raise ConfigError("stream=true supports n=1 only")
    n_prompts = len(body.prompts()) if isinstance(body, CompletionRequest) else 1
    if body.stream and n_prompts != 1:
        raise ConfigError(f"stream=true supports one prompt only, got {n_prompts}")
    if n_prompts > settings.max_prompts:
        raise ConfigError(f"a request takes at most {settings.max_prompts} prompts, got {n_prompts}")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    stop = body.stop if body.stop is not None else []
    return SamplingParams(max_new_tokens=n_tok, temperature=temperature, top_p=top_p, stop=stop,
                          seed=engine_seed(body.seed)), body.n


def engine_seed(seed: int | None, offset: int = 0) -> int | None:
    """An OpenAI seed (any int64) plus a choice offset, mapped into the engine's [0, 2**63)."""
    return None if seed is None else (seed + offset) % SEED_RANGE


def requests_for(body: GenerationFields, settings: Settings, chat: bool) -> list[GenerationRequest]:
    """One request per choice, in choice order: prompt i's j-th choice is number i * n + j
    (as OpenAI numbers a list of prompts); choice c samples with ``seed + c``."""
    params, n = sampling(body, settings)
    msgs = None
    if chat:
        msgs = [{"role": m.engine_role(), "content": m.text()} for m in body.messages]  # type: ignore[attr-defined]
    prompts = [None] if chat else body.prompts()  # type: ignore[attr-defined]
    out = []
    for c in range(len(prompts) * n):
        p = params if c == 0 or params.seed is None else SamplingParams(
            params.max_new_tokens, params.temperature, params.top_p, params.stop, engine_seed(body.seed, c))
        if msgs is not None:
            out.append(GenerationRequest(messages=[dict(m) for m in msgs], params=p))
        else:
            out.append(GenerationRequest(prompt=prompts[c // n], params=p))
    return out


def feedback_prompt(body: GenerationFields, chat: bool, choice: int = 0) -> str:
    """The prompt that choice ``choice`` answers, as stored for feedback."""
    if not chat:
        return body.prompts()[choice // body.n]  # type: ignore[attr-defined]
    users = [m.text() for m in body.messages if m.role == "user"]  # type: ignore[attr-defined]
    return users[-1] if users else body.messages[-1].text()  # type: ignore[attr-defined]


def fingerprint(info: dict) -> str:
    """``system_fingerprint``: which adapter source and version served (e.g. ``user-v3``)."""
    return f"{info['source']}-v{info.get('version') or info.get('neighbor_version') or 0}"


def _generation_error(e: BaseException) -> ApiError:
    """A non-domain generation failure (an engine bug): logged, answered as a typed 500."""
    log.error("generation failed: %s", type(e).__name__, exc_info=e)
    return typed(e)


async def _complete(body: GenerationFields, rt: Runtime, tenant: str, settings: Settings, chat: bool) -> Any:
    reqs = requests_for(body, settings, chat)
    cid = rt.new_completion_id("chatcmpl" if chat else "cmpl")
    model = body.model or settings.model_name
    epoch = rt.erasure_epoch(tenant, body.user) if body.user is not None else 0
    if body.stream:
        return await _stream(body, reqs[0], rt, tenant, cid, model, chat, epoch)
    try:
        results, info, neighbor_epoch = await rt.generate(tenant, body.user, reqs)
    except Overloaded as e:
        raise ApiError(429, "overloaded", str(e), {"Retry-After": "1"}) from e
    except (MetaRLHFError, ApiError):
        raise
    except Exception as e:
        raise _generation_error(e) from e
    if body.user is not None:  # every choice, so that feedback can name the one the user saw
        rows = [(choice_id(cid, i), feedback_prompt(body, chat, i), r.text) for i, r in enumerate(results)]
        await run_in_threadpool(rt.record_completions, tenant, body.user, rows, info, epoch, neighbor_epoch)
    rt.metrics.inc("generated_tokens_total", "completion tokens generated",
                   sum(r.completion_tokens for r in results))
    created = int(time.time())
    prompt_tokens = sum(r.prompt_tokens for r in results[::body.n])  # each prompt once, however many choices
    completion_tokens = sum(r.completion_tokens for r in results)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    fp = fingerprint(info)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": None} for i, r in enumerate(results)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(results)]
        obj = "text_completion"
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage,
            "system_fingerprint": fp, "adapter": info}


async def _stream(body: GenerationFields, req: GenerationRequest, rt: Runtime, tenant: str, cid: str, model: str,
                  chat: bool, epoch: int) -> StreamingResponse:
    """SSE stream. The request joins the dynamic batch like any other row; the engine
    hands each new piece of text to ``req.on_text``, which feeds this response.

    The response starts only once the first text (or the end) is there, so a bad
    request, a full queue or a broken adapter still gets a proper HTTP error status."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str] = asyncio.Queue()
    req.on_text = lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
    req.cancel = threading.Event()  # set when the client goes: the row leaves the batch
    _, info = await rt.aserving_adapter(tenant, body.user)
    task = asyncio.ensure_future(rt.generate(tenant, body.user, [req]))
    first = asyncio.ensure_future(deltas.get())
    await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
    if task.done() and task.exception() is not None:
        e = task.exception()
        if isinstance(e, Overloaded):
            raise ApiError(429, "overloaded", str(e), {"Retry-After": "1"}) from e
        if isinstance(e, MetaRLHFError | ApiError):
            raise e
        raise _generation_error(e) from e
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": model,
                                      "choices": [choice], "system_fingerprint": fingerprint(info),
                                      "adapter": info}) + "\n\n"

    async def events() -> AsyncIterator[str]:
        nonlocal info
        try:
            yield chunk(None, None, first=True)
            if first.done() and not first.cancelled():
                yield chunk(first.result(), None)
            while not task.done():
                get = asyncio.ensure_future(deltas.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield chunk(get.result(), None)
                else:
                    get.cancel()
            while not deltas.empty():  # text pushed before the batch resolved
                yield chunk(deltas.get_nowait(), None)
            try:
                results, info, neighbor_epoch = task.result()
                result = results[0]
                if body.user is not None:
                    await run_in_threadpool(rt.record_completions, tenant, body.user,
                                            [(cid, feedback_prompt(body, chat), result.text)], info, epoch,
                                            neighbor_epoch)
            except Exception as e:  # noqa: BLE001 - the response has started: end it with a typed error event
                if not isinstance(e, MetaRLHFError | ApiError):
                    log.error("stream %s failed: %s", cid, type(e).__name__, exc_info=e)
                err = typed(e)
                yield "data: " + json.dumps(error_body(err.type, err.message)) + "\n\n"
                return
            yield chunk(None, result.finish_reason)
            if include_usage:
                usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                         "total_tokens": result.prompt_tokens + result.completion_tokens}
                yield "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": model,
                                             "choices": [], "usage": usage}) + "\n\n"
            rt.metrics.inc("generated_tokens_total", "completion tokens generated", result.completion_tokens)
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # client went away: the engine drops the row at its next step
                req.cancel.set()
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Completion-Id": cid})


@router.post("/v1/chat/completions", tags=["completions"])
async def chat_completions(body: ChatCompletionRequest, rt: RT, tenant: Tenant,
                           settings: Annotated[Settings, Depends(get_settings)]) -> Any:
    return await _complete(body, rt, tenant, settings, chat=True)


@router.post("/v1/completions", tags=["completions"])
async def completions(body: CompletionRequest, rt: RT, tenant: Tenant,
                      settings: Annotated[Settings, Depends(get_settings)]) -> Any:
    return await _complete(body, rt, tenant, settings, chat=False)


# ------------------------------------------------------------------------------ models
def _model_card(rt: Runtime, settings: Settings) -> dict:
    return {"id": settings.model_name, "object": "model", "created": int(rt.started_at), "owned_by": "metarlhf"}


@router.get("/v1/models", tags=["models"])
async def list_models(rt: RT, tenant: Tenant, settings: Annotated[Settings, Depends(get_settings)]) -> dict:
    """The served model, in OpenAI's shape (every user's adapter is selected by ``user``)."""
    return {"object": "list", "data": [_model_card(rt, settings)]}


@router.get("/v1/models/{model_id:path}", tags=["models"])
async def get_model(model_id: str, rt: RT, tenant: Tenant,
                    settings: Annotated[Settings, Depends(get_settings)]) -> dict:
    if model_id != settings.model_name:
        raise NotFoundError(f"model {model_id!r} not found; this server serves {settings.model_name!r}")
    return _model_card(rt, settings)


# ------------------------------------------------------------------------------ feedback
@router.post("/v1/feedback", status_code=202, tags=["feedback"])
async def feedback(body: FeedbackRequest, rt: RT, tenant: Tenant, response: Response,
                   idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict:
    """Store one feedback item durably (answered only after the commit is fsynced)."""
    fid, created = await rt.aadd_feedback(tenant, body.model_dump(exclude_none=True), idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return {"id": fid, "object": "feedback", "user_id": body.user_id, "replayed": not created,
            "job": rt.runner.inflight(tenant, body.user_id)}


# ------------------------------------------------------------------------------ users & jobs
@router.get("/v1/users/{user_id}", tags=["users"])
def get_user(user_id: UserId, rt: RT, tenant: Tenant) -> dict:
    return rt.user_info(tenant, user_id)


@router.post("/v1/users/{user_id}/adapt", status_code=202, tags=["users"])
def adapt_now(user_id: UserId, rt: RT, tenant: Tenant) -> dict:
    rt.require_user(tenant, user_id)
    return {"object": "job", **rt.runner.enqueue(tenant, user_id, reason="manual")}


@router.post("/v1/users/{user_id}/rollback", tags=["users"])
def rollback(user_id: UserId, body: RollbackRequest, rt: RT, tenant: Tenant) -> dict:
    """Serve an earlier version again (default: the one before the current)."""
    return {"user_id": user_id, "current": rt.rollback(tenant, user_id, body.kind, body.version)}


@router.delete("/v1/users/{user_id}", status_code=204, tags=["users"])
def delete_user(user_id: UserId, rt: RT, tenant: Tenant) -> Response:
    """Right to erasure: the user's feedback, completions, jobs and adapters."""
    rt.delete_user(tenant, user_id)
    return Response(status_code=204)


@router.get("/v1/users/{user_id}/neighbors", tags=["users"])
def neighbors(user_id: UserId, rt: RT, tenant: Tenant,
              k: Annotated[int, Query(ge=1, le=100)] = 5) -> dict:
    rt.require_user(tenant, user_id)
    return {"user_id": user_id, "neighbors": rt.neighbors(tenant, user_id, k)}


@router.get("/v1/jobs/{job_id}", tags=["users"])
def get_job(job_id: str, rt: RT, tenant: Tenant) -> dict:
    return {"object": "job", **rt.feedback.get_job(tenant, job_id)}


__all__ = ["router", "status_of"]

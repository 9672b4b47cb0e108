"""The FastAPI application: ``create_app(settings)``.

The lifespan builds one :class:`~server.runtime.Runtime` (loading the policy into a
:class:`~metarlhf.engine.MultiAdapterEngine` and the adaptation models once) unless
the caller injects ``engine``/``personalizer`` (tests: tiny random models).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server import errors
from server.errors import error_body
from server.settings import Settings, get_settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.limit:
            return await self._reject(send)
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        # Without a trustworthy Content-Length (chunked upload): read the body up to the
        # limit before the app sees it, then replay it.
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send)
            more = msg.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)

    async def _reject(self, send: Send) -> None:
        import json

        body = json.dumps(error_body("request_too_large", f"request body is over {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Observe:
    """Count requests and time them, labelled by route template (pure ASGI, cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            rt = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
            if rt is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                rt.metrics.inc("requests_total", "HTTP requests", route=route, method=scope["method"],
                               status=str(status))
                rt.metrics.observe("request_seconds", "HTTP request latency (whole response, streams included)",
                                   time.perf_counter() - t0, route=route)


def _replay(messages: list[dict], then: Receive | None = None) -> Receive:
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def create_app(settings: Settings | None = None, *, engine: Any = None, personalizer: Any = None) -> FastAPI:
    """Build the app. ``engine``/``personalizer`` default to the real models, loaded in the lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from server.runtime import Runtime

        eng, pers = engine, personalizer
        if eng is None or pers is None:
            from metarlhf.runtime import resolve_device

            device = str(resolve_device(settings.device))  # an absent CUDA device stops the start-up here
            log.info("policy device: %s", device)
        if eng is None:
            from metarlhf.engine import MultiAdapterEngine

            log.info("loading the policy into the multi-adapter engine ...")
            kw: dict[str, Any] = {"capacity": settings.engine_capacity, "backend": settings.engine_backend}
            if settings.max_context:
                kw["max_context"] = settings.max_context
            eng = MultiAdapterEngine.from_pretrained(settings.policy_dir, device=device, **kw)
        if pers is None:
            from metarlhf.jobs import DefaultPersonalizer

            log.info("loading the adaptation models (reward encoder, policy copy) ...")
            pers = DefaultPersonalizer(settings.policy_dir, settings.encoder_dir,
                                       reward_steps=settings.adapt_reward_steps,
                                       policy_steps=settings.adapt_policy_steps, device=device,
                                       reward_init=settings.reward_init)
        rt = Runtime(settings, eng, pers)
        rt.start()
        app.state.runtime = rt
        app.state.ready = True
        log.info("metarlhf server ready")
        try:
            yield
        finally:
            app.state.ready = False
            rt.close()

    app = FastAPI(title="metarlhf", version="0.1.0", lifespan=lifespan,
                  description="Per-user LoRA personalization with an OpenAI-compatible API.")
    app.state.settings = settings
    app.state.ready = False

    async def app_settings() -> Settings:  # async: FastAPI would run a plain def in the thread pool
        return settings

    app.dependency_overrides[get_settings] = app_settings
    errors.install(app)

    from server import routes

    app.include_router(routes.router)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Observe)
    return app

"""Dynamic batching of generation requests from many users onto one engine.

Requests from any number of concurrent HTTP handlers are put on a bounded queue. One
worker thread takes the first waiting request, keeps collecting for up to
``wait_s`` (or until ``max_batch`` rows), and runs them as one
``engine.generate(batch)`` call: rows of different users, each with its own adapter,
decode together. Results resolve the callers' asyncio futures. Streamed requests are
ordinary rows whose ``on_text`` callback receives the text as it is decoded.

Isolation: if ``engine.generate`` raises for a batch of several rows, each row is run
again alone, so only the faulty row gets an error (its own). A streamed row that has
already sent text is not run again (its client would see the text twice): it gets the
batch's error.

Admission is bounded: ``limit`` rows may be queued or running (work outside the
queue can hold slots through :meth:`Batcher.reserve`). Past the limit :class:`Overloaded` is raised and the
server answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from metarlhf.errors import MetaRLHFError

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full."""


class Batcher:
    def __init__(self, engine: Any, max_batch: int = 16, wait_s: float = 0.008, limit: int = 64,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.limit = limit
        self.on_batch = on_batch
        self._q: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.batches = 0
        self.rows = 0

    @property
    def depth(self) -> int:
        """Rows admitted and not finished (queued + running + reserved)."""
        return self._pending

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _admit(self, k: int) -> None:
        with self._lock:
            if self._pending + k > self.limit:
                raise Overloaded(f"generation queue is full ({self._pending} of {self.limit} slots in use)")
            self._pending += k

    def _done(self, k: int) -> None:
        with self._lock:
            self._pending -= k

    @contextmanager
    def reserve(self, k: int = 1) -> Any:
        """Hold ``k`` admission slots (for work that bypasses the queue)."""
        self._admit(k)
        try:
            yield
        finally:
            self._done(k)

    async def submit_many(self, requests: list[Any]) -> list[Any]:
        """Queue all requests (admitted together or not at all) and await their results."""
        if self._stopped:  # no worker will take them
            raise Overloaded("the server is shutting down")
        self._admit(len(requests))
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in requests]
        for req, fut in zip(requests, futs, strict=True):
            self._q.put((req, fut, loop))
        try:
            return list(await asyncio.gather(*futs))
        finally:
            pass  # slots are released by the worker when each row finishes

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.wait_s
            stop = False
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    nxt = self._q.get(timeout=max(timeout, 0)) if timeout > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[Any, Any, Any]]) -> None:
        """One batch: every row's future gets its result or an exception, and its slot back,
        whatever fails here (a metrics hook, a short result list, a closed event loop): the
        worker thread must outlive it, or every later caller would wait forever."""
        results: list[Any]
        try:
            t0 = time.perf_counter()
            results = self._generate([req for req, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(batch)} rows")
            self.batches += 1
            self.rows += len(batch)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), time.perf_counter() - t0)
                except Exception:  # noqa: BLE001 - metrics must not fail generations
                    log.exception("batcher: on_batch hook failed")
        except BaseException as e:  # noqa: BLE001 - handed to every row of the batch
            results = [e] * len(batch)
        finally:
            self._done(len(batch))
        for (_, fut, loop), res in zip(batch, results, strict=True):
            try:
                loop.call_soon_threadsafe(_resolve, fut, res)
            except RuntimeError:  # the caller's event loop is closed: nobody waits for this row
                pass


    def _generate(self, reqs: list[Any]) -> list[Any]:
        """Results (or per-row exceptions) of one batch; a failing batch of several rows is
        split into single rows so that one bad row cannot fail the others."""
        streamed = _Streamed(reqs)
        try:
            return list(self.engine.generate(reqs))
        except Exception as e:  # noqa: BLE001 - isolate the faulty row below
            if len(reqs) == 1:
                _log_row_error(e)
                return [e]
            log.warning("engine.generate failed for a batch of %d (%s: %s); running its rows one by one",
                        len(reqs), type(e).__name__, e)
            batch_error = e
        finally:
            streamed.restore()
        results: list[Any] = []
        for i, req in enumerate(reqs):
            if i in streamed.sent:
                results.append(batch_error)
                continue
            try:
                results.append(self.engine.generate([req])[0])
            except Exception as e:  # noqa: BLE001 - this row's own error, for its caller only
                _log_row_error(e)
                results.append(e)
        return results


def _log_row_error(e: Exception) -> None:
    """A domain error (bad request) is a warning; anything else is a bug: with traceback."""
    if isinstance(e, MetaRLHFError):
        log.warning("engine.generate refused a row: %s", e)
    else:
        log.error("engine.generate failed for a row", exc_info=e)


class _Streamed:
    """Notes which rows of a batch have sent text to their client (wraps ``on_text``)."""

    def __init__(self, reqs: list[Any]) -> None:
        self.sent: set[int] = set()
        self._orig: list[tuple[Any, Any]] = []
        for i, req in enumerate(reqs):
            cb = getattr(req, "on_text", None)
            if cb is not None:
                self._orig.append((req, cb))
                req.on_text = self._wrap(i, cb)

    def _wrap(self, i: int, cb: Callable[[str], None]) -> Callable[[str], None]:
        def on_text(delta: str) -> None:
            self.sent.add(i)
            cb(delta)

        return on_text

    def restore(self) -> None:
        for req, cb in self._orig:
            req.on_text = cb


def _resolve(fut: asyncio.Future, res: Any) -> None:
    if fut.done():
        return
    if isinstance(res, BaseException):
        fut.set_exception(res)
    else:
        fut.set_result(res)

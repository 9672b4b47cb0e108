"""Everything the routes use, wired together once per process.

:class:`Runtime` owns the serving engine, the dynamic batcher, the feedback store, the
adapter store, the preference index and the background adaptation runner. Routes
stay thin and call its methods; nothing here imports torch directly.

Which adapter serves a user (:meth:`Runtime.serving_adapter`):

1. the user's own ``CURRENT`` policy version, if it verifies (sha256, base, rank);
   a corrupted version is logged and skipped, falling back to older versions;
2. cold start: a user with some feedback but no adapter yet is served with the
   nearest user's adapter (faiss over preference embeddings, same tenant);
3. otherwise the base model.

Engine adapter keys are ``"<tenant>/<user>"`` with the store's version number, so a
new version is a new cache key and stale weights are never served.

The decision is cached per user. Every event that can change it (a new version, feedback,
rollback, erasure, a changed neighbour index) bumps a generation under the lock, and a
decision computed while its generation moved is not cached, so a racing request cannot
pin an old version. A new version of any user expires the cold-start (``base`` and
``neighbor``) decisions of that tenant: the index gained or moved a neighbour. Computing a
decision reads files (sha256) and may embed feedback, so the event loop hands it to a
thread (:meth:`Runtime.aserving_adapter`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from metarlhf.engine import AdapterRef, GenerationRequest, GenerationResult
from metarlhf.errors import AdapterError, DataError, NotFoundError
from metarlhf.feedback_store import FeedbackInput, SQLiteFeedbackStore, body_sha256, open_feedback_store
from metarlhf.jobs import AdaptationRunner, Personalizer, user_preference
from metarlhf.retrieval import PreferenceIndex
from metarlhf.store import AdapterStore
from server.batcher import Batcher
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)


def engine_key(tenant: str, user: str) -> str:
    return f"{tenant}/{user}"


def choice_id(completion_id: str, index: int) -> str:
    """The stored id of choice ``index`` of a response: the response's own id for choice 0
    (what a client of an n=1 request rates), ``<id>.<index>`` for the others."""
    return completion_id if index == 0 else f"{completion_id}.{index}"


class Runtime:
    def __init__(self, settings: Settings, engine: Any, personalizer: Personalizer) -> None:
        self.settings = settings
        self.engine = engine
        self.personalizer = personalizer
        self.metrics = Metrics()
        self.started_at = time.time()
        self.store = AdapterStore(settings.adapter_root, keep=settings.adapter_keep)
        self.feedback: SQLiteFeedbackStore = open_feedback_store(  # type: ignore[assignment]
            settings.feedback_location, synchronous=settings.sqlite_synchronous)
        n = self.feedback.fail_unfinished_jobs()
        if n:
            log.warning("%d adaptation job(s) were interrupted by a restart; marked failed", n)
        self.index = PreferenceIndex.load(settings.index_location, personalizer.embed_dim)
        self.runner = AdaptationRunner(
            self.feedback, self.store, personalizer, self.index, threshold=settings.adapt_threshold,
            workers=settings.adapt_workers, max_records=settings.adapt_max_records,
            neighbor_init_below=settings.neighbor_init_below, validate_policy=self._validate_policy,
            on_new_version=self._on_new_version, on_discard=self._on_discard)
        self.batcher = Batcher(engine, settings.max_batch, settings.batch_wait_ms / 1000, settings.queue_limit,
                               on_batch=self._on_batch)
        self._serving: dict[tuple[str, str], tuple[AdapterRef | None, dict[str, Any]]] = {}
        # generations of the cached decisions (see the module docstring); guarded by _lock
        self._epoch = 0
        self._tenant_gen: defaultdict[str, int] = defaultdict(int)
        self._user_gen: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._bad: set[tuple[str, int]] = set()  # (engine key, version) known corrupted
        self._pref_cache: dict[tuple[str, str], tuple[int, Any]] = {}
        self._changed: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._install_gauges()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()
        threading.Thread(target=self._rebuild_index, name="index-rebuild", daemon=True).start()

    def close(self) -> None:
        self.batcher.stop()
        self.runner.close()
        try:
            self.index.save()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.exception("could not save the preference index")
        self.feedback.close()

    def _rebuild_index(self) -> None:
        """Add users that have an adapter but no vector (e.g. the index file was lost), and
        drop vectors of users that have neither feedback nor adapters (an erasure cut short
        after the index was saved, or an index file older than an erasure)."""
        stale = [(t, u) for t, u in self.index.keys() if not self.user_known(t, u)]
        for t, u in stale:
            self.index.remove(t, u)
        added = 0
        for tenant, user in self.store.users():
            if self.index.get(tenant, user) is not None or self.store.current(tenant, user, "policy") is None:
                continue
            records = self.feedback.records(tenant, user, limit=self.settings.adapt_max_records)
            try:
                self.index.upsert(tenant, user, user_preference(self.personalizer, records))
                added += 1
            except DataError:
                continue
        if added or stale:
            self.index.save()
            self._expire_all()  # cold-start decisions made meanwhile may have missed a neighbour
        if added:
            log.info("preference index: rebuilt %d user vector(s) from stored feedback", added)
        if stale:
            log.warning("preference index: dropped %d vector(s) of users with no feedback or adapters", len(stale))

    def _install_gauges(self) -> None:
        m = self.metrics
        m.gauge("queue_depth", "generation rows queued or running", lambda: self.batcher.depth)
        m.gauge("adaptation_queue_depth", "adaptation jobs queued or running", lambda: self.runner.queue_depth)
        m.gauge("adapter_cache_hits", "engine adapter cache hits", lambda: self.engine.stats.get("hits", 0))
        m.gauge("adapter_cache_misses", "engine adapter cache misses", lambda: self.engine.stats.get("misses", 0))
        m.gauge("adapter_cache_resident", "adapters resident in the engine", lambda: self.engine.stats.get("resident", 0))
        m.gauge("adaptations_succeeded", "adaptation jobs that succeeded", lambda: self.runner.stats["succeeded"])
        m.gauge("adaptations_failed", "adaptation jobs that failed", lambda: self.runner.stats["failed"])
        m.gauge("indexed_users", "users in the preference index", lambda: len(self.index))

    def _on_batch(self, rows: int, seconds: float) -> None:
        self.metrics.observe("batch_seconds", "engine.generate time per batch", seconds)
        self.metrics.inc("batch_rows_total", "rows generated through the batcher", rows)

    # -- adapters ------------------------------------------------------------------------
    def _validate_policy(self, tenant: str, user: str, version: int, path: Path) -> None:
        """Before a new version goes live: the serving engine must accept it."""
        self.engine.preload(AdapterRef(engine_key(tenant, user), version, str(path)))

    def _on_new_version(self, tenant: str, user: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._expire_user(tenant, user)
            # this version just passed validation, so it is not bad: a number marked bad before an
            # erasure (a request still queued when the files went) is reused by the returning user
            self._bad.discard((engine_key(tenant, user), result["policy_version"]))
            # the user's vector and version changed: cold-start users of the tenant may now
            # have (or have a newer) neighbour
            self._tenant_gen[tenant] += 1
            for key in [k for k, (_, info) in self._serving.items() if k[0] == tenant and info["source"] != "own"]:
                del self._serving[key]
            self._changed[(tenant, user)] = time.time()
        self.metrics.inc("adaptations_total", "adaptation jobs finished", state="succeeded")

    def _on_discard(self, tenant: str, user: str) -> None:
        """A job's validated (so engine-loaded) version was discarded: its number will be
        reused after the erasure, so its weights must not stay resident."""
        self.engine.evict(engine_key(tenant, user))

    def _expire_user(self, tenant: str, user: str) -> None:
        """Drop the user's cached decision (call with _lock held)."""
        self._user_gen[(tenant, user)] += 1
        self._serving.pop((tenant, user), None)

    def _expire_all(self) -> None:
        with self._lock:
            self._epoch += 1
            self._serving.clear()

    def _generation(self, tenant: str, user: str) -> tuple[int, int, int]:
        """The generation a decision for the user is computed at (call with _lock held)."""
        return self._epoch, self._tenant_gen[tenant], self._user_gen[(tenant, user)]

    def invalidate(self, tenant: str, user: str) -> None:
        with self._lock:
            self._expire_user(tenant, user)
            self._pref_cache.pop((tenant, user), None)

    def own_adapter(self, tenant: str, user: str) -> tuple[AdapterRef, int] | None:
        key = engine_key(tenant, user)
        cur = self.store.current(tenant, user, "policy")
        if cur is None:
            return None
        for v in [cur] + [v for v in reversed(self.store.versions(tenant, user, "policy")) if v < cur]:
            if (key, v) in self._bad:
                continue
            path = self.store.path(tenant, user, "policy", v)
            try:
                self.store.verify(path, "policy", expect_base=self.engine.base_name, expect_rank=self.engine.rank)
            except AdapterError as e:
                log.error("user %s: policy adapter v%d is unusable, falling back: %s", key, v, e)
                self._bad.add((key, v))
                continue
            return AdapterRef(key, v, str(path)), cur
        return None

    def preference(self, tenant: str, user: str) -> Any | None:
        """The user's preference vector from their feedback (cached per feedback count)."""
        seq = self.feedback.max_seq(tenant, user)
        if seq == 0:
            return None
        hit = self._pref_cache.get((tenant, user))
        if hit is not None and hit[0] == seq:
            return hit[1]
        try:
            vec = user_preference(self.personalizer, self.feedback.records(tenant, user, limit=64))
        except DataError:
            vec = None
        self._pref_cache[(tenant, user)] = (seq, vec)
        return vec

    def neighbors(self, tenant: str, user: str, k: int) -> list[dict[str, Any]]:
        vec = self.index.get(tenant, user)
        if vec is None:
            vec = self.preference(tenant, user)
        if vec is None:
            return []
        out = []
        for other, score in self.index.search(tenant, vec, k=k, exclude=user):
            out.append({"user_id": other, "similarity": round(score, 6),
                        "policy_version": self.store.current(tenant, other, "policy")})
        return out

    def serving_adapter(self, tenant: str, user: str | None) -> tuple[AdapterRef | None, dict[str, Any]]:
        """``(engine adapter or None = base, description)`` for a request by ``user``."""
        if user is None:
            return None, {"source": "base", "user_id": None, "version": None}
        with self._lock:
            hit = self._serving.get((tenant, user))
            gen = self._generation(tenant, user)
        if hit is not None:
            return hit
        own = self.own_adapter(tenant, user)
        if own is not None:
            ref, cur = own
            out = (ref, {"source": "own", "user_id": user, "version": ref.version,
                         **({"fallback_from": cur} if ref.version != cur else {})})
        else:
            out = (None, {"source": "base", "user_id": user, "version": None})
            vec = self.preference(tenant, user)
            if vec is not None:
                for other, score in self.index.search(tenant, vec, k=self.settings.neighbors_k, exclude=user):
                    nb = self.own_adapter(tenant, other)
                    if nb is not None:
                        out = (nb[0], {"source": "neighbor", "user_id": user, "version": None,
                                       "neighbor": other, "neighbor_version": nb[0].version,
                                       "similarity": round(score, 6)})
                        break
        with self._lock:
            if self._generation(tenant, user) == gen:  # else something changed meanwhile: recompute next time
                self._serving[(tenant, user)] = out
        return out

    async def aserving_adapter(self, tenant: str, user: str | None) -> tuple[AdapterRef | None, dict[str, Any]]:
        """:meth:`serving_adapter` for the event loop: a cached decision at once, else
        computed in the thread pool (it reads and hashes files, and may embed feedback)."""
        if user is None:
            return self.serving_adapter(tenant, None)
        with self._lock:
            hit = self._serving.get((tenant, user))
        if hit is not None:
            return hit
        return await run_in_threadpool(self.serving_adapter, tenant, user)

    # -- generation ----------------------------------------------------------------------
    async def generate(self, tenant: str, user: str | None, reqs: list[GenerationRequest]) -> tuple[
            list[GenerationResult], dict[str, Any], int | None]:
        """Generate through the batcher with the user's adapter; a corrupted adapter is
        marked bad and the request retried once with the fallback. Returns the results, the
        adapter's description and, when a neighbour's adapter served, that neighbour's
        erasure epoch read just after it was chosen (for :meth:`record_completions`; else
        None). A neighbour erased completely between its choice and that read (a cached
        decision, say) cannot serve: its erasure removes its files and evicts its weights
        before the epoch turns even, so the load fails and the request falls back."""
        for attempt in range(3):
            ref, info = await self.aserving_adapter(tenant, user)
            neighbor = info.get("neighbor")
            neighbor_epoch = None if neighbor is None else self.erasure_epoch(tenant, neighbor)
            for r in reqs:
                r.adapter = ref
            results = await self.batcher.submit_many(reqs)
            bad = [r.error for r in results if isinstance(r.error, AdapterError)]
            if not bad or ref is None or attempt == 2:
                break
            log.error("user %s/%s: adapter v%d failed to load, falling back: %s", tenant, user, ref.version, bad[0])
            self._bad.add((ref.user, ref.version))
            self._expire_all()  # neighbours may have pointed at it too
        for r in results:
            if r.error is not None:
                raise r.error
        return results, info, neighbor_epoch

    def erasure_epoch(self, tenant: str, user: str) -> int:
        """Read before a generation whose completions :meth:`record_completions` stores."""
        return self.runner.erasure_epoch(tenant, user)

    def record_completions(self, tenant: str, user: str, rows: list[tuple[str, str, str]], info: dict[str, Any],
                           epoch: int, neighbor_epoch: int | None) -> bool:
        """Store served completions (``(completion_id, prompt, text)``) so that feedback can
        name them, unless the user was erased since ``epoch`` (:meth:`erasure_epoch`, read
        before generating) or is being erased: then what was written is removed again, and
        False returned. Written first and checked after, so an erasure that begins in
        between removes the rows itself. Likewise for the neighbour whose adapter served
        (``info["neighbor"]``; ``neighbor_epoch`` from :meth:`generate`, None when no
        neighbour served): if it was erased meanwhile, its id is removed from these rows
        again (its erasure did so for the rows already there)."""
        ids = [cid for cid, _, _ in rows]
        for cid, prompt, text in rows:
            self.feedback.add_completion(tenant, user, cid, prompt, text, info)
        now = self.erasure_epoch(tenant, user)
        if now != epoch or now % 2:
            self.feedback.delete_completions(tenant, user, ids)
            log.info("user %s/%s was erased while a generation ran: its completions are not kept", tenant, user)
            return False
        neighbor = info.get("neighbor")
        if neighbor is not None:
            now = self.erasure_epoch(tenant, neighbor)
            if neighbor_epoch is None or now != neighbor_epoch or now % 2:
                self.feedback.forget_neighbor(tenant, neighbor, user, ids)
                log.info("neighbour %s/%s was erased while a generation with its adapter ran: its id is not kept",
                         tenant, neighbor)
        return True

    # -- feedback ------------------------------------------------------------------------
    def _feedback_item(self, tenant: str, body: dict[str, Any]) -> FeedbackInput:
        user, cid = body["user_id"], body.get("completion_id")
        if cid is not None and body.get("chosen_index") is not None:  # A over B among one response's choices
            a = self.feedback.get_completion(tenant, user, choice_id(cid, body["chosen_index"]))
            b = self.feedback.get_completion(tenant, user, choice_id(cid, body["rejected_index"]))
            return FeedbackInput("pair", a["prompt"], chosen=a["completion"], rejected=b["completion"],
                                 completion_id=cid)
        if cid is not None:
            ref = choice_id(cid, body.get("choice_index") or 0)
            c = self.feedback.get_completion(tenant, user, ref)
            return FeedbackInput("thumbs", c["prompt"], completion=c["completion"],
                                 label=1 if body["rating"] == "up" else 0, completion_id=ref)
        if body.get("rating") is not None:
            return FeedbackInput("thumbs", body["prompt"], completion=body["completion"],
                                 label=1 if body["rating"] == "up" else 0)
        return FeedbackInput("pair", body["prompt"], chosen=body["chosen"], rejected=body["rejected"])

    def _after_feedback(self, tenant: str, user: str, kind: str) -> None:
        self.metrics.inc("feedback_total", "feedback records stored", kind=kind)
        with self._lock:
            self._expire_user(tenant, user)  # cold start may now find a neighbour

    def add_feedback(self, tenant: str, body: dict[str, Any], idempotency_key: str | None) -> tuple[str, bool]:
        """Store one feedback body durably; may start an adaptation job. Blocking."""
        item = self._feedback_item(tenant, body)
        ack = self.feedback.store_feedback(tenant, body["user_id"], item, idempotency_key,
                                           body_sha256(body) if idempotency_key is not None else None)
        if ack.created:
            self._after_feedback(tenant, body["user_id"], item.kind)
            self.runner.maybe_enqueue(tenant, body["user_id"], ack.new)
        return ack.id, ack.created

    async def aadd_feedback(self, tenant: str, body: dict[str, Any], idempotency_key: str | None) -> tuple[str, bool]:
        """:meth:`add_feedback` for the event loop: awaits the group commit instead of
        parking a thread on it; the (rare) job creation runs in the thread pool."""
        item = self._feedback_item(tenant, body)  # one indexed read for completion_id (WAL: never blocks)
        user = body["user_id"]
        ack = await self.feedback.astore_feedback(tenant, user, item, idempotency_key,
                                                  body_sha256(body) if idempotency_key is not None else None)
        if ack.created:
            self._after_feedback(tenant, user, item.kind)
            if self.runner.wants_job(tenant, user, ack.new):
                await run_in_threadpool(self.runner.maybe_enqueue, tenant, user, ack.new)
        return ack.id, ack.created

    def new_completion_id(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(12)}"

    # -- users ---------------------------------------------------------------------------
    def user_known(self, tenant: str, user: str) -> bool:
        """Whether the user has feedback, completions, jobs or adapters stored."""
        return self.feedback.user_exists(tenant, user) or self.store.user_dir(tenant, user).exists()

    def require_user(self, tenant: str, user: str) -> None:
        if not self.user_known(tenant, user):
            raise NotFoundError(f"user {user!r} not found")

    def user_info(self, tenant: str, user: str) -> dict[str, Any]:
        self.require_user(tenant, user)
        _, serving = self.serving_adapter(tenant, user)
        jid = self.runner.inflight(tenant, user)
        changed = self._changed.get((tenant, user))
        policy = self.store.describe(tenant, user, "policy")
        if changed is None and policy["current"] is not None:
            cur = [v for v in policy["versions"] if v["version"] == policy["current"]]
            changed = cur[0]["created_at"] if cur else None
        return {
            "object": "user", "user_id": user, "feedback": self.feedback.counts(tenant, user),
            "adapt_threshold": self.settings.adapt_threshold,
            "policy": policy, "reward": self.store.describe(tenant, user, "reward"),
            "serving": serving, "policy_changed_at": changed,
            "job": {"in_flight": jid, "latest": self.feedback.latest_job(tenant, user)},
        }

    def rollback(self, tenant: str, user: str, kind: str, version: int | None) -> dict[str, Any]:
        self.require_user(tenant, user)
        kinds = ["policy", "reward"] if kind == "both" else [kind]
        with self.runner.rolling_back(tenant, user):  # a job in flight will not publish over it
            # every kind's target first: "both" with one kind lacking the version changes neither
            targets = {k: self.store.rollback_target(tenant, user, k, version) for k in kinds}
            try:
                for k, v in targets.items():
                    self.store.set_current(tenant, user, k, v)
            finally:  # whatever was written is served from now on
                self.engine.evict(engine_key(tenant, user))
                self._expire_all()
                with self._lock:
                    self._changed[(tenant, user)] = time.time()
        return targets

    def delete_user(self, tenant: str, user: str) -> None:
        """Erase the user. The preference vector goes first: after a crash midway the rest is
        still there to find (``require_user``) and erase again, and no other user is served
        the erased user's adapter as a neighbour meanwhile."""
        self.require_user(tenant, user)
        key = engine_key(tenant, user)
        with self.runner.erasing(tenant, user):  # a job of the user in flight will not publish
            if self.index.remove(tenant, user):
                self.index.save()
            self.feedback.delete_user(tenant, user)
            self.store.delete_user(tenant, user)
            self.engine.evict(key)
        self._expire_all()
        with self._lock:
            self._pref_cache.pop((tenant, user), None)
            self._changed.pop((tenant, user), None)
            # a user created again numbers versions from v1: a v1 that failed to load before the
            # erasure (its files deleted under a queued request, say) must not shadow the new one
            self._bad = {b for b in self._bad if b[0] != key}

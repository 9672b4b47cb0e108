"""Background per-user adaptation: feedback -> reward adapter -> policy adapter -> new version.

A job for ``(tenant, user)``:

1. reads the user's most recent ``max_records`` feedback records;
2. adapts the reward adapter from the reward meta-init, then the policy adapter from
   the policy meta-init (or, for a user with fewer than ``neighbor_init_below``
   records, from the nearest user's current policy adapter -- retrieval);
3. validates both: every tensor finite; after writing, the stored directory must load
   back (sha256, kind, base, rank) and, if a ``validate_policy`` hook is given (the
   server passes the serving engine's loader), pass it;
4. swaps the new versions in: ``CURRENT`` is rewritten atomically only after the whole
   version is on disk and validated. A failing job removes what it wrote, leaves the
   previous version serving, and records its error in the feedback store;
5. updates the user's preference vector in the retrieval index.

Jobs are single-flight: at most one queued-or-running job per user; asking again
returns the job in flight. Work runs on a small thread pool, separate from serving.

Triggering: a job covers the records up to the newest one when it starts; only a job
that succeeds moves the user's watermark (the feedback store's "new" count) past them, so
a failed, cancelled (shutdown) or interrupted (restart) job consumes nothing. When a job
ends the user is checked again: ``threshold`` records past the watermark start the next
job at once (after a failure, only if feedback arrived while it ran: no retry loop).

Erasure: :meth:`AdaptationRunner.erasing` wraps a user's erasure. A job enqueued before
or during it never publishes: its new versions and preference vector are discarded.
Rollback: :meth:`AdaptationRunner.rolling_back` wraps one. A job enqueued before it stores
its versions but does not make them current (nor upsert its preference vector).

:class:`Personalizer` is what a job needs from the models; :class:`DefaultPersonalizer`
implements it on :mod:`metarlhf.reward` and :mod:`metarlhf.policy` with its own copy of
the policy (never the serving engine's), tests inject small fakes.
"""

from __future__ import annotations

import inspect
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from metarlhf.adapters import Adapter
from metarlhf.data import Pair, Record, Thumbs
from metarlhf.errors import Cancelled, ConfigError, DataError, MetaRLHFError, NotFoundError
from metarlhf.feedback_store import SQLiteFeedbackStore
from metarlhf.retrieval import PreferenceIndex, preference_vector
from metarlhf.store import AdapterStore

log = logging.getLogger(__name__)


class Personalizer(Protocol):
    """The model-side operations an adaptation job and cold-start retrieval need."""

    policy_base: str  # base model name stamped into policy adapters
    embed_dim: int

    def adapt_reward(self, records: Sequence[Record]) -> Adapter: ...

    def adapt_policy(self, records: Sequence[Record], init: str | Path | None,
                     should_stop: Callable[[], bool] | None = None) -> Adapter: ...

    def embed(self, prompts: list[str], completions: list[str]) -> np.ndarray: ...  # [n, d]


def liked_disliked(records: Sequence[Record]) -> tuple[list[str], list[str], list[bool]]:
    """Flatten records into (prompts, completions, liked) for preference vectors."""
    prompts, comps, liked = [], [], []
    for r in records:
        if isinstance(r, Thumbs):
            prompts.append(r.prompt)
            comps.append(r.completion)
            liked.append(r.label == 1)
        elif isinstance(r, Pair):
            prompts += [r.prompt, r.prompt]
            comps += [r.chosen, r.rejected]
            liked += [True, False]
    return prompts, comps, liked


def user_preference(personalizer: Personalizer, records: Sequence[Record]) -> np.ndarray:
    """The user's preference vector (see :mod:`metarlhf.retrieval`). Raises DataError."""
    prompts, comps, liked = liked_disliked(records)
    if not prompts:
        raise DataError("no feedback to embed")
    return preference_vector(personalizer.embed(prompts, comps), liked)


def check_finite(adapter: Adapter, what: str) -> None:
    import torch

    for k, t in adapter.tensors.items():
        if not torch.is_tensor(t) or not torch.isfinite(t).all():
            raise DataError(f"{what} adapter tensor {k!r} has NaN or infinite values")


class DefaultPersonalizer:
    """Real adaptation on the embedded (or given) models.

    Loads the reward encoder once and a private copy of the policy (adaptation must not
    touch the serving engine's weights). Thread-safe by two locks, one per model: the
    reward encoder's (``adapt_reward`` and ``embed``) and the policy copy's
    (``adapt_policy``). ``adapt_reward`` does not change the encoder's weights, but its
    ``functional_call`` swaps the adapted tensors into the shared modules for each forward,
    so an ``embed`` must not run meanwhile; the (long) policy adaptation never blocks a
    cold-start embedding.
    """

    def __init__(self, policy_dir: str | None = None, encoder_dir: str | None = None,
                 reward_steps: int | None = None, policy_steps: int | None = None, device: str = "cpu",
                 reward_init: str | None = None) -> None:
        from metarlhf.models import DEFAULT_POLICY_NAME, load_policy, model_name
        from metarlhf.policy import DEFAULT_INIT_DIR
        from metarlhf.reward import RewardConfig, load_reward_model, require_init_dir

        # reward_init: an init dir (its set-up, e.g. standardised features, shapes the model),
        # "scratch", or None: the shipped init when it was made for this encoder, else scratch
        if reward_init == "scratch":
            self.reward_model = load_reward_model(encoder_dir, adapter_dir=None, config=RewardConfig())
        else:
            if reward_init is not None:
                require_init_dir(reward_init)
            self.reward_model = load_reward_model(encoder_dir, adapter_dir=reward_init)
        self.reward_init: str | None = reward_init if reward_init is not None else (
            None if self.reward_model.init_meta else "scratch")
        self.policy = load_policy(policy_dir, device=device)  # adapted on this device; the reward model on the CPU
        self.policy_base = model_name(policy_dir, DEFAULT_POLICY_NAME)
        self.policy_init = "meta" if (DEFAULT_INIT_DIR / "metarlhf.json").is_file() else "scratch"
        self.reward_steps = reward_steps
        self.policy_steps = policy_steps
        self.embed_dim = int(self.reward_model.hidden_size)
        self._reward_lock = threading.Lock()
        self._policy_lock = threading.Lock()
        if self.reward_init == "scratch" or self.policy_init == "scratch":
            log.warning("no shipped meta-init for %s; adapting from scratch",
                        " and ".join(k for k, v in (("reward", self.reward_init), ("policy", self.policy_init))
                                     if v == "scratch"))

    def adapt_reward(self, records: Sequence[Record]) -> Adapter:
        from metarlhf.reward import adapt_reward

        with self._reward_lock:
            return adapt_reward(records, init=self.reward_init, encoder=self.reward_model, steps=self.reward_steps)

    def adapt_policy(self, records: Sequence[Record], init: str | Path | None,
                     should_stop: Callable[[], bool] | None = None) -> Adapter:
        from metarlhf.policy import adapt_policy

        with self._policy_lock:
            return adapt_policy(records, base=self.policy, init=str(init) if init is not None else self.policy_init,
                                steps=self.policy_steps, should_stop=should_stop)

    def embed(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        import torch

        with self._reward_lock, torch.no_grad():
            return self.reward_model.embed(prompts, completions).float().cpu().numpy()  # [n, d]


class AdaptationRunner:
    """Single-flight background adaptation jobs, one thread pool."""

    def __init__(
        self,
        feedback: SQLiteFeedbackStore,
        store: AdapterStore,
        personalizer: Personalizer,
        index: PreferenceIndex | None = None,
        threshold: int = 4,
        workers: int = 1,
        max_records: int = 64,
        neighbor_init_below: int = 8,
        validate_policy: Callable[[str, str, int, Path], None] | None = None,
        on_new_version: Callable[[str, str, dict[str, Any]], None] | None = None,
        on_discard: Callable[[str, str], None] | None = None,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigError(f"adaptation threshold must be an int >= 1, got {threshold!r}")
        self.feedback = feedback
        self.store = store
        self.personalizer = personalizer
        self.index = index
        self.threshold = threshold
        self.max_records = max_records
        self.neighbor_init_below = neighbor_init_below
        self.validate_policy = validate_policy
        self.on_new_version = on_new_version
        self.on_discard = on_discard  # a validated version was thrown away (erasure): forget it
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapt")
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], str] = {}  # (tenant, user) -> job id
        # jobs whose user was erased while they ran: still finishing (single flight), but not
        # the user's job any more (their row is gone; they publish nothing)
        self._orphans: set[str] = set()
        # jobs that ended and whose follow-up _finish is deciding: still counted by
        # queue_depth, but not reported in flight, so a request's wants_job pre-check passes
        # and its maybe_enqueue waits for the decision (else feedback committed just after
        # _finish's recount would start no job)
        self._finishing: set[str] = set()
        # erasure generation per user: odd while an erasure runs; a job publishes only if it is
        # unchanged since the job was enqueued (held with _publish around the swap)
        self._erasures: dict[tuple[str, str], int] = {}
        # seq up to which a user's last job failed: the next automatic job waits for
        # ``threshold`` records past it (not one job per new record); in memory, so a restart retries
        self._failed_upto: dict[tuple[str, str], int] = {}
        # rollback count per user: a job enqueued before a rollback that lands after it keeps
        # its versions but does not make them current (the operator's choice stands)
        self._rollbacks: dict[tuple[str, str], int] = {}
        self._publish = threading.Lock()  # lock order: _publish, then _lock
        # whether a user's job starts is decided under one of these (by the user's hash),
        # not under _lock: the decision reads and writes SQLite (a create_job commit is an
        # fsync), and _lock guards the in-memory maps every request reads. Lock order: a
        # start lock, then _lock.
        self._start_locks = [threading.Lock() for _ in range(64)]
        self._closed = False
        # a personalizer whose adapt_policy takes should_stop stops a running job at close()
        # (one adaptation step, not the whole adaptation: ~45 s on a 2-core CPU)
        self._cancellable = "should_stop" in inspect.signature(personalizer.adapt_policy).parameters
        self.stats = {"succeeded": 0, "failed": 0, "started": 0}

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._inflight)

    def inflight(self, tenant: str, user: str) -> str | None:
        """The id of the user's job in flight, if any. A job whose user was erased while it
        ran is not reported: it publishes nothing, and its row is gone (feedback given since
        may start a job when it ends)."""
        with self._lock:
            jid = self._inflight.get((tenant, user))
            return None if jid in self._orphans or jid in self._finishing else jid

    def wants_job(self, tenant: str, user: str, new: int) -> bool:
        """A cheap pre-check: whether ``new`` records past the watermark may call for a job now
        (none in flight; the end of the job in flight checks again). :meth:`maybe_enqueue`
        decides on fresh counts."""
        return new >= self.threshold and self.inflight(tenant, user) is None

    def _start_lock(self, tenant: str, user: str) -> threading.Lock:
        return self._start_locks[hash((tenant, user)) % len(self._start_locks)]

    def _due(self, tenant: str, user: str) -> bool:
        """Whether the user's records call for an automatic job (call with the user's start
        lock held, not ``_lock``: it reads SQLite): ``threshold`` records past the watermark
        and, after a failed job, past what it tried."""
        if self.feedback.new_count(tenant, user) < self.threshold:
            return False
        with self._lock:
            failed = self._failed_upto.get((tenant, user))
        return failed is None or self.feedback.count_after(tenant, user, failed) >= self.threshold

    def maybe_enqueue(self, tenant: str, user: str, new: int | None = None) -> dict[str, Any] | None:
        """Enqueue a job if the user's records call for one (:meth:`_due`) and none is in
        flight. ``new``, the count the feedback write returned, only skips the recount when it
        is below the threshold: it may be stale (a job may have succeeded since), so the
        decision is made on fresh counts under the user's start lock."""
        if new is not None and new < self.threshold:
            return None
        with self._start_lock(tenant, user):
            with self._lock:
                if self._closed or (tenant, user) in self._inflight:
                    return None
            if not self._due(tenant, user):
                return None
            return self._start(tenant, user, "threshold")

    def enqueue(self, tenant: str, user: str, reason: str = "manual") -> dict[str, Any]:
        """Start a job for the user, or return the one already in flight."""
        key = (tenant, user)
        with self._start_lock(tenant, user):
            with self._lock:
                if self._closed:
                    raise ConfigError("the adaptation runner is shut down")
                jid = self._inflight.get(key)
            if jid is None:
                if self.feedback.max_seq(tenant, user) == 0:
                    raise DataError(f"user {user!r} has no feedback to adapt on")
                job = self._start(tenant, user, reason)
                if job is None:
                    raise ConfigError("the adaptation runner is shut down")
                return job
        try:
            return self.feedback.get_job(tenant, jid)
        except NotFoundError:  # its row went with an erasure; the job discards its output
            raise ConfigError(f"user {user!r} was erased while a job ran; that job is finishing and publishes "
                              "nothing: retry in a moment") from None

    def _start(self, tenant: str, user: str, reason: str, replaces: str | None = None) -> dict[str, Any] | None:
        """Create and submit a job (call with the user's start lock held, not ``_lock``, and
        none in flight for the user but ``replaces``, the finished job :meth:`_finish` hands
        over from; any other job in flight is a bug, raised before a row is written).
        The erasure and rollback counts are read before the job's row is written: an erasure
        that deletes the row, or comes after it, is seen by the job, and a rollback during the
        commit stands over it (the operator's choice wins a tie). None if the runner was
        closed meanwhile (the job is recorded as failed and never runs)."""
        key = (tenant, user)
        with self._lock:
            current = self._inflight.get(key)
            if current is not None and current != replaces:
                raise RuntimeError(f"user {tenant}/{user}: job {current} is in flight; not starting another")
            epochs = (self._erasures.get(key, 0), self._rollbacks.get(key, 0))
        job = self.feedback.create_job(tenant, user, reason)
        with self._lock:
            if replaces is not None and self._inflight.get(key) == replaces:  # the finished job hands over
                del self._inflight[key]
                self._orphans.discard(replaces)
                self._finishing.discard(replaces)
            closed = self._closed
            if not closed:
                try:
                    self._pool.submit(self._run, tenant, user, job["id"], *epochs)
                except RuntimeError:  # the pool is shut down (interpreter exit)
                    closed = True
                else:
                    self._inflight[key] = job["id"]
        if closed:  # closed meanwhile: the job never runs
            self.feedback.update_job(job["id"], "failed", error="cancelled: the server shut down before the job ran")
            return None
        return job

    @contextmanager
    def rolling_back(self, tenant: str, user: str) -> Iterator[None]:
        """Wrap a rollback of the user's adapters: a job enqueued before it does not publish
        over it (its versions are stored, not made current; a job already publishing
        finishes first, so the rollback is what stays current)."""
        key = (tenant, user)
        with self._publish:
            with self._lock:
                self._rollbacks[key] = self._rollbacks.get(key, 0) + 1
            yield

    @contextmanager
    def erasing(self, tenant: str, user: str) -> Iterator[None]:
        """Wrap the erasure of a user's data: no job enqueued before or during it publishes
        (a job already publishing finishes first, so the erasure removes its output)."""
        key = (tenant, user)
        with self._publish, self._lock:
            self._erasures[key] = self._erasures.get(key, 0) + 1  # odd: erasure in progress
            self._failed_upto.pop(key, None)
            if key in self._inflight:
                self._orphans.add(self._inflight[key])
        try:
            yield
        finally:
            with self._lock:
                self._erasures[key] += 1

    def erasure_epoch(self, tenant: str, user: str) -> int:
        """How many times an erasure of the user began or ended (odd: one is in progress).
        Data derived from the user's state (a served completion, say) and written between
        two reads of the same even epoch is either erased with the user or outlives no erasure."""
        with self._lock:
            return self._erasures.get((tenant, user), 0)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no job is in flight (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.queue_depth == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        """Stop: queued jobs are cancelled and a running one stops at its next adaptation
        step (where the personalizer allows it; else it finishes), all recorded as failed
        (their records stay new, so the next feedback after a restart triggers adaptation).
        Nothing of a stopped job is published."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            cancelled = list(self._inflight.values())
            self._inflight.clear()
        for jid in cancelled:
            try:
                self.feedback.update_job(jid, "failed", error="cancelled: the server shut down before the job ran")
            except Exception:  # noqa: BLE001 - the store may be closed; a restart marks it failed anyway
                log.exception("could not record the cancellation of job %s", jid)

    # -- the job -------------------------------------------------------------------------
    def _policy_init(self, tenant: str, user: str, records: Sequence[Record]) -> tuple[Path | None, str | None]:
        """The nearest user's current policy adapter, for users with few records."""
        if self.index is None or len(records) >= self.neighbor_init_below:
            return None, None
        try:
            vec = user_preference(self.personalizer, records)
        except DataError:
            return None, None
        for other, _ in self.index.search(tenant, vec, k=3, exclude=user):
            v = self.store.resolve(tenant, other, "policy", expect_base=self.personalizer.policy_base)
            if v is not None:
                return v.path, other
        return None, None

    def _run(self, tenant: str, user: str, job_id: str, erasure: int, rollbacks: int) -> None:
        t0 = time.perf_counter()
        written: list[Path] = []
        upto: int | None = None
        succeeded = False
        try:
            self.stats["started"] += 1
            try:
                upto = self.feedback.start_job(job_id)  # the job covers the records up to this seq
            except NotFoundError:
                upto = 0  # its row went with an erasure: feedback since then may call for a job
                raise
            records = self.feedback.records(tenant, user, limit=self.max_records, upto=upto)
            if not records:
                raise DataError("the user's feedback was erased before the job ran")
            reward = self.personalizer.adapt_reward(records)
            check_finite(reward, "reward")
            init, neighbor = self._policy_init(tenant, user, records)
            if self._cancellable:
                try:
                    policy = self.personalizer.adapt_policy(records, init, should_stop=lambda: self._closed)
                except Cancelled as e:
                    raise Cancelled(f"cancelled: the server shut down while the job ran ({e})") from e
            else:
                policy = self.personalizer.adapt_policy(records, init)
            check_finite(policy, "policy")
            if neighbor is not None:
                policy.meta["init_neighbor"] = neighbor
            rv = self.store.save(tenant, user, "reward", reward, make_current=False)
            written.append(rv.path)
            pv = self.store.save(tenant, user, "policy", policy, make_current=False)
            written.append(pv.path)
            self.store.verify(rv.path, "reward")
            self.store.verify(pv.path, "policy", expect_base=self.personalizer.policy_base)
            if self.validate_policy is not None:
                self.validate_policy(tenant, user, pv.version, pv.path)
            vec = None
            if self.index is not None:
                try:
                    vec = user_preference(self.personalizer, records)
                except DataError as e:
                    log.warning("user %s/%s: no preference vector: %s", tenant, user, e)
            with self._publish:  # an erasure waits for this block, or this block sees it
                with self._lock:
                    cur = self._erasures.get((tenant, user), 0)
                    # changed since the job started, or odd: an erasure is in progress right now
                    # (a job enqueued during it saw the odd count already)
                    erased = cur != erasure or cur % 2 == 1
                    rolled_back = self._rollbacks.get((tenant, user), 0) != rollbacks
                if erased:
                    self._discard_erased(tenant, user, written)
                    raise DataError("the user was erased while the job ran; its output was discarded")
                result = {"policy_version": pv.version, "reward_version": rv.version, "n_records": len(records),
                          "seconds": round(time.perf_counter() - t0, 3),
                          "policy_init": str(init) if init is not None else "default",
                          "reward_final_loss": _last(reward.meta.get("losses")),
                          "policy_final_loss": _last(policy.meta.get("losses")), "published": not rolled_back}
                if not rolled_back:
                    # All checks passed: swap both in (reward first: serving reads only the policy).
                    # If the policy's swap fails, the reward's is undone before the new files go.
                    old_reward = self.store.current(tenant, user, "reward")
                    self.store.set_current(tenant, user, "reward", rv.version)
                    try:
                        self.store.set_current(tenant, user, "policy", pv.version)
                    except BaseException:
                        if old_reward is not None:
                            self.store.set_current(tenant, user, "reward", old_reward)
                        raise
                written.clear()  # live (or kept for rolling forward): never removed from here on
                if not rolled_back and vec is not None and self.index is not None:
                    self.index.upsert(tenant, user, vec)
                if self.on_new_version is not None and not rolled_back:  # under _publish: an erasure
                    self.on_new_version(tenant, user, result)  # comes after it, not between
            if rolled_back:
                log.warning("user %s/%s was rolled back while job %s ran: policy v%d / reward v%d stored, not "
                            "made current", tenant, user, job_id, pv.version, rv.version)
            elif vec is not None and self.index is not None and self.index.path is not None:
                try:  # the version is live now; the vector is saved again at shutdown
                    self.index.save()
                except Exception:  # noqa: BLE001
                    log.exception("user %s/%s: could not save the preference index", tenant, user)
            self.feedback.update_job(job_id, "succeeded", result=result)  # moves the watermark to upto
            succeeded = True
            self.stats["succeeded"] += 1
            if not rolled_back:  # a rolled-back job was logged above
                log.info("adapted %s/%s -> policy v%d, reward v%d in %.1fs", tenant, user, pv.version, rv.version,
                         result["seconds"])
        except Exception as e:  # noqa: BLE001 - any failure is recorded; previous version keeps serving
            for p in written:
                shutil.rmtree(p, ignore_errors=True)
            msg = f"{type(e).__name__}: {e}" if not isinstance(e, MetaRLHFError) else str(e)
            log.error("adaptation job %s for %s/%s failed: %s", job_id, tenant, user, msg)
            self.stats["failed"] += 1
            try:
                self.feedback.update_job(job_id, "failed", error=msg)
            except Exception:  # noqa: BLE001 - store closed during shutdown
                log.exception("could not record the failure of job %s", job_id)
        finally:
            self._finish(tenant, user, job_id, succeeded, upto)

    def _discard_erased(self, tenant: str, user: str, written: list[Path]) -> None:
        """The user was erased while the job ran: remove what it wrote (and the user's
        directory, which its saves may have recreated: no other job of the user can run)."""
        for p in written:
            shutil.rmtree(p, ignore_errors=True)
        written.clear()
        try:
            self.store.delete_user(tenant, user)
        except OSError as e:  # an erasure still in progress is removing it too
            log.warning("user %s/%s: could not remove the discarded job's directory: %s", tenant, user, e)
        if self.on_discard is not None:  # e.g. the serving engine loaded it to validate it: the
            self.on_discard(tenant, user)  # version number comes back after an erasure

    def _finish(self, tenant: str, user: str, jid: str, succeeded: bool, upto: int | None) -> None:
        """Job ``jid`` is over: the feedback that arrived while it ran may call for the next
        one, started in the same step (so the user is never seen idle in between). After a
        failure the next automatic job waits for ``threshold`` records past what this one
        tried: the same records would fail the same way."""
        key = (tenant, user)
        with self._start_lock(tenant, user):  # the finished job stays in _inflight until the next is
            with self._lock:                  # decided: queue_depth never reads 0 in between
                self._finishing.add(jid)
                if succeeded:
                    self._failed_upto.pop(key, None)
                elif upto:  # 0 or None: the job never started on records
                    self._failed_upto[key] = upto
                closed = self._closed
            try:
                if not closed and self._due(tenant, user):
                    self._start(tenant, user, "threshold", replaces=jid)
            except Exception:  # noqa: BLE001 - e.g. the store is closing; the next feedback checks again
                log.warning("user %s/%s: no follow-up adaptation job", tenant, user, exc_info=True)
            finally:  # no follow-up (or it failed): the ended job leaves
                with self._lock:
                    if self._inflight.get(key) == jid:
                        del self._inflight[key]
                    self._orphans.discard(jid)
                    self._finishing.discard(jid)


def _last(xs: Any) -> float | None:
    if isinstance(xs, list) and xs and isinstance(xs[-1], int | float) and math.isfinite(xs[-1]):
        return float(xs[-1])
    return None

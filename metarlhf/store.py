"""Versioned per-user adapter store.

Layout (see docs/architecture.md)::

    <root>/users/<tenant>/<user>/<kind>/v<N>/     an adapter directory (metarlhf.adapters format)
    <root>/users/<tenant>/<user>/<kind>/CURRENT   text file naming the serving version, e.g. "v3"

* A new version is written with :func:`metarlhf.adapters.save_adapter` (build under a
  temp name, fsync, rename), so a concurrent reader never sees a partial version.
  Only after the rename is ``CURRENT`` rewritten (temp + fsync + rename): the swap to
  the new version is atomic.
* Version numbers only grow: the next version is one more than the largest that was
  ever written (kept in ``<kind>/LAST``), so a pruned number is never reused and a cache
  keyed by ``(user, version)`` can never serve stale weights. Erasing a user removes
  ``LAST`` with the rest, so a user created again starts at v1: whoever caches by
  version must forget the user on erasure (the server evicts the user's engine cache
  and its known-bad versions).
* ``save``, ``set_current``, ``rollback`` and ``prune`` of one user and kind hold one
  lock: a rollback between a save's version check and its prune could otherwise leave
  ``CURRENT`` naming a version the prune removed.
* A tombstone (``<user>~deleted``) left by a crash during an erasure is removed when the
  store is opened.
* The newest ``keep`` versions are kept; older ones are removed after a successful
  save. The serving version is never removed.
* :meth:`AdapterStore.resolve` returns the serving version after verifying it (sha256
  via :func:`metarlhf.adapters.load_adapter`); if it is corrupted it logs an error and
  falls back to the newest older version that verifies, or ``None`` (= base/meta-init).

Tenant and user ids must match ``[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}`` (so never ``.``,
``..`` or a hidden name); anything else raises :class:`ConfigError` before touching the
filesystem. The store's own transient names (``<user>~deleted``, ``.<name>.tmp``)
can therefore never be an id, and :meth:`AdapterStore.users` never lists them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarlhf.adapters import Adapter, load_adapter, read_meta, save_adapter
from metarlhf.errors import AdapterError, ConfigError, NotFoundError
from metarlhf.io import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")  # no leading dot: temp and aside names
KINDS = ("policy", "reward")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


def check_id(value: str, what: str = "user id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`ConfigError`."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ConfigError(f"{what} must match [A-Za-z0-9_-][A-Za-z0-9_.-]{{0,127}} (not start with a dot), "
                          f"got {value!r}")
    return value


@dataclass(frozen=True)
class Version:
    """One stored adapter version."""

    tenant: str
    user: str
    kind: str
    version: int
    path: Path

    @property
    def meta(self) -> dict[str, Any]:
        return read_meta(self.path)


class AdapterStore:
    """Per-user, per-kind versioned adapter directories under ``root``."""

    def __init__(self, root: str | os.PathLike, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an int >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep
        self._locks: defaultdict[tuple[str, str, str], threading.RLock] = defaultdict(threading.RLock)
        self._locks_guard = threading.Lock()
        self._sweep_tombstones()

    def _lock(self, tenant: str, user: str, kind: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks[(tenant, user, kind)]

    def _sweep_tombstones(self) -> None:
        """Finish erasures a crash cut short: remove every ``<user>~deleted`` directory."""
        base = self.root / "users"
        if not base.is_dir():
            return
        for t in base.iterdir():
            if not t.is_dir() or t.is_symlink():
                continue
            for d in t.iterdir():
                if d.name.endswith("~deleted") and d.is_dir() and not d.is_symlink():
                    log.warning("removing %s, left by an erasure that was cut short", d)
                    shutil.rmtree(d, ignore_errors=True)

    # -- paths ---------------------------------------------------------------------------
    def user_dir(self, tenant: str, user: str) -> Path:
        return self.root / "users" / check_id(tenant, "tenant") / check_id(user)

    def kind_dir(self, tenant: str, user: str, kind: str) -> Path:
        if kind not in KINDS:
            raise ConfigError(f"adapter kind must be one of {KINDS}, got {kind!r}")
        return self.user_dir(tenant, user) / kind

    def versions(self, tenant: str, user: str, kind: str) -> list[int]:
        """Complete stored versions, ascending (temp dirs are ignored)."""
        d = self.kind_dir(tenant, user, kind)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = VERSION_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, tenant: str, user: str, kind: str, version: int) -> Path:
        return self.kind_dir(tenant, user, kind) / f"v{int(version)}"

    def current(self, tenant: str, user: str, kind: str) -> int | None:
        """The version ``CURRENT`` names, or None if the user has none."""
        f = self.kind_dir(tenant, user, kind) / "CURRENT"
        try:
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as e:  # e.g. a directory named CURRENT
            raise AdapterError(f"{f}: unreadable version pointer: {e}") from e
        m = VERSION_RE.match(text)
        if not m:
            log.error("%s: unreadable CURRENT pointer %r; using the newest stored version", f, text)
            vs = self.versions(tenant, user, kind)
            return vs[-1] if vs else None
        return int(m.group(1))

    # -- writes --------------------------------------------------------------------------
    def _last(self, tenant: str, user: str, kind: str) -> int:
        f = self.kind_dir(tenant, user, kind) / "LAST"
        try:
            last = int(f.read_bytes().decode("utf-8").strip())
        except (FileNotFoundError, ValueError):  # ValueError: not UTF-8 or not a number
            last = 0
        except OSError as e:
            raise AdapterError(f"{f}: unreadable version counter: {e}") from e
        vs = self.versions(tenant, user, kind)
        return max([last, *vs])

    def save(self, tenant: str, user: str, kind: str, adapter: Adapter, make_current: bool = True) -> Version:
        """Write ``adapter`` as the next version and (by default) point ``CURRENT`` at it.

        Holds the user's and kind's lock, so two writers (or a writer and a rollback) of
        the same user and kind take turns; the server's job runner is single-flight per user.
        """
        d = self.kind_dir(tenant, user, kind)
        with self._lock(tenant, user, kind):
            n = self._last(tenant, user, kind) + 1
            target = d / f"v{n}"
            adapter.meta = {**adapter.meta, "kind": adapter.meta.get("kind", kind), "version": n}
            save_adapter(target, adapter)
            atomic_write_bytes(d / "LAST", f"{n}\n".encode())
            if make_current:
                self.set_current(tenant, user, kind, n)
            self.prune(tenant, user, kind)
        return Version(tenant, user, kind, n, target)

    def set_current(self, tenant: str, user: str, kind: str, version: int) -> None:
        """Point ``CURRENT`` at an existing version (used for rollback)."""
        with self._lock(tenant, user, kind):
            if version not in self.versions(tenant, user, kind):
                raise NotFoundError(f"user {user!r} has no {kind} adapter v{version}")
            atomic_write_bytes(self.kind_dir(tenant, user, kind) / "CURRENT", f"v{int(version)}\n".encode())

    def rollback_target(self, tenant: str, user: str, kind: str, version: int | None = None) -> int:
        """The version :meth:`rollback` would serve (NotFoundError if there is none); writes nothing."""
        vs = self.versions(tenant, user, kind)
        if version is not None:
            if version not in vs:
                raise NotFoundError(f"user {user!r} has no {kind} adapter v{version}")
            return version
        cur = self.current(tenant, user, kind)
        older = [v for v in vs if cur is None or v < cur]
        if not older:
            raise NotFoundError(f"user {user!r} has no {kind} adapter older than v{cur} to roll back to")
        return older[-1]

    def rollback(self, tenant: str, user: str, kind: str, version: int | None = None) -> int:
        """Serve ``version`` again, or the newest one older than the current if None."""
        with self._lock(tenant, user, kind):
            version = self.rollback_target(tenant, user, kind, version)
            self.set_current(tenant, user, kind, version)
        return version

    def prune(self, tenant: str, user: str, kind: str) -> list[int]:
        """Remove all but the newest ``keep`` versions (never the current one)."""
        with self._lock(tenant, user, kind):
            cur = self.current(tenant, user, kind)
            vs = self.versions(tenant, user, kind)
            doomed = [v for v in vs[: max(0, len(vs) - self.keep)] if v != cur]
            for v in doomed:
                shutil.rmtree(self.path(tenant, user, kind, v), ignore_errors=True)
            if doomed:
                fsync_dir(self.kind_dir(tenant, user, kind))
        return doomed

    def delete_user(self, tenant: str, user: str) -> bool:
        """Erase every adapter of the user. Returns whether anything was there."""
        d = self.user_dir(tenant, user)
        if not d.exists():
            return False
        # Rename first so that no reader sees a half-deleted tree, then remove. The "~"
        # keeps the tombstone outside the id alphabet: it can never be another user.
        tomb = d.with_name(f"{d.name}~deleted")
        shutil.rmtree(tomb, ignore_errors=True)
        os.replace(d, tomb)
        fsync_dir(d.parent)
        shutil.rmtree(tomb, ignore_errors=True)
        return True

    def users(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """Every ``(tenant, user)`` with a stored adapter directory."""
        base = self.root / "users"
        out = []
        tenants = [base / tenant] if tenant is not None else (sorted(base.iterdir()) if base.is_dir() else [])
        for t in tenants:
            if not t.is_dir() or not ID_RE.fullmatch(t.name):
                continue
            for u in sorted(t.iterdir()):
                if u.is_dir() and ID_RE.fullmatch(u.name):
                    out.append((t.name, u.name))
        return out

    # -- reads ---------------------------------------------------------------------------
    def resolve(self, tenant: str, user: str, kind: str, expect_base: str | None = None,
                expect_rank: int | None = None) -> Version | None:
        """The version to serve: ``CURRENT`` if it verifies, else the newest older one that
        does (an error is logged for each bad one), else None."""
        cur = self.current(tenant, user, kind)
        if cur is None:
            return None
        for v in [cur] + [v for v in reversed(self.versions(tenant, user, kind)) if v < cur]:
            p = self.path(tenant, user, kind, v)
            try:
                self.verify(p, kind, expect_base, expect_rank)
            except AdapterError as e:
                log.error("user %s/%s %s adapter v%d is unusable, falling back: %s", tenant, user, kind, v, e)
                continue
            return Version(tenant, user, kind, v, p)
        return None

    @staticmethod
    def verify(path: Path, kind: str, expect_base: str | None = None, expect_rank: int | None = None) -> Adapter:
        """Load and check an adapter directory (sha256, kind, base, rank)."""
        if not path.is_dir():
            raise AdapterError(f"{path}: missing")
        return load_adapter(path, expect_base=expect_base, expect_rank=expect_rank, expect_kind=kind)

    def describe(self, tenant: str, user: str, kind: str) -> dict[str, Any]:
        """Versions with their metadata (metrics), and which one is current."""
        out = []
        for v in self.versions(tenant, user, kind):
            p = self.path(tenant, user, kind, v)
            try:
                meta = read_meta(p)
            except AdapterError as e:
                meta = {"error": str(e)}
            out.append({"version": v, "created_at": meta.get("created_at"),
                        "metrics": {k: meta[k] for k in ("losses", "steps", "k", "init", "train_seconds", "accuracy",
                                                         "final_loss", "validation") if k in meta},
                        **({"error": meta["error"]} if "error" in meta else {})})
        return {"current": self.current(tenant, user, kind), "versions": out}

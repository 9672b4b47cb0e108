"""A bounded LRU cache of resident adapters, keyed by ``(user, version)``.

The cache owns a fixed number of *slots* (``capacity``). Each slot holds at most one
adapter's weights; what a slot physically is (rows of a stacked LoRA tensor, a named
peft adapter, ...) belongs to the caller, who passes two callbacks:

* ``load(key, payload, slot)`` copies an adapter into a slot. It must validate first
  and raise before touching the slot, or leave the slot cleared; any exception it
  raises is passed on and the slot goes back to the free list.
* ``clear(slot)`` zeroes a slot when its adapter leaves.

Entry lifecycle (explicit, like vLLM/LoRAX): *free* -> ``acquire`` (miss: *loading* ->
*ready*, or the error is raised and the slot is free again) -> ``release``. A ready
entry stays resident after release until it is the least recently used unpinned,
unreferenced entry and a miss needs its slot. ``pin`` keeps an entry resident;
``evict_user`` forgets every version of a user at once (erasure, new version). An entry
still referenced by an in-flight generation when it is evicted keeps its slot until
the last ``release``, so a running generation never has its weights swapped under it.

Simplifications: loading is synchronous and happens under the caller's lock; there is
no per-adapter lock because the engine serialises loads (see ``MultiAdapterEngine``).
The cache is pure Python (no torch) so its policy is tested in isolation.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from metarlhf.errors import ConfigError

Key = tuple[str, int]  # (user, version)


@dataclass
class _Entry:
    key: Key
    slot: int
    refs: int = 0  # in-flight generations using this slot
    pinned: bool = False
    evicted: bool = False  # forgotten by evict_user while still referenced


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_errors: int = 0
    load_ms: list[float] = field(default_factory=list)


class CacheFullError(ConfigError):
    """Every slot is pinned or in use by a running generation."""


class AdapterCache:
    """LRU map from ``(user, version)`` to a slot index in ``[0, capacity)``."""

    def __init__(
        self,
        capacity: int,
        load: Callable[[Key, Any, int], None],
        clear: Callable[[int], None],
    ) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._load = load
        self._clear = clear
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # LRU first, MRU last
        self._zombies: dict[int, _Entry] = {}  # slot -> evicted entry still referenced
        self._free: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self.stats = CacheStats()

    # -- queries ---------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def resident(self) -> list[Key]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    @property
    def pinned(self) -> list[Key]:
        return [k for k, e in self._entries.items() if e.pinned]

    def slot_of(self, key: Key) -> int | None:
        e = self._entries.get(key)
        return None if e is None else e.slot

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "hits": s.hits,
            "misses": s.misses,
            "resident": len(self._entries),
            "capacity": self.capacity,
            "pinned": len(self.pinned),
            "evictions": s.evictions,
            "load_errors": s.load_errors,
            "load_ms": round(sum(s.load_ms) / len(s.load_ms), 3) if s.load_ms else None,
            "load_ms_last": round(s.load_ms[-1], 3) if s.load_ms else None,
            "load_ms_max": round(max(s.load_ms), 3) if s.load_ms else None,
        }

    # -- acquire / release -----------------------------------------------------------
    def acquire(self, key: Key, payload: Any = None) -> int:
        """Slot holding ``key``, loading it on a miss. Pair every call with ``release``."""
        e = self._entries.get(key)
        if e is not None:
            self.stats.hits += 1
            self._entries.move_to_end(key)
            e.refs += 1
            return e.slot
        slot = self._take_slot()  # raises CacheFullError before counting a miss
        self.stats.misses += 1
        t0 = time.perf_counter()
        try:
            self._load(key, payload, slot)
        except BaseException:
            self.stats.load_errors += 1
            self._clear(slot)
            self._free.append(slot)
            raise
        self.stats.load_ms.append((time.perf_counter() - t0) * 1000.0)
        self._entries[key] = _Entry(key=key, slot=slot, refs=1)
        return slot

    def release(self, key: Key, slot: int) -> None:
        """Drop one reference taken by ``acquire``."""
        e = self._entries.get(key)
        if e is not None and e.slot == slot:
            e.refs = max(0, e.refs - 1)
            return
        z = self._zombies.get(slot)
        if z is not None and z.key == key:
            z.refs -= 1
            if z.refs <= 0:
                del self._zombies[slot]
                self._clear(slot)
                self._free.append(slot)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key, e in self._entries.items():  # LRU order
            if not e.pinned and e.refs == 0:
                del self._entries[key]
                self.stats.evictions += 1
                self._clear(e.slot)
                return e.slot
        raise CacheFullError(
            f"adapter cache is full: all {self.capacity} slots are pinned or in use; "
            "raise the capacity or unpin adapters"
        )

    def can_admit(self, keys: set[Key]) -> bool:
        """Whether all ``keys`` can be resident at once (new ones in free/evictable slots)."""
        missing = [k for k in keys if k not in self._entries]
        evictable = sum(1 for k, e in self._entries.items() if not e.pinned and e.refs == 0 and k not in keys)
        return len(missing) <= len(self._free) + evictable

    # -- pin / evict -----------------------------------------------------------------
    def pin(self, key: Key, payload: Any = None) -> int:
        """Load ``key`` if needed and keep it resident until ``unpin``. Idempotent."""
        e = self._entries.get(key)
        if e is not None and e.pinned:
            return e.slot
        if len(self.pinned) + 1 >= self.capacity:
            raise CacheFullError(
                f"cannot pin {key}: pinning would leave no free slot of {self.capacity} for other users"
            )
        slot = self.acquire(key, payload)
        entry = self._entries[key]
        entry.pinned = True
        self.release(key, slot)
        return slot

    def unpin(self, key: Key) -> None:
        """Allow ``key`` to be evicted again. Idempotent; unknown keys are ignored."""
        e = self._entries.get(key)
        if e is not None:
            e.pinned = False

    def evict_user(self, user: str) -> int:
        """Forget every resident version of ``user`` (pinned ones too). Returns how many."""
        keys = [k for k in self._entries if k[0] == user]
        for key in keys:
            e = self._entries.pop(key)
            self.stats.evictions += 1
            if e.refs > 0:
                e.evicted = True
                self._zombies[e.slot] = e
            else:
                self._clear(e.slot)
                self._free.append(e.slot)
        return len(keys)

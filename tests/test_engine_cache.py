"""The adapter cache policy in isolation: LRU order, pinning, eviction, refs, errors."""

import pytest

from metarlhf.adapter_cache import AdapterCache, CacheFullError
from metarlhf.errors import AdapterError, ConfigError


class Slots:
    """Fake slot storage that records loads and clears."""

    def __init__(self, fail=()):
        self.content = {}
        self.loads = []
        self.fail = set(fail)

    def load(self, key, payload, slot):
        self.loads.append(key)
        if key in self.fail:
            raise AdapterError(f"bad adapter {key}")
        self.content[slot] = key

    def clear(self, slot):
        self.content.pop(slot, None)


def make(capacity, fail=()):
    s = Slots(fail)
    return AdapterCache(capacity, s.load, s.clear), s


def use(cache, key):
    slot = cache.acquire(key)
    cache.release(key, slot)
    return slot


def test_lru_eviction_hits_and_misses():
    cache, s = make(2)
    use(cache, ("a", 1))
    use(cache, ("b", 1))
    use(cache, ("a", 1))  # hit: a becomes most recent
    use(cache, ("c", 1))  # evicts b (least recently used)
    assert cache.resident == [("a", 1), ("c", 1)]
    assert s.loads == [("a", 1), ("b", 1), ("c", 1)]
    snap = cache.snapshot()
    assert (snap["hits"], snap["misses"], snap["evictions"], snap["resident"]) == (1, 3, 1, 2)
    assert sorted(s.content.values()) == [("a", 1), ("c", 1)]  # slot storage agrees


def test_versions_are_distinct_keys():
    cache, s = make(4)
    use(cache, ("a", 1))
    use(cache, ("a", 2))
    assert len(cache) == 2 and s.loads == [("a", 1), ("a", 2)]


def test_many_users_never_exceed_capacity():
    cache, s = make(5)
    for i in range(1000):
        use(cache, (f"u{i}", 1))
        assert len(cache) <= 5 and len(s.content) <= 5
    assert cache.snapshot()["evictions"] == 995


def test_referenced_entries_are_not_evicted():
    cache, _ = make(2)
    sa = cache.acquire(("a", 1))
    sb = cache.acquire(("b", 1))
    with pytest.raises(CacheFullError, match="full"):
        cache.acquire(("c", 1))
    assert cache.snapshot()["misses"] == 2  # a refused acquire is not a miss
    assert not cache.can_admit({("c", 1)})
    cache.release(("b", 1), sb)
    assert cache.can_admit({("c", 1)})
    assert cache.acquire(("c", 1)) == sb
    assert cache.slot_of(("a", 1)) == sa


def test_pin_and_unpin():
    cache, _ = make(3)
    cache.pin(("p", 1))
    cache.pin(("p", 1))  # idempotent
    cache.pin(("q", 1))
    with pytest.raises(ConfigError, match="no free slot"):
        cache.pin(("r", 1))  # 3 of 3 pinned would starve everyone else
    assert ("r", 1) not in cache
    cache.unpin(("q", 1))
    for i in range(10):
        use(cache, (f"u{i}", 1))
    assert ("p", 1) in cache and cache.pinned == [("p", 1)]
    cache.unpin(("p", 1))
    cache.unpin(("nobody", 1))
    use(cache, ("x", 1))
    use(cache, ("y", 1))
    assert ("p", 1) not in cache


def test_load_error_frees_the_slot_and_keeps_others():
    cache, s = make(2, fail={("bad", 1)})
    use(cache, ("a", 1))
    with pytest.raises(AdapterError):
        cache.acquire(("bad", 1))
    assert cache.resident == [("a", 1)] and cache.snapshot()["load_errors"] == 1
    use(cache, ("b", 1))
    assert cache.resident == [("a", 1), ("b", 1)]  # the failed load did not leak a slot


def test_evict_user_waits_for_inflight_references():
    cache, s = make(2)
    slot = cache.acquire(("a", 1))
    use(cache, ("a", 2))
    assert cache.evict_user("a") == 2
    assert len(cache) == 0
    assert slot in s.content  # still in use by the in-flight generation
    use(cache, ("b", 1))  # takes the free slot, not the referenced one
    assert s.content[slot] == ("a", 1)
    cache.release(("a", 1), slot)
    assert slot not in s.content
    use(cache, ("c", 1))
    assert sorted(s.content.values()) == [("b", 1), ("c", 1)]


def test_capacity_must_be_positive():
    with pytest.raises(ConfigError, match="capacity"):
        AdapterCache(0, lambda *a: None, lambda s: None)

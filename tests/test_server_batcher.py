import asyncio
import threading
import time

import pytest

from metarlhf.engine import GenerationRequest, GenerationResult, SamplingParams
from server.batcher import Batcher, Overloaded


class RecordingEngine:
    """Records the batches it is given; each row echoes its prompt."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.gate = gate

    def generate(self, reqs):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append([r.prompt for r in reqs])
        return [GenerationResult(r.prompt.upper(), [1], 1, 1, "stop") for r in reqs]


def req(p: str) -> GenerationRequest:
    return GenerationRequest(prompt=p, params=SamplingParams(max_new_tokens=2))


def test_concurrent_requests_are_batched_and_resolved_in_order():
    eng = RecordingEngine()
    b = Batcher(eng, max_batch=8, wait_s=0.05, limit=100)
    b.start()

    async def main():
        return await asyncio.gather(*(b.submit_many([req(f"u{i}")]) for i in range(6)))

    out = asyncio.run(main())
    b.stop()
    assert [o[0].text for o in out] == [f"U{i}" for i in range(6)]
    assert len(eng.batches) == 1 and sorted(eng.batches[0]) == [f"u{i}" for i in range(6)]
    assert b.depth == 0


def test_max_batch_splits_batches():
    eng = RecordingEngine()
    b = Batcher(eng, max_batch=2, wait_s=0.05, limit=100)
    b.start()

    async def main():
        return await b.submit_many([req(f"u{i}") for i in range(5)])

    out = asyncio.run(main())
    b.stop()
    assert [o.text for o in out] == [f"U{i}" for i in range(5)]
    assert [len(x) for x in eng.batches] == [2, 2, 1]


def test_bounded_queue_raises_overloaded_and_recovers():
    gate = threading.Event()
    eng = RecordingEngine(gate=gate)
    b = Batcher(eng, max_batch=4, wait_s=0.0, limit=3)
    b.start()

    async def main():
        first = asyncio.ensure_future(b.submit_many([req("a"), req("b")]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await b.submit_many([req("c"), req("d")])  # 2 + 2 > 3: nothing admitted
        assert b.depth == 2
        with pytest.raises(Overloaded):
            with b.reserve(2):
                pass
        gate.set()
        await first
        return await b.submit_many([req("e"), req("f"), req("g")])

    out = asyncio.run(main())
    b.stop()
    assert [o.text for o in out] == ["E", "F", "G"]
    assert b.depth == 0


def test_engine_exception_reaches_every_caller():
    class Boom:
        def generate(self, reqs):
            raise RuntimeError("engine down")

    b = Batcher(Boom(), max_batch=4, wait_s=0.01, limit=10)
    b.start()

    async def main():
        return await asyncio.gather(b.submit_many([req("a")]), b.submit_many([req("b")]), return_exceptions=True)

    out = asyncio.run(main())
    b.stop()
    assert all(isinstance(o, RuntimeError) for o in out)
    assert b.depth == 0

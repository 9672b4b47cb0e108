"""Feedback ingestion: acknowledged writes/s with SQLite synchronous=FULL, and zero
acknowledged writes lost across repeated ``kill -9`` of the server.

Starts the real server (``metarlhf serve``, embedded models, uvicorn, 127.0.0.1) in a
child process; separate client processes (or, with --client httpx, this process) send the load. Each POST /v1/feedback carries a unique
Idempotency-Key; a 202 answer means "durable" and its feedback id is recorded as
acknowledged. Phase 1 measures steady throughput. Phase 2 kills the server with
SIGKILL at a random moment while ``concurrency`` writes are in flight, restarts it,
and repeats; at the end every acknowledged id must be in the SQLite file.
Adaptation is switched off (threshold 10^9) so that only ingestion is measured.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/server_ingest.py
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing import Queue, get_context
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import ServerProcess, headers, write_result  # noqa: E402


async def hammer(url: str, seconds: float, concurrency: int, acked: list[str], users: int = 200) -> dict:
    """Send feedback with ``concurrency`` in-flight requests for ``seconds`` (or until the server dies)."""
    errors = {"http": 0, "conn": 0}
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers(), limits=limits, timeout=10) as client:

        async def worker(w: int) -> None:
            rng = random.Random(w)
            while time.perf_counter() < stop_at:
                body = {"user_id": f"user{rng.randrange(users)}", "prompt": f"q{rng.random()}",
                        "completion": "some answer text " * 4, "rating": rng.choice(["up", "down"])}
                try:
                    r = await client.post("/v1/feedback", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
                except httpx.HTTPError:
                    errors["conn"] += 1
                    return  # server gone
                if r.status_code == 202:
                    acked.append(r.json()["id"])
                else:
                    errors["http"] += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return errors


def _proc_worker(url: str, seconds: float, threads: int, seed: int, out: Queue) -> None:
    """One client process: ``threads`` blocking keep-alive connections (stdlib http.client)."""
    parsed = urlparse(url)
    acked: list[str] = []
    errors = {"http": 0, "conn": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        hdrs = {**headers(), "Content-Type": "application/json"}
        while time.perf_counter() < stop_at:
            body = json.dumps({"user_id": f"user{rng.randrange(200)}", "prompt": f"q{rng.random()}",
                               "completion": "some answer text " * 4, "rating": rng.choice(["up", "down"])})
            try:
                conn.request("POST", "/v1/feedback", body, {**hdrs, "Idempotency-Key": uuid.uuid4().hex})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    errors["conn"] += 1
                return  # server gone
            with lock:
                if r.status == 202:
                    acked.append(json.loads(data)["id"])
                else:
                    errors["http"] += 1

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((acked, errors))


def hammer_procs(url: str, seconds: float, concurrency: int, acked: list[str], procs: int = 2) -> dict:
    """Like :func:`hammer`, but from ``procs`` client processes of blocking threads.

    A single-process async httpx client spends more CPU per request than the server
    does, so on 2 cores it measures itself; separate processes keep it out of the way.
    """
    out: Queue = get_context("fork").Queue()
    per = max(1, concurrency // procs)
    ps = [get_context("fork").Process(target=_proc_worker, args=(url, seconds, per, i, out)) for i in range(procs)]
    for p in ps:
        p.start()
    errors = {"http": 0, "conn": 0}
    for _ in ps:
        got, errs = out.get()
        acked += got
        for k in errors:
            errors[k] += errs[k]
    for p in ps:
        p.join()
    return errors


def run_for(url: str, seconds: float, concurrency: int, acked: list[str], client: str = "procs") -> dict:
    if client == "procs":
        return hammer_procs(url, seconds, concurrency, acked)
    return asyncio.run(hammer(url, seconds, concurrency, acked))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="steady-throughput phase length")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--client", choices=["procs", "httpx"], default="procs",
                    help="procs: 2 client processes of blocking threads; httpx: one async httpx process")
    args = ap.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="metarlhf-ingest-"))
    srv = ServerProcess(work / "adapters", adapt_threshold=10**9)
    startup = srv.start()
    print(f"server ready in {startup:.1f}s at {srv.url}")

    # Phase 1: steady throughput (a warm-up second first).
    run_for(srv.url, 1.0, args.concurrency, [], args.client)
    acked: list[str] = []
    t0 = time.perf_counter()
    errs = run_for(srv.url, args.seconds, args.concurrency, acked, args.client)
    wall = time.perf_counter() - t0
    rate = len(acked) / wall
    print(f"steady: {len(acked)} acknowledged writes in {wall:.1f}s = {rate:.0f}/s (errors {errs})")

    # Phase 2: kill -9 while writes are in flight, restart, repeat.
    all_acked = list(acked)
    kills = []
    for k in range(args.kills):
        batch: list[str] = []
        delay = random.uniform(0.5, 2.0)
        client = threading.Thread(target=run_for, args=(srv.url, 60, args.concurrency, batch, args.client))
        client.start()
        time.sleep(delay)
        srv.kill9()  # SIGKILL mid-stream: requests are in flight
        client.join()
        kills.append({"round": k, "killed_after_s": round(delay, 2), "acked": len(batch)})
        all_acked += batch
        print(f"kill {k + 1}: -9 after {delay:.2f}s, {len(batch)} acknowledged this round")
        srv.start()
    srv.stop()

    db = work / "adapters" / "feedback.db"
    conn = sqlite3.connect(db)
    stored = {r[0] for r in conn.execute("SELECT id FROM feedback")}
    conn.close()
    lost = [i for i in all_acked if i not in stored]
    result = {
        "command": ".venv/bin/python benchmarks/server_ingest.py "
                   + " ".join(sys.argv[1:]),
        "machine": "2 CPU cores, server + client on the same host",
        "client": args.client,
        "sqlite": "WAL, synchronous=FULL, group commit",
        "steady": {"acked_writes": len(acked), "seconds": round(wall, 2), "writes_per_s": round(rate, 1),
                   "concurrency": args.concurrency, "errors": errs, "target_per_s": 500,
                   "met": rate >= 500},
        "kill9": {"kills": kills, "acknowledged_total": len(all_acked), "stored_rows": len(stored),
                  "acknowledged_lost": len(lost), "lost_ids": lost[:20]},
        "server_startup_s": round(startup, 2),
    }
    path = write_result("server_ingest.json", result)
    print(f"kill -9 x{args.kills}: {len(all_acked)} acknowledged, {len(lost)} lost; wrote {path}")
    return 0 if not lost else 1


if __name__ == "__main__":
    sys.exit(main())

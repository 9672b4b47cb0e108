"""Freshness: wall time on CPU from a user's K-th thumbs to the first completion served
with the adapter that those thumbs produced.

Starts the real server (``metarlhf serve``, embedded models, real background
adaptation: reward adapter then policy adapter from the meta-inits when shipped, from
scratch otherwise). For each of ``--users`` new users: K rounds of (chat completion ->
thumbs on it by completion_id, alternating up/down); the clock starts when the K-th
thumbs is acknowledged. The client then polls GET /v1/users/{id} every 0.25 s and,
as soon as a new policy version is serving, asks for a completion; the clock stops
when that completion returns and names the new version.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/server_freshness.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import ServerProcess, headers, write_result  # noqa: E402

PROMPTS = ["What is a good way to spend a weekend?", "Should I learn to cook?", "Tell me about the ocean.",
           "Give me advice on saving money.", "What do you think about cats?", "How do I stay focused?"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="thumbs that trigger adaptation (server threshold)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    work = Path(tempfile.mkdtemp(prefix="metarlhf-fresh-"))
    srv = ServerProcess(work / "adapters", adapt_threshold=args.k)
    srv.start()
    rows = []
    try:
        c = httpx.Client(base_url=srv.url, headers=headers(), timeout=600)
        for u in range(args.users):
            user = f"fresh{u}"
            for k in range(args.k):
                r = c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": PROMPTS[(u + k) % len(PROMPTS)]}], "user": user,
                    "max_tokens": args.max_tokens, "temperature": 0.7, "seed": k})
                r.raise_for_status()
                fb = c.post("/v1/feedback", json={"user_id": user, "completion_id": r.json()["id"],
                                                  "rating": "up" if k % 2 == 0 else "down"})
                assert fb.status_code == 202, fb.text
                if k == args.k - 1:
                    t_k = time.perf_counter()
            while True:
                info = c.get(f"/v1/users/{user}").json()
                job = info["job"]["latest"]
                if job and job["state"] == "failed":
                    raise RuntimeError(f"adaptation failed: {job['error']}")
                if info["serving"].get("source") == "own":
                    break
                time.sleep(0.25)
            t_live = time.perf_counter()
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPTS[0]}],
                                                     "user": user, "max_tokens": args.max_tokens, "temperature": 0})
            r.raise_for_status()
            t_served = time.perf_counter()
            assert r.json()["adapter"] == {"source": "own", "user_id": user, "version": 1}, r.json()["adapter"]
            row = {"user": user, "kth_thumbs_to_live_s": round(t_live - t_k, 2),
                   "kth_thumbs_to_first_served_s": round(t_served - t_k, 2),
                   "job_seconds": job["result"]["seconds"] if job and job.get("result") else None,
                   "policy_init": job["result"].get("policy_init") if job and job.get("result") else None,
                   "reward_init": info["reward"]["versions"][0]["metrics"].get("init")}
            rows.append(row)
            print(row)
    finally:
        srv.stop()
    served = [r["kth_thumbs_to_first_served_s"] for r in rows]
    result = {
        "command": ".venv/bin/python benchmarks/server_freshness.py "
                   + " ".join(sys.argv[1:]),
        "machine": "CPU only, 2 shared cores", "k": args.k, "users": rows,
        "median_kth_thumbs_to_first_served_s": round(float(np.median(served)), 2),
        "max_kth_thumbs_to_first_served_s": round(float(np.max(served)), 2),
    }
    path = write_result("server_freshness.json", result)
    print(f"median K-th thumbs -> first completion with the new adapter: {result['median_kth_thumbs_to_first_served_s']}s;"
          f" wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Completions under load: 16 concurrent users, each with its own LoRA adapter, on the
embedded SmolLM2-135M-Instruct, CPU, 64 new tokens per request.

Starts the real server (``metarlhf serve``) in a child process. Before it starts, 16
distinct policy adapters (r=8 on q_proj/v_proj, random A and B ~ N(0, 0.02): distinct
weights, the same compute as trained ones) are written into its adapter store with
:class:`metarlhf.store.AdapterStore`. Then 16 client tasks each send ``rounds``
requests back to back (closed loop, greedy, ``max_tokens=64``): once with
``user=u00..u15`` (16 distinct adapters, batched together by the dynamic batcher) and
once without ``user`` (base model, same batching). Reports p50/p99 latency and
completion tokens/s for both, and their throughput ratio (target >= 0.7).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/server_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_common import ROOT, ServerProcess, headers, write_result  # noqa: E402

DEFAULT_PROMPTS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def make_adapters(root: Path, users: list[str], seed: int = 0) -> None:
    import torch

    from metarlhf.adapters import Adapter
    from metarlhf.models import DEFAULT_POLICY_NAME, load_policy
    from metarlhf.policy import LORA_R, lora_config_dict
    from metarlhf.store import AdapterStore

    model, _ = load_policy()
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "v_proj")) and isinstance(m, torch.nn.Linear)}
    store = AdapterStore(root)
    g = torch.Generator().manual_seed(seed)
    for u in users:
        tensors = {}
        for name, (fin, fout) in shapes.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(LORA_R, fin, generator=g) * 0.02
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, LORA_R, generator=g) * 0.02
        store.save("bench", u, "policy", Adapter(tensors, lora_config_dict(DEFAULT_POLICY_NAME),
                                                 {"kind": "policy", "base_model": DEFAULT_POLICY_NAME,
                                                  "note": "random benchmark adapter"}))


async def run_load(url: str, users: list[str | None], prompts: list[str], rounds: int, max_tokens: int) -> dict:
    lat, toks = [], []
    async with httpx.AsyncClient(base_url=url, headers=headers(), timeout=600) as client:

        async def one_user(i: int, user: str | None) -> None:
            for r in range(rounds):
                body = {"messages": [{"role": "user", "content": prompts[(i * rounds + r) % len(prompts)]}],
                        "max_tokens": max_tokens, "temperature": 0}
                if user is not None:
                    body["user"] = user
                t0 = time.perf_counter()
                resp = await client.post("/v1/chat/completions", json=body)
                resp.raise_for_status()
                lat.append(time.perf_counter() - t0)
                toks.append(resp.json()["usage"]["completion_tokens"])
                if user is not None:
                    assert resp.json()["adapter"]["source"] == "own", resp.json()["adapter"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one_user(i, u) for i, u in enumerate(users)))
        wall = time.perf_counter() - t0
    return {"requests": len(lat), "wall_s": round(wall, 2), "completion_tokens": int(sum(toks)),
            "tokens_per_s": round(sum(toks) / wall, 2), "mean_tokens_per_request": round(float(np.mean(toks)), 1),
            "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
            "p99_latency_s": round(float(np.percentile(lat, 99)), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="requests per user per configuration")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    args = ap.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    from metarlhf.data import read_prompts

    prompts = [p[:300] for p in read_prompts(args.prompts, limit=200)]
    work = Path(tempfile.mkdtemp(prefix="metarlhf-load-"))
    users = [f"u{i:02d}" for i in range(args.users)]
    make_adapters(work / "adapters", users)
    srv = ServerProcess(work / "adapters", adapt_threshold=10**9, max_batch=args.users, queue_limit=4 * args.users,
                        engine_capacity=max(32, args.users))
    srv.start()
    try:
        # warm-up: load every adapter once (cache misses) and touch the base path
        asyncio.run(run_load(srv.url, users, prompts, 1, 2))
        asyncio.run(run_load(srv.url, [None] * args.users, prompts, 1, 2))
        base1 = asyncio.run(run_load(srv.url, [None] * args.users, prompts, args.rounds, args.max_tokens))
        print("base    ", base1)
        ad = asyncio.run(run_load(srv.url, users, prompts, args.rounds, args.max_tokens))
        print("adapters", ad)
        base2 = asyncio.run(run_load(srv.url, [None] * args.users, prompts, args.rounds, args.max_tokens))
        print("base    ", base2)
        stats = httpx.get(srv.url + "/metrics", headers=headers()).text
    finally:
        srv.stop()
    base_tps = (base1["tokens_per_s"] + base2["tokens_per_s"]) / 2
    ratio = ad["tokens_per_s"] / base_tps
    cache = {line.split()[0]: float(line.split()[1]) for line in stats.splitlines()
             if line.startswith("metarlhf_adapter_cache_")}
    result = {
        "command": ".venv/bin/python benchmarks/server_load.py " + " ".join(sys.argv[1:]),
        "machine": "CPU only, 2 shared cores; server and client on the same host",
        "model": "SmolLM2-135M-Instruct (embedded), engine backend bgmv, greedy",
        "users": args.users, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "adapters": ad, "base_before": base1, "base_after": base2,
        "throughput_ratio_vs_base": round(ratio, 3), "target_ratio": 0.7, "met": ratio >= 0.7,
        "engine_cache": cache,
    }
    path = write_result("server_load.json", result)
    print(f"ratio adapters/base = {ratio:.3f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

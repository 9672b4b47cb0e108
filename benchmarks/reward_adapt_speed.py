"""Wall time of one user's reward adaptation at K records (target: <= 2 s at K=8 on 2 CPU cores).

Loads the reward model once (as the server does), then times ``adapt_reward`` on K
support records of each held-out test user of the shipped init's split. The first
call per user includes tokenisation; every call includes reading the init from disk,
the encoder forward pass and the inner steps. Writes benchmarks/results/reward_adapt_speed.json.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_adapt_speed.py
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/personas")
    ap.add_argument("--init", default="adapters/meta/reward")
    ap.add_argument("--encoder", default=None, help="the init's encoder dir (default: embedded MiniLM)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/reward_adapt_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", " ".join([sys.executable, *sys.argv]))
    from metarlhf.data import group_by_user, load_records, make_task
    from metarlhf.reward import adapt_reward, load_reward_model

    split = json.loads((Path(args.init) / "split.json").read_text())
    records, _ = load_records(args.data)
    by_user = group_by_user(records)
    t0 = time.perf_counter()
    model = load_reward_model(args.encoder, adapter_dir=args.init)
    load_s = time.perf_counter() - t0
    cold, warm = [], []
    for u in split["test"][: args.users]:
        support = make_task(u, by_user[u], args.k, seed=0).support
        t0 = time.perf_counter()
        adapter = adapt_reward(support, init=args.init, encoder=model)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        adapt_reward(support, init=args.init, encoder=model)
        warm.append(time.perf_counter() - t0)
    res = {
        "k": args.k, "users": len(cold), "threads": args.threads, "steps": adapter.meta["steps"],
        "encoder": model.base_model, "init": args.init,
        "model_load_seconds": round(load_s, 3),
        "adapt_seconds_first_call": {"median": round(statistics.median(cold), 4), "max": round(max(cold), 4)},
        "adapt_seconds_repeat": {"median": round(statistics.median(warm), 4), "max": round(max(warm), 4)},
        "target_seconds": 2.0, "meets_target": max(cold) <= 2.0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

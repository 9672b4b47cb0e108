"""Pilot: choose the adaptation recipe on TRAINING simulated users (never the held-out ones).

Runs :func:`metarlhf.evaluate_policy.evaluate_policy` once per candidate recipe (loss
mix, lr, steps, trained layers) on a few users of ``TRAIN_USERS`` and prompts that
neither meta-training (0-63) nor the final eval (1000+) use, and writes one JSON with
every recipe's summary. Small on purpose (the CPU is shared): it ranks recipes, the
final numbers come from ``metarlhf eval policy`` on the held-out users.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_recipe_pilot.py \\
        --recipes '[{"name": "kto", "lr": 5e-4}, {"name": "kto+sft", "sft_weight": 1.0}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"))
    ap.add_argument("--offset", type=int, default=500, help="pilot prompts start here (meta: 0-63, eval: 1000+)")
    ap.add_argument("--users", default="bullets,casual,concise-15", help="TRAIN users only")
    ap.add_argument("--k", type=int, nargs="+", default=[16])
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--methods", default="scratch")
    ap.add_argument("--explore", nargs="+", default=["hints"])
    ap.add_argument("--recipes", required=True, help="JSON list of {name, lr, steps, kto_weight, sft_weight, ...}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_recipe_pilot.json"))
    args = ap.parse_args()
    command = " ".join([sys.executable, *sys.argv])
    print("command: " + command, flush=True)

    import torch

    from metarlhf.data import read_prompts
    from metarlhf.evaluate_policy import EvalConfig, evaluate_policy
    from metarlhf.io import atomic_write_json
    from metarlhf.models import load_policy
    from metarlhf.simusers import get_training_users

    torch.set_num_threads(2)
    users = get_training_users(args.users)
    names = [u.name for u in users]
    recipes = json.loads(args.recipes)
    model, tok = load_policy()
    n_train = -(-max(args.k) // 2)
    prompts = read_prompts(args.prompts, limit=args.offset + n_train + args.eval_prompts)[args.offset:]
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    for r in recipes:
        r = dict(r)
        name = r.pop("name")
        cfg = EvalConfig(ks=args.k, eval_prompts=args.eval_prompts, methods=args.methods.split(","),
                         explore=args.explore, allow_seen=True, **r)  # pilots run on training users
        t0 = time.perf_counter()
        got = evaluate_policy(users, prompts, cfg, base=(model, tok), progress=False)
        run = {"recipe": name, "params": r, "users": names, "summary": got["summary"],
               "base_relevance": got.get("base_relevance"),
               "base_repeat_opening_rate": got.get("base_repeat_opening_rate"),
               "per_user": [{k: row[k] for k in ("user", "k", "explore", "method", "n_up", "win_rate", "mean_reward",
                                                 "base_mean_reward", "adapt_s", "nll_personal", "nll_base", "hint_credit", "distill_hints",
                                                 "n_distilled", "distill_s", "explore_s", "fluent_win_rate",
                                                 "fluency_drop_rate", "relevance", "repeat_opening_rate",
                                                 "answers") if k in row}
                            for row in got["rows"]],
               "wall_s": round(time.perf_counter() - t0, 1), "command": command}
        res["runs"].append(run)
        atomic_write_json(out, res)
        for s in got["summary"]:
            print(f"{name:>24} {s['method']:>8} {s['explore']:>5} K={s['k']:<3} win {s['win_rate']:.3f} "
                  f"reward {s['mean_reward']:+.3f} (base {s['base_mean_reward']:+.3f}) adapt {s['adapt_s']:.1f} s "
                  f"relevance {s.get('relevance', float('nan')):.3f} (base {got['base_relevance'] if got.get('base_relevance') is not None else float('nan'):.3f}) "
                  f"repeat openings {s.get('repeat_opening_rate', float('nan')):.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is the adapted reward head's threshold what costs accuracy? (issue 2 idea check)

``eval reward`` (session 23) found the shipped MiniLM init's ``meta`` ranks the test personas'
query records far better than it classifies them: AUC 0.875 against accuracy 0.815 at K=8,
0.912 against 0.851 at K=32. This probe keeps ``eval reward``'s ``meta`` fit (same draws:
``user_splits``, 2 seeds, up to 200 query records, the init's own inner loop) and changes only
the threshold, set from the *support* records after adaptation (never from the query labels):

* ``as_is``: the adapted bias (``eval reward``'s ``meta``);
* ``support_median``: the threshold at the median support score (``eval reward``'s supports
  are balanced, half up);
* ``support_mid``: halfway between the mean support score of the ups and of the downs.

The choice rule is fixed here, before any test persona is scored: the best mean over the four
K on the 10 *validation* personas; ``--test`` then scores the 20 test personas once, for the
chosen rule and ``as_is``.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_threshold_probe.py
    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_threshold_probe.py --test --rules support_mid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("as_is", "support_median", "support_mid")


def threshold(rule: str, support_scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The score above which a record counts as thumbs up, from the support records only."""
    if rule == "as_is":
        return 0.0
    if rule == "support_median":
        return float(support_scores.median())
    up, down = support_scores[labels > 0.5], support_scores[labels <= 0.5]
    if not len(up) or not len(down):
        return 0.0
    return float((up.mean() + down.mean()) / 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/personas"))
    ap.add_argument("--init", default=str(ROOT / "adapters/meta/reward"))
    ap.add_argument("--test", action="store_true", help="score the 20 test personas (after choosing on validation)")
    ap.add_argument("--rules", nargs="*", default=None, help="rules to score (default: all); as_is is always added")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)

    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import EmbeddingCache, user_splits
    from metarlhf.io import atomic_write_json
    from metarlhf.reward import RewardModel, adapt_head, load_reward_model, records_accuracy

    t0 = time.perf_counter()
    init = Path(args.init)
    model = load_reward_model(None, adapter_dir=init)
    params, log_lrs = model.adapter_params(), model.inner_log_lrs
    steps = int(model.init_meta.get("inner_steps", 5))
    resid_l2 = float(model.init_meta.get("inner_resid_l2", 0.0))
    emb = EmbeddingCache(model, params)
    group = "test" if args.test else "val"
    users = json.loads((init / "split.json").read_text())[group]
    rules = list(dict.fromkeys(["as_is", *(args.rules or RULES)]))
    if any(r not in RULES for r in rules):
        print(f"error: --rules takes {', '.join(RULES)}", file=sys.stderr)
        raise SystemExit(2)
    by_user = group_by_user(load_records(args.data)[0])
    ks = sorted(args.ks)
    acc: dict[str, dict[str, dict[int, list[float]]]] = {r: {u: {k: [] for k in ks} for u in users} for r in rules}
    for u in users:
        for seed in range(args.seeds):
            query, supports = user_splits(u, by_user[u], ks, seed, 200)
            q = model.encode_records(query)
            eq = emb(q.ids)
            for k in ks:
                s = model.encode_records(supports[k])
                es = emb(s.ids)
                head, _ = adapt_head(es, s, params, log_lrs, steps, resid_l2)
                with torch.no_grad():
                    ss, sq = RewardModel.head_scores(head, es), RewardModel.head_scores(head, eq)
                sup = ss[s.thumb_idx]
                for r in rules:
                    acc[r][u][k].append(records_accuracy(sq - threshold(r, sup, s.thumb_labels), q))
        print(u, {r: round(sum(acc[r][u][ks[1]]) / args.seeds, 3) for r in rules}, f"{time.perf_counter() - t0:.0f} s",
              flush=True)

    def mean(r: str, k: int) -> float:
        return sum(sum(acc[r][u][k]) / len(acc[r][u][k]) for u in users) / len(users)

    table = {r: {str(k): round(mean(r, k), 4) for k in ks} for r in rules}
    overall = {r: round(sum(mean(r, k) for k in ks) / len(ks), 4) for r in rules}
    paired = {}
    for r in rules[1:]:
        paired[r] = {}
        for k in ks:
            d = [(sum(acc[r][u][k]) - sum(acc["as_is"][u][k])) / args.seeds for u in users]
            m = sum(d) / len(d)
            se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
            paired[r][str(k)] = {"mean": round(m, 4), "se": round(se, 4)}
    result = {
        "command": cmd, "what": __doc__.split("\n")[0], "group": group, "users": users, "seeds": args.seeds,
        "init": str(init), "steps": steps, "acc": table, "mean_over_k": overall,
        "best_by_mean_over_k": max(rules, key=lambda r: overall[r]), "minus_as_is_paired": paired,
        "per_user": {r: {u: {str(k): round(sum(a) / len(a), 4) for k, a in acc[r][u].items()} for u in users}
                     for r in rules},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for r in rules:
        print(f"{r:>15}", table[r], overall[r], flush=True)
    print("paired vs as_is:", json.dumps(paired), flush=True)
    atomic_write_json(args.out or ROOT / f"benchmarks/results/reward_threshold_{group}.json", result)


if __name__ == "__main__":
    main()

"""Do the two shipped reward inits err on different records? (issue 2 idea check)

Both shipped reward inits adapt only a head on fixed meta-trained features: MiniLM
(``adapters/meta/reward``, 5 Meta-SGD steps) and SmolLM2 (``adapters/meta/reward-smollm2``,
20 steps). Session 6's frozen-feature probe found the two encoders' features worth 1.5-2.5
points together over either alone at K=32 on the validation personas. This script fits both
heads on *the same* support records (``eval reward``'s draws: ``user_splits``, 2 seeds, up to
200 query records), exactly as ``eval reward``'s ``meta`` does for each init, and scores the
query records with a mix of the two heads' logits:

* ``w=a``: ``a * smollm2 + (1 - a) * minilm`` on the raw logits (both are logistic-loss
  logits, so on one log-odds scale; ``w=1`` is the SmolLM2 init alone, ``w=0`` MiniLM alone,
  and these two rows reproduce ``eval reward``'s ``meta`` for each init);
* ``std``: each model's logits divided by their standard deviation over the user's *support*
  records (label-free), then summed.

The choice rule is fixed here, before any test persona is scored: the best mean over the
four K on the 10 *validation* personas. ``--test`` then scores the 20 test personas, for
the chosen variant and the two single inits.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_ensemble.py
    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_ensemble.py --test --variants w=0.8
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from metarlhf.reward import RewardModel, adapt_head, records_accuracy  # noqa: E402

WEIGHTS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


class Fitted:
    """One init: its model, parameters, rates, step count and a cache of its features."""

    def __init__(self, model: RewardModel):
        from metarlhf.evaluate_reward import EmbeddingCache

        self.model = model
        self.params, self.log_lrs = model.adapter_params(), model.inner_log_lrs
        self.steps = int(model.init_meta.get("inner_steps", 5))
        self.resid_l2 = float(model.init_meta.get("inner_resid_l2", 0.0))
        self.emb = EmbeddingCache(model, self.params)

    def scores(self, support: list, query: list) -> tuple[torch.Tensor, torch.Tensor, object]:
        """``eval reward``'s meta: the head fitted on ``support``; logits on support and query."""
        s, q = self.model.encode_records(support), self.model.encode_records(query)
        es, eq = self.emb(s.ids), self.emb(q.ids)
        head, _ = adapt_head(es, s, self.params, self.log_lrs, self.steps, self.resid_l2)
        with torch.no_grad():
            return RewardModel.head_scores(head, es), RewardModel.head_scores(head, eq), q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/personas"))
    ap.add_argument("--test", action="store_true", help="score the 20 test personas (after choosing on validation)")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="variants to score (default: every w and std); w=0 and w=1 are always added")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)

    from reward_smol_top_lora import PrefixCachedRewardModel

    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import user_splits
    from metarlhf.io import atomic_write_bytes
    from metarlhf.models import resolve_policy_dir
    from metarlhf.reward import load_reward_model

    t0 = time.perf_counter()
    mini_dir, smol_dir = ROOT / "adapters/meta/reward", ROOT / "adapters/meta/reward-smollm2"
    smol_model = PrefixCachedRewardModel(resolve_policy_dir(None), 20, 4)
    smol_model.load_adapter_dir(smol_dir)
    mini, smol = Fitted(load_reward_model(None, adapter_dir=mini_dir)), Fitted(smol_model)
    splits = [json.loads((d / "split.json").read_text()) for d in (mini_dir, smol_dir)]
    group = "test" if args.test else "val"
    if splits[0][group] != splits[1][group]:
        raise SystemExit("the two inits were made on different user splits")
    users = splits[0][group]
    variants = args.variants if args.variants is not None else [f"w={a:g}" for a in WEIGHTS] + ["std"]
    variants = list(dict.fromkeys(["w=0", "w=1", *variants]))
    by_user = group_by_user(load_records(args.data)[0])
    ks = sorted(args.ks)
    acc: dict[str, dict[str, dict[int, list[float]]]] = {v: {} for v in variants}
    for u in users:
        for seed in range(args.seeds):
            query, supports = user_splits(u, by_user[u], ks, seed, 200)
            for k in ks:
                ms, mq, enc = mini.scores(supports[k], query)
                ss, sq, _ = smol.scores(supports[k], query)
                for v in variants:
                    if v == "std":
                        mix = mq / ms.std().clamp_min(1e-6) + sq / ss.std().clamp_min(1e-6)
                    else:
                        a = float(v.split("=")[1])
                        mix = a * sq + (1 - a) * mq
                    acc[v].setdefault(u, {}).setdefault(k, []).append(records_accuracy(mix, enc))
        print(u, {v: round(sum(acc[v][u][ks[-1]]) / args.seeds, 3) for v in ("w=0", "w=1", variants[-1])},
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    def mean(v: str, k: int) -> float:
        return sum(sum(acc[v][u][k]) / len(acc[v][u][k]) for u in users) / len(users)

    table = {v: {str(k): round(mean(v, k), 4) for k in ks} for v in variants}
    overall = {v: round(sum(mean(v, k) for k in ks) / len(ks), 4) for v in variants}
    chosen = max((v for v in variants if v not in ("w=0", "w=1")), key=lambda v: overall[v], default=None)
    paired = {}
    if chosen is not None:  # per-persona paired gain of the chosen mix over the better single init
        for k in ks:
            d = [sum(acc[chosen][u][k]) / args.seeds - sum(acc["w=1"][u][k]) / args.seeds for u in users]
            m = sum(d) / len(d)
            se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
            paired[str(k)] = {"mean": round(m, 4), "se": round(se, 4)}
    result = {
        "command": cmd, "what": __doc__.split("\n")[0], "group": group, "users": users, "seeds": args.seeds,
        "inits": {"minilm": str(mini_dir.relative_to(ROOT)), "smollm2": str(smol_dir.relative_to(ROOT))},
        "steps": {"minilm": mini.steps, "smollm2": smol.steps},
        "acc": table, "mean_over_k": overall, "best_mix_by_mean_over_k": chosen,
        "best_mix_minus_smollm2_paired": paired,
        "per_user": {v: {u: {str(k): round(sum(a) / len(a), 4) for k, a in acc[v][u].items()} for u in users}
                     for v in variants},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for v in variants:
        print(f"{v:>6}", table[v], overall[v], flush=True)
    print("best mix:", chosen, "paired vs smollm2:", paired, flush=True)
    out = Path(args.out or ROOT / f"benchmarks/results/reward_ensemble_{group}.json")
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()

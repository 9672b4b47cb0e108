"""A neighbour prior for the reward head: start a new user from the heads of similar known users (issue 2).

The shipped init adapts a new user's head from the *mean* training head (plus a
32-d subspace and a residual). This script asks whether a user-specific start helps:
each training persona's own head (L2 logistic regression, C=1, on ``--head-records``
of its records, on the init's LoRA features) is a candidate, and so is its negation
(personas come in near-opposite pairs). The support set's log-likelihood under each
candidate (logits scaled by ``tau``) gives posterior weights, and the prior head is
their weighted mean. Methods:

* ``meta``: the shipped inner loop from the init's mean head (reproduces ``eval reward``);
* ``prior``: the neighbour prior alone, no steps;
* ``prior+adapt``: the shipped inner loop (same steps and rates) started from the prior.

Same protocol as ``eval reward`` (same query / support draws, 2 seeds, 200 query
records). Choose ``tau`` on the ``val`` personas, then read ``test``.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_neighbour_prior.py
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


def neighbour_prior(heads: torch.Tensor, x: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-weighted mean of candidate heads [n, d+1] given support features x [m, d], labels y [m]."""
    logits = tau * (x @ heads[:, :-1].T + heads[:, -1])  # [m, n]
    sign = 2 * y.unsqueeze(1) - 1  # [m, 1]
    ll = torch.nn.functional.logsigmoid(sign * logits).sum(0)  # [n]
    w = torch.softmax(ll, 0)
    return w @ heads, w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/personas"))
    ap.add_argument("--init", default=str(ROOT / "adapters/meta/reward"))
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--head-records", type=int, default=256)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/reward_neighbour_prior.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)
    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import EmbeddingCache, pair_features, user_splits
    from metarlhf.io import atomic_write_json
    from metarlhf.meta import fit_user_heads
    from metarlhf.reward import RewardModel, adapt_head, load_reward_model, records_accuracy

    t0 = time.perf_counter()
    init = Path(args.init)
    split = json.loads((init / "split.json").read_text())
    records, _ = load_records(args.data)
    by_user = group_by_user(records)
    model = load_reward_model(None, adapter_dir=init)
    meta = model.init_meta
    params, log_lrs = model.adapter_params(), model.inner_log_lrs
    steps, resid_l2 = int(meta.get("inner_steps", 5)), float(meta.get("inner_resid_l2", 0.0))
    heads = fit_user_heads(model, by_user, split["train"], args.head_records, params=params, progress=True)
    cands = torch.cat([heads, -heads])  # a persona and its opposite
    print(f"{len(heads)} training heads in {time.perf_counter() - t0:.0f} s", flush=True)
    emb = EmbeddingCache(model, params)
    methods = ["meta", *(f"prior@{t}" for t in args.taus), *(f"prior+adapt@{t}" for t in args.taus)]
    result: dict = {"command": cmd, "head_records": args.head_records, "steps": steps, "splits": {}}
    for part in args.splits:
        acc = {m: {k: [] for k in args.ks} for m in methods}
        top: dict[str, list] = {}
        for u in split[part]:
            for seed in range(args.seeds):
                query, supports = user_splits(u, by_user[u], args.ks, seed, 200)
                q = model.encode_records(query)
                qe = emb(q.ids)
                for k in args.ks:
                    s = model.encode_records(supports[k])
                    se = emb(s.ids)
                    a, _ = adapt_head(se, s, params, log_lrs, steps, resid_l2)
                    acc["meta"][k].append(records_accuracy(RewardModel.head_scores(a, qe), q))
                    x, y = pair_features(se, s)
                    for t in args.taus:
                        prior, w = neighbour_prior(cands, x, y, t)
                        acc[f"prior@{t}"][k].append(records_accuracy(qe @ prior[:-1] + prior[-1], q))
                        p0 = {**params, "head.weight": prior[:-1].unsqueeze(0), "head.bias": prior[-1:]}
                        a, _ = adapt_head(se, s, p0, log_lrs, steps, resid_l2)
                        acc[f"prior+adapt@{t}"][k].append(records_accuracy(RewardModel.head_scores(a, qe), q))
                        if k == 8 and seed == 0 and t == 1.0:
                            best = torch.topk(w, 3)
                            names = split["train"] + [f"NOT {n}" for n in split["train"]]
                            top[u] = [(names[i], round(float(v), 3)) for v, i in zip(best.values, best.indices, strict=True)]
            print(part, u, {m: round(acc[m][8][-1], 3) for m in methods}, flush=True)
        result["splits"][part] = {
            "users": split[part],
            "mean": {m: {str(k): round(sum(v) / len(v), 4) for k, v in acc[m].items()} for m in methods},
            "top_neighbours_k8_seed0_tau1": top,
        }
        print(part, json.dumps(result["splits"][part]["mean"]), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(Path(args.out), result)
    print("wrote", args.out, result["seconds"], "s")


if __name__ == "__main__":
    main()

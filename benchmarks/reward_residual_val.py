"""Choose the residual inner learning rate of a subspace reward init on the VALIDATION personas (issue 2).

The subspace init adapts only z (r=32 coordinates of the head in a meta-learned basis)
and the bias. "Subspace + residual" also moves a full residual ``head.r`` [hidden] from 0
at rate ``alpha_r`` (with an optional L2 pull ``l2``): ``w = w0 + z @ B + r`` (see
:mod:`metarlhf.reward`). This script measures, on the validation personas of the
init's split only, with ``eval reward``'s protocol (same query / support draws, 2 seeds,
200 query records, K = 4 8 16 32), the meta accuracy for a grid of ``alpha_r``, ``l2``
and inner-step counts, using the project's own inner loop (:func:`metarlhf.reward.adapt_head`)
on the init's LoRA features (computed once per record; the inner loop moves only the head).

The choice: the grid point with the best mean accuracy over K *at the init's own step
count* (so the step budget of ``scratch``, and the adaptation time, do not change).
``--write-init DIR`` writes the init with that residual rate added
(``meta_sgd.log_lr.head.r``, the same value for every coordinate) and
``inner_residual`` / ``inner_resid_l2`` / ``residual_choice`` in its metadata; everything
else is copied unchanged (LoRA, w0, b0, basis, the rates of z and the bias, split.json).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_residual_val.py \\
        --write-init /tmp/metarlhf-r3/reward_resid
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/personas")
    ap.add_argument("--init", default="adapters/meta/reward")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0, 30.0, 100.0])
    ap.add_argument("--l2s", type=float, nargs="+", default=[0.0, 0.003, 0.01])
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="default: the init's, x2, x4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/reward_residual_val.json")
    ap.add_argument("--write-init", default=None, help="write the init with the chosen residual rate here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)
    from metarlhf.adapters import load_adapter, save_adapter
    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import EmbeddingCache, user_splits
    from metarlhf.io import atomic_write_json
    from metarlhf.reward import LR_PREFIX, R_KEY, RewardModel, adapt_head, load_reward_model, records_accuracy

    t0 = time.perf_counter()
    init = Path(args.init)
    split = json.loads((init / "split.json").read_text())
    by_user = group_by_user(load_records(args.data)[0])
    model = load_reward_model(None, adapter_dir=init)
    if model.init_meta.get("inner") != "subspace" or model.head_basis is None:
        raise SystemExit(f"{init}: not a subspace init")
    params, log_lrs = model.adapter_params(), dict(model.inner_log_lrs)
    log_lrs.pop(R_KEY, None)
    init_steps = int(model.init_meta.get("inner_steps", 5))
    steps_grid = args.steps or [init_steps, 2 * init_steps, 4 * init_steps]
    emb = EmbeddingCache(model, params)
    tasks = []  # (query enc, {k: support enc}) per val user and seed
    for u in split["val"]:
        for seed in range(args.seeds):
            query, supports = user_splits(u, by_user[u], args.ks, seed, 200)
            tasks.append((model.encode_records(query), {k: model.encode_records(s) for k, s in supports.items()}))
            emb(tasks[-1][0].ids)
            for s in tasks[-1][1].values():
                emb(s.ids)
    print(f"val embeddings in {time.perf_counter() - t0:.0f}s", flush=True)
    hidden = model.hidden_size
    grid = []
    for steps, rate, l2 in itertools.product(steps_grid, args.rates, args.l2s):
        if rate == 0.0 and l2 != args.l2s[0]:
            continue  # no residual: l2 is irrelevant
        lrs = dict(log_lrs) | ({R_KEY: torch.full((hidden,), math.log(rate))} if rate > 0 else {})
        acc = {}
        for k in args.ks:
            a = []
            for q, sup in tasks:
                adapted, _ = adapt_head(emb(sup[k].ids), sup[k], params, lrs, steps, l2)
                a.append(records_accuracy(RewardModel.head_scores(adapted, emb(q.ids)), q))
            acc[str(k)] = round(sum(a) / len(a), 4)
        row = {"steps": steps, "alpha_r": rate, "l2": l2, "acc": acc, "mean": round(sum(acc.values()) / len(acc), 4)}
        grid.append(row)
        print(json.dumps(row), flush=True)
    at_budget = [g for g in grid if g["steps"] == init_steps]
    best = max(at_budget, key=lambda g: g["mean"])
    none = next(g for g in at_budget if g["alpha_r"] == 0.0)
    res = {"what": "meta accuracy on the VALIDATION personas for a grid of residual rates (eval reward protocol)",
           "init": str(init), "val_users": split["val"], "seeds": args.seeds, "init_steps": init_steps,
           "no_residual": none, "chosen": best, "grid": grid, "command": cmd,
           "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(Path(args.out), res)
    print("no residual:", json.dumps(none), "\nchosen:", json.dumps(best))
    if args.write_init:
        if best["alpha_r"] == 0.0:
            raise SystemExit("the residual does not help on validation; no init written")
        ad = load_adapter(init)
        ad.tensors[LR_PREFIX + R_KEY] = torch.full((hidden,), math.log(best["alpha_r"]))
        ad.meta |= {"inner_residual": True, "inner_resid_l2": best["l2"],
                    "residual_choice": {"alpha_r": best["alpha_r"], "l2": best["l2"], "val_acc": best["acc"],
                                        "val_acc_no_residual": none["acc"], "chosen_by": cmd,
                                        "from_init_sha256": ad.meta.get("sha256")}}
        ad.meta.pop("sha256", None)
        extra = {n: (init / n).read_bytes() for n in ("split.json", "metrics.jsonl") if (init / n).is_file()}
        save_adapter(args.write_init, ad, extra_files=extra)
        print("wrote", args.write_init)


if __name__ == "__main__":
    main()

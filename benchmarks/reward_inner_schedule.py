"""Does the reward inner loop under-fit at large K? (issue 2 idea check, validation personas)

The shipped reward inits adapt only the head, on fixed meta-trained embeddings: a fixed
number of Meta-SGD steps (5 as meta-trained; the SmolLM2 init uses 20 since session 10,
chosen with this script) on the subspace coordinates, the bias and the residual, whatever
K is. Early-stopped gradient descent on the *mean* loss keeps roughly the same pull towards
the init at K=32 as at K=4, while a Bayesian fit with a fixed prior trusts 32 records more
than 4. This script
scores, on the 10 *validation* personas (the test personas are untouched unless
``--test`` is given), with ``eval reward``'s own draws (``user_splits``, 2 seeds, up to
200 query records), these head fits on the init's own embeddings:

* ``steps=T``: T Meta-SGD steps with the init's learned rates (as meta-trained: T=5);
* ``scaled=c``: ``round(c * K)`` steps (more steps with more records);
* ``map=s``: the MAP fit (L-BFGS, one call of up to 200 iterations; convergence is not
  checked) of the summed record loss plus the
  Gaussian prior ``0.5 * sum_k theta_k^2 / (s * lr_k)`` over the inner parameters, whose
  variances are the learned rates (a per-parameter prior: what early stopping with those
  rates approximates, but with a fixed prior, so more records pull further from it).

Writes a JSON of accuracies per variant and K; the ``steps=T`` row reproduces ``eval
reward``'s ``meta`` row for an init whose metadata says T inner steps.

``--ceiling N`` instead fits the head on the first N (file order) of each persona's
records that are not among its 200 seed-0 query records, and scores those query records:
a supervised ceiling for a head on these frozen features, like ``logreg_meta`` in
``reward_supervised_ceiling.py`` (which shuffles the other records before capping them):
logistic regression (C=1) and the ``map`` fits (the best prior scale is picked on the same
query records, so it is an optimistic figure).

``--then-lora LR ...`` instead follows the init's own head fit with ``--lora-steps`` Adam
steps on LoRA + head at each LR (``adapt_params``, as ``eval reward``'s scratch but from
the fitted meta-init), on the ``--ks`` support sets: does adapting the encoder per user help?

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_inner_schedule.py --encoder smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metarlhf.reward import (  # noqa: E402
    RewardModel,
    adapt_head,
    inner_keys,
    materialise_head,
    records_accuracy,
    records_loss,
    residual_penalty,
    with_inner_start,
)


def map_head(emb: torch.Tensor, enc: Any, params: dict[str, torch.Tensor], log_lrs: dict[str, torch.Tensor],
             scale: float, resid_l2: float = 0.0) -> dict[str, torch.Tensor]:
    """MAP fit of the inner parameters (from 0 for z and r, from the init for the bias) under
    the prior N(init, scale * lr_k) per parameter, summed record loss; one L-BFGS call of up
    to 200 iterations (convergence not checked)."""
    keys = inner_keys(params, log_lrs)
    params = with_inner_start(params, keys)
    start = {k: params[k].detach().double() for k in keys}
    var = {k: (torch.exp(log_lrs[k].detach().double()) * scale).expand_as(start[k]) for k in keys}
    theta = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    fixed = {k: v.detach().double() for k, v in params.items() if k not in keys}
    emb = emb.double()
    n = len(enc.thumb_idx) + len(enc.chosen_idx)
    opt = torch.optim.LBFGS(list(theta.values()), max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = records_loss(RewardModel.head_scores({**fixed, **theta}, emb), enc) * n
        prior = sum(0.5 * ((theta[k] - start[k]) ** 2 / var[k]).sum() for k in keys)
        total = loss + prior + n * residual_penalty(theta, resid_l2)  # adapt_head's L2 on head.r, summed form
        total.backward()
        return total

    opt.step(closure)
    return materialise_head({**fixed, **{k: v.detach() for k, v in theta.items()}})


def user_draws(model: RewardModel, emb: Any, recs: list, user: str, ks: list[int], seeds: int) -> Iterator[tuple]:
    """``eval reward``'s draws for one user: ``(seed, K, query, query embeddings, support,
    support embeddings)`` for every seed and K (embeddings under the init's parameters)."""
    from metarlhf.evaluate_reward import user_splits

    for seed in range(seeds):
        query, supports = user_splits(user, recs, ks, seed, 200)
        q = model.encode_records(query)
        eq = emb(q.ids)
        for k in ks:
            s = model.encode_records(supports[k])
            yield seed, k, q, eq, s, emb(s.ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/personas"))
    ap.add_argument("--encoder", choices=["minilm", "smollm2"], default="smollm2")
    ap.add_argument("--steps", type=int, nargs="*", default=[5, 10, 20, 40])
    ap.add_argument("--scaled", type=float, nargs="*", default=[0.5, 1.0])
    ap.add_argument("--map", type=float, nargs="*", default=[0.3, 1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--test", action="store_true", help="score the 20 test personas instead (after choosing)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ceiling", type=int, default=None, help="supervised: fit on up to N non-query records")
    ap.add_argument("--then-lora", type=float, nargs="*", default=None, metavar="LR",
                    help="after the init's own head fit, Adam on LoRA + head at each LR (the encoder adapted per user)")
    ap.add_argument("--lora-steps", type=int, default=10)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)

    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import EmbeddingCache, user_splits
    from metarlhf.models import resolve_policy_dir
    from metarlhf.reward import load_reward_model

    t_start = time.perf_counter()
    if args.encoder == "smollm2":
        from reward_smol_top_lora import PrefixCachedRewardModel

        init = ROOT / "adapters/meta/reward-smollm2"
        model = PrefixCachedRewardModel(resolve_policy_dir(None), 20, 4)
        model.load_adapter_dir(init)
    else:
        init = ROOT / "adapters/meta/reward"
        model = load_reward_model(None, adapter_dir=init)
    split = json.loads((init / "split.json").read_text()) if (init / "split.json").is_file() else model.init_meta["split"]
    users = split["test" if args.test else "val"]
    by_user = group_by_user(load_records(args.data)[0])
    params, log_lrs = model.adapter_params(), model.inner_log_lrs
    resid_l2 = float(model.init_meta.get("inner_resid_l2", 0.0))
    emb = EmbeddingCache(model, params)
    ks = sorted(args.ks)
    if args.then_lora is not None:
        from metarlhf.reward import adapt_params

        steps = int(model.init_meta.get("inner_steps", 5))
        rows = {"head": {k: [] for k in ks}, **{f"lora_lr={lr:g}": {k: [] for k in ks} for lr in args.then_lora}}
        for u in users:
            for seed, k, q, eq, s, es in user_draws(model, emb, by_user[u], u, ks, args.seeds):
                head, _ = adapt_head(es, s, params, log_lrs, steps, resid_l2)  # eval reward's meta
                rows["head"][k].append(records_accuracy(RewardModel.head_scores(head, eq), q))
                for lr in args.then_lora:
                    tuned, _ = adapt_params(model, s, head, {}, args.lora_steps, seed=seed, adam_lr=lr)
                    with torch.no_grad():
                        sc = RewardModel.head_scores(tuned, model.embed_ids(q.ids, tuned, 64))
                    rows[f"lora_lr={lr:g}"][k].append(records_accuracy(sc, q))
            print(u, {v: round(r[ks[-1]][-1], 3) for v, r in rows.items()}, f"{time.perf_counter() - t_start:.0f} s",
                  flush=True)
        result = {"command": cmd, "what": "the init's head fit, then Adam on LoRA + head (encoder adapted per user)",
                  "encoder": model.base_model, "init": str(init.relative_to(ROOT)), "group": "test" if args.test else "val",
                  "users": users, "seeds": args.seeds, "head_steps": steps, "lora_steps": args.lora_steps,
                  "acc": {v: {str(k): round(sum(a) / len(a), 4) for k, a in r.items()} for v, r in rows.items()},
                  "wall_s": round(time.perf_counter() - t_start, 1)}
        print(json.dumps(result["acc"]), flush=True)
        group = "_test" if args.test else ""
        out = Path(args.out or ROOT / f"benchmarks/results/reward_then_lora_{args.encoder}{group}.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.ceiling:
        from metarlhf.evaluate_reward import fit_logistic_regression, pair_features

        rows: dict[str, list[float]] = {"logreg": [], **{f"map={s:g}": [] for s in args.map}}
        for u in users:
            query, _ = user_splits(u, by_user[u], ks, 0, 200)
            qset = {id(r) for r in query}
            train = [r for r in by_user[u] if id(r) not in qset][: args.ceiling]
            q, t = model.encode_records(query), model.encode_records(train)
            eq, et = emb(q.ids), emb(t.ids)
            x, y = pair_features(et, t)
            wb = fit_logistic_regression(x, y)
            rows["logreg"].append(records_accuracy(eq @ wb[:-1] + wb[-1], q))
            for s in args.map:
                head = {kk: vv.float() for kk, vv in map_head(et, t, params, log_lrs, s, resid_l2).items()}
                rows[f"map={s:g}"].append(records_accuracy(RewardModel.head_scores(head, eq), q))
            print(u, len(train), {v: round(a[-1], 3) for v, a in rows.items()}, f"{time.perf_counter() - t_start:.0f} s",
                  flush=True)
        result = {"command": cmd, "what": "supervised ceiling of a head on the init's frozen features",
                  "encoder": model.base_model, "init": str(init.relative_to(ROOT)), "group": "test" if args.test else "val",
                  "train_records_cap": args.ceiling, "users": users,
                  "mean": {v: round(sum(a) / len(a), 4) for v, a in rows.items()},
                  "personas_at_or_above_0.92": {v: sum(x >= 0.92 for x in a) for v, a in rows.items()},
                  "per_user": {v: dict(zip(users, (round(x, 4) for x in a), strict=True)) for v, a in rows.items()},
                  "wall_s": round(time.perf_counter() - t_start, 1)}
        print(json.dumps(result["mean"]), flush=True)
        group = "" if args.test else "_val"  # test: the committed file names
        out = Path(args.out or ROOT / f"benchmarks/results/reward_head_ceiling_{args.encoder}{group}.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        return
    variants = ([f"steps={t}" for t in args.steps] + [f"scaled={c:g}" for c in args.scaled]
                + [f"map={s:g}" for s in args.map])
    acc: dict[str, dict[int, list[float]]] = {v: {k: [] for k in ks} for v in variants}
    for u in users:
        for _, k, q, eq, s, es in user_draws(model, emb, by_user[u], u, ks, args.seeds):
            for v in variants:
                kind, val = v.split("=")
                if kind == "map":
                    head = map_head(es, s, params, log_lrs, float(val), resid_l2)
                else:
                    t = int(val) if kind == "steps" else max(1, round(float(val) * k))
                    head, _ = adapt_head(es, s, params, log_lrs, t, resid_l2)
                head = {kk: vv.float() for kk, vv in head.items()}
                acc[v][k].append(records_accuracy(RewardModel.head_scores(head, eq), q))
        print(u, f"{time.perf_counter() - t_start:.0f} s", flush=True)
    result = {
        "command": cmd, "what": __doc__.split("\n")[0], "encoder": model.base_model, "init": str(init.relative_to(ROOT)),
        "users": users, "group": "test" if args.test else "val", "seeds": args.seeds,
        "log_lrs": {k: [round(float(x), 3) for x in torch.exp(v).flatten()[:4]] for k, v in log_lrs.items()},
        "acc": {v: {str(k): round(sum(a) / len(a), 4) for k, a in by_k.items()} for v, by_k in acc.items()},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    for v, row in result["acc"].items():
        print(f"{v:>12}", row, flush=True)
    out = Path(args.out or ROOT / f"benchmarks/results/reward_inner_schedule_{args.encoder}{'_test' if args.test else ''}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

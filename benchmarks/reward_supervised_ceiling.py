"""Supervised ceiling of the reward model on the held-out TEST personas (issue 2: is 0.92 at K=32 reachable?).

For each TEST persona of the shipped init's split, the 200 query records that
``metarlhf eval reward`` scores (seed 0, the same draw) are held out; every *other*
record of that persona (up to ``--train-records``) is used for fully supervised
training. That is far more labels than few-shot adaptation ever sees (K <= 32), so
the query accuracy here is an upper bound for what adapting this model can reach on
the same query records:

* ``logreg``   frozen base MiniLM embeddings + L2 logistic regression (C=1), as ``linear``
               in ``eval reward`` but on all the training records;
* ``logreg_meta``  the same on the shipped init's meta-learned LoRA features;
* ``lora``     the reward model itself (LoRA r=8 on query/value + head), trained with Adam
               on the training records for ``--epochs`` epochs, starting from the shipped
               init's LoRA (meta-trained on the train personas only) and the ``logreg_meta``
               head. The query accuracy after every epoch is recorded; the headline is the
               *last* epoch (no selection on the query records).

Simplifications: one query draw (seed 0); no hyper-parameter search (lr 1e-3 for LoRA
and 1e-2 for the head, batch 32, fixed epochs), so this is a lower estimate of the
true ceiling of the architecture, but an upper estimate of few-shot adaptation.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_supervised_ceiling.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/personas")
    ap.add_argument("--init", default="adapters/meta/reward")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-records", type=int, default=600, help="cap on training records per persona")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-head", type=float, default=1e-2)
    ap.add_argument("--users", type=int, default=None, help="only the first N test personas")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/reward_supervised_ceiling.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
    from tqdm import tqdm

    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import fit_logistic_regression, pair_features, user_splits
    from metarlhf.io import atomic_write_json
    from metarlhf.reward import EncodedRecords, RewardModel, load_reward_model, records_accuracy, records_loss

    t_all = time.perf_counter()
    split = json.loads((Path(args.init) / "split.json").read_text())
    by_user = group_by_user(load_records(args.data)[0])
    model = load_reward_model(None, adapter_dir=args.init)
    meta_params = model.adapter_params()
    base_params = model.fresh_params(0)  # lora_B = 0: the plain encoder
    users = split["test"][: args.users] if args.users else split["test"]
    per_user: dict[str, dict] = {}
    for u in tqdm(users, desc="supervised ceiling"):
        t0 = time.perf_counter()
        recs = by_user[u]
        query, _ = user_splits(u, recs, [4, 8, 16, 32], 0, 200)  # the eval's seed-0 query records
        qset = set(query)
        train = [r for r in recs if r not in qset]
        random.Random(f"ceiling:{u}").shuffle(train)
        train = train[: args.train_records]
        q, s = model.encode_records(query), model.encode_records(train)
        row: dict = {"train_records": len(train), "query_records": len(query)}
        with torch.no_grad():
            for name, params in (("logreg", base_params), ("logreg_meta", meta_params)):
                es, eq = model.embed_ids(s.ids, params, 64), model.embed_ids(q.ids, params, 64)
                x, y = pair_features(es, s)
                wb = fit_logistic_regression(x, y)
                row[name] = round(records_accuracy(eq @ wb[:-1] + wb[-1], q), 4)
                row[f"{name}_train_acc"] = round(records_accuracy(es @ wb[:-1] + wb[-1], s), 4)
        # LoRA + head, from the meta-init's LoRA and the logreg_meta head
        p = {k: v.detach().clone() for k, v in meta_params.items() if k != "head.basis"}
        p["head.weight"], p["head.bias"] = wb[:-1].reshape(1, -1).clone(), wb[-1:].clone()
        for v in p.values():
            v.requires_grad_(True)
        lora = [v for k, v in p.items() if "lora_" in k]
        opt = torch.optim.Adam([{"params": lora, "lr": args.lr_lora},
                                {"params": [p["head.weight"], p["head.bias"]], "lr": args.lr_head}])
        curve = []
        n = len(s.thumb_idx)
        for _epoch in range(args.epochs):
            order = torch.randperm(n)
            for i in range(0, n, args.batch):
                sub = s.subset(thumbs=order[i : i + args.batch])
                rows = sorted(set(sub.thumb_idx.tolist()))
                remap = {r: j for j, r in enumerate(rows)}
                local = EncodedRecords([s.ids[r] for r in rows], torch.tensor([remap[int(r)] for r in sub.thumb_idx]),
                                       sub.thumb_labels, sub.chosen_idx, sub.rejected_idx)
                loss = records_loss(RewardModel.head_scores(p, model.embed_ids(local.ids, p, 64)), local)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                curve.append(round(records_accuracy(RewardModel.head_scores(p, model.embed_ids(q.ids, p, 64)), q), 4))
        row["lora_per_epoch"] = curve
        row["lora"] = curve[-1]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        per_user[u] = row
        print(u, json.dumps(row), flush=True)

    def mean(key: str) -> float:
        return round(sum(r[key] for r in per_user.values()) / len(per_user), 4)

    summary = {
        "what": "query accuracy (the 200 seed-0 query records of eval reward) after supervised training on all "
                "other records of each TEST persona (capped at train_records): an upper bound for few-shot adaptation",
        "mean": {m: mean(m) for m in ("logreg", "logreg_meta", "lora")},
        "mean_lora_per_epoch": [round(sum(r["lora_per_epoch"][e] for r in per_user.values()) / len(per_user), 4)
                                for e in range(args.epochs)],
        "personas_at_or_above_0.92": {m: sum(r[m] >= 0.92 for r in per_user.values())
                                      for m in ("logreg", "logreg_meta", "lora")},
        "users": len(per_user), "per_user": per_user, "args": vars(args),
        "command": " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv]),
        "seconds_total": round(time.perf_counter() - t_all, 1),
    }
    atomic_write_json(Path(args.out), summary)
    print(json.dumps({k: summary[k] for k in ("mean", "mean_lora_per_epoch", "personas_at_or_above_0.92",
                                               "seconds_total")}, indent=2))


if __name__ == "__main__":
    main()

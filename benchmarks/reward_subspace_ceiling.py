"""Ceiling of few-shot reward accuracy with *frozen* MiniLM features (no LoRA, no meta-training).

Question: is a low-rank head subspace learned from the training personas enough to
reach 0.85 at K=8 / 0.92 at K=32? Every persona record (prompt + statement, tokenised
exactly as the reward model does) is embedded once with the base encoder (cached as
``.npy`` under ``--cache``). Then, per persona set and K:

* ``logreg``      L2 logistic regression from scratch (C=1), as ``eval reward``'s ``linear``;
* ``sub<r>``      head = w0 + z @ B, B = top-r principal directions of the per-persona
                  logistic heads of the TRAIN personas (w0 = their mean); z (+ bias) is
                  fitted by L2-regularised logistic regression (``lam`` on |z|^2);
* ``mean``        the mean train head (no adaptation; "base").

Choices (rank r, ``lam``) are read off the validation personas and a cross-validation
over the train personas (heads refitted without the held-out fold); the test personas
are reported once as the ceiling. Support/query splits are the ones ``eval reward``
draws (same seeds, query = 200 records, K balanced).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_subspace_ceiling.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def embed_rows(data: str, cache: Path, want: dict[str, list[int]] | None = None,
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list]]:
    """Embeddings [n_u, 384] of the wanted record positions of each user (all records if ``want`` is None).

    Returns per user: embeddings (row i = record ``want[u][i]``), labels, and the records.
    Cached in ``cache`` keyed by the wanted positions.
    """
    import hashlib

    from metarlhf.data import group_by_user, load_records
    from metarlhf.reward import RewardConfig, load_reward_model

    by_user = group_by_user(load_records(data)[0])
    want = want or {u: list(range(len(r))) for u, r in by_user.items()}
    key = hashlib.sha256(json.dumps(sorted(want.items())).encode()).hexdigest()[:16]
    f = cache / f"emb_{key}.npy"
    flat = [(u, i) for u in sorted(want) for i in want[u]]
    recs = [by_user[u][i] for u, i in flat]
    labels = {u: np.array([by_user[u][i].label for i in want[u]], dtype=np.float32) for u in want}
    if f.is_file():
        emb = np.load(f)
    else:
        model = load_reward_model(None, adapter_dir=None, config=RewardConfig())
        base = model.fresh_params(0)  # lora_B = 0: the plain encoder
        ids = model.encode_texts([r.prompt for r in recs], [r.completion for r in recs])
        order = np.argsort([len(x) for x in ids])  # length-sorted batches: little padding
        emb = np.zeros((len(ids), model.hidden_size), dtype=np.float32)
        t0 = time.perf_counter()
        bs = 256
        for i in range(0, len(order), bs):
            rows = order[i : i + bs]
            with torch.no_grad():
                emb[rows] = model.embed_ids([ids[j] for j in rows], base, batch_size=bs).numpy()
            if i // bs % 20 == 0:
                print(f"embedded {i + len(rows)}/{len(ids)} in {time.perf_counter() - t0:.0f}s", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(f, emb)
    out, pos = {}, 0
    for u in sorted(want):
        out[u] = emb[pos : pos + len(want[u])]
        pos += len(want[u])
    return out, labels, {u: [by_user[u][i] for i in want[u]] for u in want}


def fit_head(x: torch.Tensor, y: torch.Tensor, basis: torch.Tensor | None, w0: torch.Tensor, lam: float,
             iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic fit of head = w0 + z @ basis (basis None: full w, penalty 0.5 lam |w - w0|^2 on the sum loss)."""
    x, y = x.double(), y.double()
    dim = basis.shape[0] if basis is not None else x.shape[1]
    zb = torch.zeros(dim + 1, dtype=torch.float64, requires_grad=True)
    feats = x @ basis.T.double() if basis is not None else x  # [n, dim]
    off = x @ w0.double()  # [n]
    opt = torch.optim.LBFGS([zb], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = off + feats @ zb[:-1] + zb[-1]
        loss = 0.5 * lam * (zb[:-1] ** 2).sum() + torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    z = zb.detach()
    w = w0.double() + (z[:-1] @ basis.double() if basis is not None else z[:-1])
    return w, z[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/personas")
    ap.add_argument("--split", default="adapters/meta/reward/split.json")
    ap.add_argument("--cache", default="/tmp/metarlhf-r2")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    ap.add_argument("--train-records", type=int, default=256, help="embedded records per train persona")
    ap.add_argument("--sets", nargs="+", default=["val", "traincv", "test"])
    ap.add_argument("--out", default="benchmarks/results/reward_subspace_ceiling.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("command:", " ".join([sys.executable, *sys.argv]))
    from metarlhf.data import Thumbs, group_by_user, load_records
    from metarlhf.evaluate_reward import user_splits

    split = json.loads(Path(args.split).read_text())
    by_user = group_by_user(load_records(args.data)[0])
    counts = {u: len(r) for u, r in by_user.items()}

    def stand_ins(u: str, positions: list[int]) -> list:  # the user's records, prompt = index into ``positions``
        return [Thumbs(u, str(i), "", by_user[u][j].label) for i, j in enumerate(positions)]

    want: dict[str, list[int]] = {}
    rng = np.random.default_rng(0)
    for u in split["train"]:
        want[u] = sorted(rng.choice(counts[u], size=min(args.train_records, counts[u]), replace=False).tolist())
    for u in split["val"] + split["test"]:
        used: set[int] = set()
        for seed in range(args.seeds):  # the eval's query + support draws do not look at labels' values
            q, sup = user_splits(u, stand_ins(u, list(range(counts[u]))), args.ks, seed, 200)
            used |= {int(r.prompt) for r in q} | {int(r.prompt) for k in sup for r in sup[k]}
        want[u] = sorted(used)
    t0 = time.perf_counter()
    emb, labels, recs = embed_rows(args.data, Path(args.cache), want)
    print(f"embeddings ready in {time.perf_counter() - t0:.0f}s")
    x_u = {u: torch.from_numpy(e) for u, e in emb.items()}
    y_u = {u: torch.from_numpy(v) for u, v in labels.items()}
    dim = next(iter(x_u.values())).shape[1]

    def user_head(u: str) -> torch.Tensor:  # logistic head of one train persona on its embedded records (C=1)
        w, b = fit_head(x_u[u], y_u[u], None, torch.zeros(dim), 1.0, iters=200)
        return torch.cat([w, b.reshape(1)])

    t0 = time.perf_counter()
    heads = {u: user_head(u) for u in split["train"]}
    print(f"train heads in {time.perf_counter() - t0:.1f}s")

    def basis_from(train: list[str], r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.stack([heads[u][:-1] for u in train])  # [n_train, d]
        w0 = h.mean(0)
        _, s, vt = torch.linalg.svd(h - w0, full_matrices=False)
        return w0, vt[:r], s

    def evaluate(users: list[str], train: list[str]) -> dict[str, dict[str, float]]:
        bases = {r: basis_from(train, r) for r in args.ranks}
        w0 = bases[args.ranks[0]][0]
        b0 = torch.stack([heads[u][-1] for u in train]).mean()
        res: dict[str, dict[int, list[float]]] = {}

        def add(m: str, k: int, acc: float) -> None:
            res.setdefault(m, {}).setdefault(k, []).append(acc)

        for u in users:
            pos = {j: i for i, j in enumerate(want[u])}  # record position -> embedded row
            train_user = u in split["train"]  # evaluated on its embedded subset only
            positions = want[u] if train_user else list(range(counts[u]))
            for seed in range(args.seeds):
                query, supports = user_splits(u, stand_ins(u, positions), args.ks, seed, 200)

                def row(r: Thumbs, train_user: bool = train_user, pos: dict = pos) -> int:
                    return int(r.prompt) if train_user else pos[int(r.prompt)]

                qi = torch.tensor([row(q) for q in query])
                xq, yq = x_u[u][qi].double(), y_u[u][qi].double()

                def acc(w: torch.Tensor, b: torch.Tensor, xq: torch.Tensor = xq, yq: torch.Tensor = yq) -> float:
                    return float((((xq @ w + b) > 0).double() == yq).double().mean())

                base_acc = acc(w0.double(), b0.double())
                for k in args.ks:
                    add("mean", k, base_acc)
                    si = torch.tensor([row(s) for s in supports[k]])
                    xs, ys = x_u[u][si], y_u[u][si]
                    w, b = fit_head(xs, ys, None, torch.zeros_like(w0), 1.0)
                    add("logreg", k, acc(w, b))
                    for rk in args.ranks:
                        for lam in args.lams:
                            w, b = fit_head(xs, ys, bases[rk][1], bases[rk][0], lam)
                            add(f"sub{rk}_lam{lam:g}", k, acc(w, b))
        return {m: {str(k): round(float(np.mean(v)), 4) for k, v in d.items()} for m, d in res.items()}

    results: dict[str, object] = {}
    train = list(split["train"])
    if "val" in args.sets:
        results["val"] = evaluate(split["val"], train)
    if "traincv" in args.sets:  # 4 folds of the train personas; heads of the held-out fold never in the basis
        folds = [train[i::4] for i in range(4)]
        per: list[dict] = [evaluate(f, [u for u in train if u not in f]) for f in folds]
        results["traincv"] = {m: {k: round(float(np.mean([p[m][k] for p in per])), 4) for k in per[0][m]}
                              for m in per[0]}
    if "test" in args.sets:
        results["test"] = evaluate(split["test"], train)
    _, _, s = basis_from(train, 1)
    results["train_head_singular_values"] = [round(float(v), 3) for v in s[:64]]
    for name, table in results.items():
        if not isinstance(table, dict):
            continue
        print(f"\n== {name}")
        print(f"{'method':<18}" + "".join(f"K={k:<7}" for k in args.ks))
        for m, by_k in table.items():
            print(f"{m:<18}" + "".join(f"{by_k[str(k)]:<9.3f}" for k in args.ks))
    results["args"] = vars(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

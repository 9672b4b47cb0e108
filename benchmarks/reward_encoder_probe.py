"""Would another frozen encoder help the few-shot reward model? (issue 2 idea check)

The reward target (0.85 at K=8 on unseen personas) is missed with all-MiniLM-L6-v2,
and with frozen MiniLM features even the best head subspace stays near 0.81 at K=8 on
the validation personas. Sentence-similarity encoders are known to blur stance ("I
want X" vs "I would never X"); a causal LM's hidden states may keep it. This script
compares *frozen* features of the two embedded models on the same few-shot protocol:

* ``minilm``: all-MiniLM-L6-v2, mean-pooled, L2-normalised (as the reward model);
* ``smol_L<l>``: SmolLM2-135M-Instruct, hidden states after decoder layer ``l``,
  mean-pooled, standardised per dimension with the *training* personas' mean / std
  (label-free; LLM states have a few huge outlier dimensions), divided by sqrt(d);
* ``cat``: ``minilm`` and ``smol_L24`` side by side (each scaled by 1/sqrt(2)).

Only the statement is embedded (the persona prompt is the same for every record).
Features are multiplied by 10 before fitting. Methods, per feature set:

* ``logreg``: L2 logistic regression from scratch on the K support records (C=1);
* ``sub<r>_lam<l>``: the head is ``w0 + z @ basis``: ``w0`` and ``basis`` (top-r
  principal directions) come from logistic heads fitted on ``--train-records`` records
  of each of the 80 *training* personas; ``z`` and the bias are fitted on the support
  set with an L2 pull ``lam`` on ``z`` (the frozen-feature analogue of the shipped
  init's stage-2 start, before any meta-training of the LoRA).

Support / query draws are ``eval reward``'s (``user_splits``: seeds 0 and 1, 200 query
records). Only the 10 *validation* personas are scored (an idea check: nothing here
is chosen on the test personas). Embeddings are cached under ``--cache``.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_encoder_probe.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LAYERS = (8, 12, 16, 20, 24, 30)


def embed_user(texts: list[str], enc: tuple, pol: tuple) -> dict[str, torch.Tensor]:
    """Mean-pooled MiniLM output and SmolLM2 hidden states after each of :data:`LAYERS`."""
    (encoder, etok), (policy, ptok) = enc, pol
    mini, smol = [], {layer: [] for layer in LAYERS}
    for i in range(0, len(texts), 32):
        chunk = texts[i : i + 32]
        b = etok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            h = encoder(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        mini.append((h * m).sum(1) / m.sum(1))
        b = ptok(chunk, padding=True, truncation=True, max_length=96, return_tensors="pt")
        with torch.no_grad():
            hs = policy.model(**b, output_hidden_states=True).hidden_states
        m = b["attention_mask"].unsqueeze(-1).float()
        for layer in LAYERS:
            smol[layer].append((hs[layer].float() * m).sum(1) / m.sum(1))
    return {"minilm": torch.cat(mini), **{f"smol_L{k}": torch.cat(v) for k, v in smol.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/personas"))
    ap.add_argument("--split", default=str(ROOT / "adapters/meta/reward/split.json"))
    ap.add_argument("--cache", default="/tmp/metarlhf-encoder-probe")
    ap.add_argument("--train-records", type=int, default=160, help="embedded statements per training persona")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/reward_encoder_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)
    from reward_subspace_ceiling import fit_head

    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import fit_logistic_regression, user_splits
    from metarlhf.io import load_tensors, save_tensors
    from metarlhf.models import load_encoder, load_policy

    t_start = time.perf_counter()
    split = json.loads(Path(args.split).read_text())
    by_user = group_by_user(load_records(args.data)[0])
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models: list = []
    emb: dict[str, dict] = {}
    for group, limit in (("train", args.train_records), ("val", None)):
        for u in split[group]:
            f = cache / f"{u}.{limit or 'all'}.safetensors"
            texts = sorted({r.completion for r in by_user[u]})[:limit]
            if not f.is_file():
                if not models:
                    models = [load_encoder(None), load_policy(None)]
                    models[1][1].padding_side = "right"
                save_tensors(f, embed_user(texts, *models))
                print(f"embedded {u}: {len(texts)} statements, {time.perf_counter() - t_start:.0f}s", flush=True)
            emb[u] = {"texts": texts, **load_tensors(f)}
    embed_s = time.perf_counter() - t_start
    label = {u: {r.completion: r.label for r in by_user[u]} for u in by_user}
    smol_keys = [f"smol_L{k}" for k in LAYERS]
    stats = {}
    for k in smol_keys:  # standardisation: label-free statistics of the training personas only
        x = torch.cat([emb[u][k] for u in split["train"]])
        stats[k] = (x.mean(0), x.std(0) + 1e-6)

    def features(u: str, key: str) -> torch.Tensor:
        if key == "cat":
            return torch.cat([features(u, "minilm"), features(u, "smol_L24")], 1) / 2 ** 0.5
        x = emb[u][key]
        if key == "minilm":
            return F.normalize(x, dim=-1) * 10
        mu, sd = stats[key]
        return (x - mu) / sd / x.shape[1] ** 0.5 * 10

    results: dict[str, dict] = {}
    for key in ["minilm", *smol_keys, "cat"]:
        heads = []
        for u in split["train"]:
            y = torch.tensor([float(label[u][t]) for t in emb[u]["texts"]])
            heads.append(fit_logistic_regression(features(u, key), y, c=1.0, max_iter=200))
        h = torch.stack(heads)
        w0 = h[:, :-1].mean(0)
        vt = torch.linalg.svd(h[:, :-1] - w0, full_matrices=False)[2]
        acc: dict[str, dict[int, list[float]]] = {}
        for u in split["val"]:
            x = features(u, key)
            row = {t: i for i, t in enumerate(emb[u]["texts"])}
            for seed in range(args.seeds):
                query, supports = user_splits(u, by_user[u], args.ks, seed, 200)
                xq = x[[row[r.completion] for r in query]].double()
                yq = torch.tensor([float(r.label) for r in query], dtype=torch.float64)
                for k, sup in supports.items():
                    xs = x[[row[r.completion] for r in sup]]
                    ys = torch.tensor([float(r.label) for r in sup])
                    wb = fit_logistic_regression(xs, ys, c=1.0)
                    pred = xq @ wb[:-1].double() + wb[-1]
                    acc.setdefault("logreg", {}).setdefault(k, []).append(float(((pred > 0).double() == yq).double().mean()))
                    for rank in (16, 32):
                        for lam in (1.0, 10.0):
                            w, b = fit_head(xs, ys, vt[:rank], w0, lam)
                            a = float((((xq @ w + b) > 0).double() == yq).double().mean())
                            acc.setdefault(f"sub{rank}_lam{lam:g}", {}).setdefault(k, []).append(a)
        results[key] = {m: {str(k): round(sum(v) / len(v), 4) for k, v in d.items()} for m, d in acc.items()}
        for m, d in results[key].items():
            print(key, m, d, flush=True)
    out = {"command": cmd, "personas": "validation (10)", "seeds": args.seeds, "query_per_user": 200,
           "train_records": args.train_records, "embed_s": round(embed_s, 1),
           "wall_s": round(time.perf_counter() - t_start, 1), "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

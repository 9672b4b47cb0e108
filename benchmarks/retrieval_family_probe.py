"""Which user vector finds a user of the same taste family? (pipeline step 5, idea check)

``benchmarks/policy_neighbor_init.py`` found that the server's preference vectors (MiniLM
embeddings of liked minus disliked answers, ``jobs.user_preference``) picked a held-out
simulated user's own family as its nearest neighbour only for users with no thumbs up. This
probe collects K thumbs from each of the 18 simulated users (``eval policy``'s adaptive exploration, on the
same HH-RLHF prompts for everyone, 500+ by default) and compares four vectors per user,
each L2-normalised, by leave-one-out nearest neighbour (cosine):

* ``minilm_pref``: the server's vector;
* ``reward_head``: the user's reward head after ``adapt_reward`` from the shipped MiniLM
  init (what the meta-learned reward model makes of the thumbs; ``head.weight``);
* ``minilm_paired``: MiniLM too, but only prompts the user rated both ways count, each as
  its liked minus disliked answers (so the answers' topics cancel within a prompt);
* ``policy_pref``: the same liked-minus-disliked mean with the *policy's* (SmolLM2) final
  hidden states, mean-pooled over the answer tokens, each dimension standardised by its
  spread over the answers of the same set, the candidates' or the queries' (label-free).

With ``--query-offset`` each user also rates other prompts, and those thumbs make the
query vector, searched against the others' vectors from the first prompts: a new user
and the known users have not rated the same answers (the server's case).

Scored over users with at least one thumbs up and one down (a user with none up has a
vector of minus some base answers, the same for all such users), as queries and as
candidates: how often the nearest other user shares the query's family. Writes a JSON
with the same-prompt scores (``same_prompts``) and, with ``--query-offset``, the
other-prompt ones (``other_prompts``).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/retrieval_family_probe.py \\
        --query-offset 1000 --out benchmarks/results/retrieval_family_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--offset", type=int, default=500)
    ap.add_argument("--query-offset", type=int, default=None,
                    help="queries rate other prompts (from this offset on) than the candidates, as a new user would")
    ap.add_argument("--kinds", nargs="+", default=["minilm_pref", "minilm_paired", "reward_head", "policy_pref"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)

    import numpy as np
    import torch

    from metarlhf.data import prompts_after
    from metarlhf.evaluate_policy import EvalConfig, adaptive_support
    from metarlhf.io import atomic_write_bytes
    from metarlhf.jobs import liked_disliked
    from metarlhf.policy import decoder_of, resolve_base
    from metarlhf.retrieval import preference_vector
    from metarlhf.reward import adapt_reward, load_reward_model
    from metarlhf.simusers import USERS

    t0 = time.perf_counter()
    model, tok, _ = resolve_base(None)
    rm = load_reward_model(None)
    cfg = EvalConfig(ks=[args.k], seed=args.seed)
    s = cfg.samples_per_prompt

    def collect(offset: int) -> dict[str, list]:
        prompts = prompts_after(args.prompts, offset, -(-args.k // s))
        out = {}
        for user in USERS.values():
            out[user.name] = adaptive_support(model, tok, user, prompts, args.k, cfg)[0]
            print(f"{user.name} (prompts {offset}+): {sum(t.label for t in out[user.name])} up, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        return out

    dec = decoder_of(model)

    @torch.no_grad()
    def policy_states(comps: list[str]) -> np.ndarray:
        out = []
        for c in comps:
            ids = tok(c, return_tensors="pt").input_ids[:, :256]
            out.append(dec(input_ids=ids).last_hidden_state[0].float().mean(0).numpy())
        return np.stack(out)

    def paired(emb: np.ndarray, prompts_u: list[str], liked: list[bool]) -> np.ndarray | None:
        """Mean over prompts rated both ways of (mean liked - mean disliked) on that prompt."""
        diffs = []
        for p in dict.fromkeys(prompts_u):
            rows = [i for i, q in enumerate(prompts_u) if q == p]
            up, down = [i for i in rows if liked[i]], [i for i in rows if not liked[i]]
            if up and down:
                diffs.append(emb[up].mean(0) - emb[down].mean(0))
        if not diffs:
            return None
        v = np.mean(diffs, 0)
        return v / max(float(np.linalg.norm(v)), 1e-8)

    def vectors(supports: dict[str, list]) -> dict[str, dict[str, np.ndarray]]:
        vecs: dict[str, dict[str, np.ndarray]] = {k: {} for k in args.kinds}
        raw_policy: dict[str, tuple[np.ndarray, list[bool]]] = {}
        for name, sup in supports.items():
            prompts_u, comps, liked = liked_disliked(sup)
            if not any(liked) or all(liked):
                continue
            with torch.no_grad():
                emb = rm.embed(prompts_u, comps).float().numpy()
            if "minilm_pref" in vecs:
                vecs["minilm_pref"][name] = preference_vector(emb, liked)
            if "minilm_paired" in vecs and (v := paired(emb, prompts_u, liked)) is not None:
                vecs["minilm_paired"][name] = v
            if "reward_head" in vecs:
                head = adapt_reward(sup, encoder=rm).tensors["head.weight"].reshape(-1).float().numpy()
                vecs["reward_head"][name] = head / np.linalg.norm(head)
            if "policy_pref" in vecs:
                raw_policy[name] = (policy_states(comps), liked)
        if raw_policy:
            every = np.concatenate([h for h, _ in raw_policy.values()])
            mu, sd = every.mean(0), every.std(0) + 1e-6
            for name, (h, liked) in raw_policy.items():
                vecs["policy_pref"][name] = preference_vector((h - mu) / sd, liked)
        return vecs

    cand_sup = collect(args.offset)
    query_sup = cand_sup if args.query_offset is None else collect(args.query_offset)
    cand, query = vectors(cand_sup), (None if args.query_offset is None else vectors(query_sup))
    family = {n: u.family for n, u in USERS.items()}
    result = {"command": cmd, "what": __doc__.split("\n")[0], "k": args.k, "offset": args.offset,
              "query_offset": args.query_offset,
              "n_up": {n: sum(t.label for t in sup) for n, sup in cand_sup.items()},
              "n_up_query": {n: sum(t.label for t in sup) for n, sup in query_sup.items()}}

    def score(query: dict, label: str) -> dict[str, Any]:
        """Leave-one-out nearest candidate of each query user: [user, cosine, cosine to itself]."""
        out = {}
        for kind in args.kinds:
            names = sorted(set(cand[kind]) & set(query[kind]))  # scored as queries and as candidates
            hits, nearest, chance = [], {}, []
            for n in names:
                others = [m for m in names if m != n]
                sims = {m: float(query[kind][n] @ cand[kind][m]) for m in others}
                m = max(sims, key=sims.get)
                nearest[n] = [m, round(sims[m], 4), round(float(query[kind][n] @ cand[kind][n]), 4)]
                hits.append(family[n] == family[m])
                chance.append(sum(family[o] == family[n] for o in others) / len(others))
            rate_, ch = float(np.mean(hits)), float(np.mean(chance))
            out[kind] = {"users": len(names), "same_family_rate": round(rate_, 4), "chance": round(ch, 4),
                         "nearest": nearest}
            print(f"{label} {kind:>13}: {len(names)} users, same family {rate_:.3f} (chance {ch:.3f})", flush=True)
        return out

    result["same_prompts"] = score(cand, "same prompts")  # every user on the --offset prompts
    if query is not None:
        result["other_prompts"] = score(query, "other prompts")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()

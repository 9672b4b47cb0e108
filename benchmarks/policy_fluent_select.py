"""Pilot: can picking one of N personalized samples keep the style and lose the fluency damage?

The personalized answers win on style but often read worse than base (README, "Per-answer
fluency"). This script adapts each *training* user's policy once (the shipped recipe: K=16
thumbs on hinted base samples, meta init), draws N personalized samples per held-out pilot
prompt, and scores every sample with the user's true reward and the base model's per-token
NLL of its words (:func:`metarlhf.evaluate_policy.base_nll_rows`). It then compares selection
rules offline, on the same samples:

* ``single``: the expected figure of one sample (the mean over the N), i.e. what the
  server serves today;
* ``min_nll``: the sample the base model finds most likely (no reward model needed);
* ``rm``: the sample the user's personalized reward model (fitted on the same K thumbs)
  ranks highest (``best_of_n``, which did not help in session 2);
* ``rm_fluent``: the reward model's best among the samples that are not above the
  group's lowest NLL + ``--slack`` nats (a fluency filter, then the reward model);
* ``max_relevance``: the sample whose words the base model finds most tied to its own
  prompt (:func:`metarlhf.evaluate_policy.prompt_relevance`: NLL after another prompt of the
  set minus NLL after its own), which passes over memorised templates and loops;
* ``oracle``: the sample with the highest *true* reward (an upper bound no server has).

Each rule reports the win rate against base (true reward), the fluent win rate, the
fluency drop rate (a drop: more than ``FLUENCY_DROP_NATS`` above the base answer's NLL) and
the mean relevance of the kept samples (base answers: ``base_relevance``).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_fluent_select.py \\
        --out benchmarks/results/policy_fluent_select.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("single", "min_nll", "rm", "rm_fluent", "max_relevance", "oracle")


def pick(rule: str, rewards: list[float], nll: list[float], rm: list[float], rel: list[float],
         slack: float) -> list[int]:
    """Indices (within one prompt's N samples) that ``rule`` keeps; ``single`` keeps all (mean)."""
    n = range(len(rewards))
    if rule == "single":
        return list(n)
    if rule == "min_nll":
        return [min(n, key=lambda j: nll[j])]
    if rule == "rm":
        return [max(n, key=lambda j: rm[j])]
    if rule == "rm_fluent":
        ok = [j for j in n if nll[j] <= min(nll) + slack]
        return [max(ok, key=lambda j: rm[j])]
    if rule == "max_relevance":
        return [max(n, key=lambda j: rel[j])]
    if rule == "oracle":
        return [max(n, key=lambda j: rewards[j])]
    raise ValueError(rule)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"))
    ap.add_argument("--offset", type=int, default=500, help="pilot prompts start here (meta: 0-63, eval: 1000+)")
    ap.add_argument("--users", default="bullets,casual,concise-15,theme-food,first-plural,asks-back",
                    help="TRAIN users only")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--eval-prompts", type=int, default=12)
    ap.add_argument("--n", type=int, default=4, help="personalized samples per prompt")
    ap.add_argument("--slack", type=float, default=0.5, help="rm_fluent: nats above the group's lowest NLL")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_fluent_select.json"))
    args = ap.parse_args()
    command = " ".join([sys.executable, *sys.argv])
    print("command: " + command, flush=True)

    import torch

    from metarlhf.data import read_prompts
    from metarlhf.evaluate_policy import (
        FLUENCY_DROP_NATS,
        base_nll_rows,
        personal_scorer,
        prompt_outcome,
        prompt_relevance,
    )
    from metarlhf.io import atomic_write_json
    from metarlhf.policy import (
        AdaptConfig,
        adapt_policy,
        adapter_attached,
        exploration_hints,
        generate,
        load_init,
        resolve_base,
    )
    from metarlhf.reward import load_reward_model
    from metarlhf.simusers import get_training_users

    torch.set_num_threads(2)
    users = get_training_users(args.users)
    t_start = time.perf_counter()
    model, tok, base_name = resolve_base(None)
    init = load_init("meta", base_name)
    reward_model = load_reward_model()
    n_train = -(-args.k // 2)
    prompts = read_prompts(args.prompts, limit=args.offset + n_train + args.eval_prompts)[args.offset:]
    train_prompts, eval_prompts = prompts[:n_train], prompts[n_train:n_train + args.eval_prompts]
    rep = [p for p in train_prompts for _ in range(2)]
    hints = exploration_hints(len(rep), "hints", 4, seed=0)
    pool = generate(model, tok, rep, 48, 1.0, seed=0, hints=hints)  # as eval policy's hints protocol
    base_eval = generate(model, tok, eval_prompts, 48, 0.7, seed=1)
    nll_base, _ = base_nll_rows(model, tok, eval_prompts, base_eval)
    base_rel = prompt_relevance(model, tok, eval_prompts, base_eval, nll_base)
    rep_eval = [p for p in eval_prompts for _ in range(args.n)]
    cfg = AdaptConfig(max_completion_tokens=48)
    result: dict = {"command": command, "config": vars(args), "drop_nats": FLUENCY_DROP_NATS, "users": {}}
    for user in users:
        rng = random.Random(f"0:{user.name}")
        thumbs = []
        for i, p in enumerate(train_prompts):
            thumbs += user.thumbs(p, pool[2 * i:2 * i + 2], rng=rng)
        support = thumbs[:args.k]
        t0 = time.perf_counter()
        adapter = adapt_policy(support, base=(model, tok), init=init, seed=0, config=cfg, hints=hints[:args.k])
        adapt_s = time.perf_counter() - t0
        with adapter_attached(model, adapter) as pm:
            comps = generate(pm, tok, rep_eval, 48, 0.7, seed=1)
        nll, _ = base_nll_rows(model, tok, rep_eval, comps)
        rel = prompt_relevance(model, tok, rep_eval, comps, nll)  # against the next *distinct* prompt
        rewards = [user.reward(p, c) for p, c in zip(rep_eval, comps, strict=True)]
        rm = [float(s) for s in personal_scorer(reward_model, support, 0)(rep_eval, comps)]
        base_r = [user.reward(p, c) for p, c in zip(eval_prompts, base_eval, strict=True)]
        per_rule = {}
        for rule in RULES:
            win = fluent = drop = relevance = 0.0
            for i in range(len(eval_prompts)):
                g = slice(i * args.n, (i + 1) * args.n)
                kept = pick(rule, rewards[g], nll[g], rm[g], rel[g], args.slack)
                for j in kept:
                    r, d = rewards[g][j], nll[g][j] > nll_base[i] + FLUENCY_DROP_NATS
                    w = prompt_outcome(r, base_r[i])
                    win += w / len(kept)
                    fluent += (0.0 if d else w) / len(kept)
                    drop += d / len(kept)
                    relevance += rel[g][j] / len(kept)
            m = len(eval_prompts)
            per_rule[rule] = {"win_rate": win / m, "fluent_win_rate": fluent / m, "drop_rate": drop / m,
                              "relevance": relevance / m}
        result["users"][user.name] = {
            "n_up": sum(t.label for t in support), "adapt_s": round(adapt_s, 1), "rules": per_rule,
            "samples": [{"prompt": i // args.n, "reward": rewards[i], "nll": round(nll[i], 3), "rm": round(rm[i], 3),
                         "relevance": round(rel[i], 3), "text": comps[i]} for i in range(len(comps))],
            "base": [{"reward": base_r[i], "nll": round(nll_base[i], 3), "relevance": round(base_rel[i], 3),
                      "text": base_eval[i]}
                     for i in range(len(eval_prompts))],
        }
        print(user.name, json.dumps({r: {k: round(v, 3) for k, v in s.items()} for r, s in per_rule.items()}),
              flush=True)
    result["mean"] = {rule: {key: statistics.mean(u["rules"][rule][key] for u in result["users"].values())
                             for key in ("win_rate", "fluent_win_rate", "drop_rate", "relevance")} for rule in RULES}
    result["base_relevance"] = sum(base_rel) / len(base_rel)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result["mean"], indent=1))
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

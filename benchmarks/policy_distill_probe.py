"""Probe (training users only): does liked-style distillation move the plain-prompt style?

Adaptive exploration (:func:`metarlhf.policy.explore_adaptive`) of K=16 thumbs for one
*training* user on pilot prompts 500-507, then ``adapt_policy`` (shipped meta init) under
each recipe variant (``AdaptConfig`` overrides), scored on prompts 508-515 against base
(true reward, ties 1/2). ``FORCE_HINT=<hint>`` relabels the hint of every thumbs-up sample
(an oracle liked style), to test distillation apart from exploration. Prints one line per
variant and writes them to ``OUT`` (default ``benchmarks/results/policy_distill_probe.json``;
session 3's figures are quoted in ``benchmarks/results/policy_explore_pilot.json``, entry
``probes``).

    FORCE_HINT='Say "we" and "us".' flock /tmp/metarlhf-cpu.lock .venv/bin/python -u \\
        benchmarks/policy_distill_probe.py first-plural '{"none": {}, "d16": {"distill_samples": 16}}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = str(ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz")


def main(user_name: str, variants: dict, out: str) -> int:
    from dataclasses import asdict

    import torch

    from metarlhf import policy as P
    from metarlhf.data import read_prompts
    from metarlhf.evaluate_policy import win_rate
    from metarlhf.io import atomic_write_json
    from metarlhf.models import load_policy
    from metarlhf.simusers import get_training_users

    command = " ".join([sys.executable, *sys.argv])
    print("command: " + command, flush=True)
    user = get_training_users([user_name])[0]
    torch.set_num_threads(2)
    model, tok = load_policy()
    allp = read_prompts(PROMPTS, limit=516)[500:516]
    train, evalp = allp[:8], allp[8:16]
    t0 = time.time()
    thumbs, arms = P.explore_adaptive(model, tok, train, lambda p, cs: user.thumbs(p, cs), 16, 2, seed=0)
    print(f"explore {time.time() - t0:.1f} s", flush=True)
    if os.environ.get("FORCE_HINT"):
        arms = [os.environ["FORCE_HINT"] if t.label else a for t, a in zip(thumbs, arms, strict=True)]
    cred = P.hint_credit(arms, [t.label for t in thumbs])
    print("credit", {str(k): v for k, v in cred.items()}, "liked", P.liked_hints(cred, 2), flush=True)
    base_eval = P.generate(model, tok, evalp, 48, 0.7, seed=1)
    base_r = [user.reward(p, c) for p, c in zip(evalp, base_eval, strict=True)]
    init = P.load_init("meta", P.base_name_of(model))
    result = {"command": command, "user": user_name, "force_hint": os.environ.get("FORCE_HINT"),
              "credit": {str(k): v for k, v in cred.items()}, "variants": {}}
    for name, over in variants.items():
        cfg = P.AdaptConfig(**{**asdict(P.AdaptConfig(max_completion_tokens=48)), **over})
        t0 = time.time()
        ad = P.adapt_policy(thumbs, base=(model, tok), init=init, config=cfg, hints=arms)
        s = time.time() - t0
        with P.adapter_attached(model, ad) as pm:
            comps = P.generate(pm, tok, evalp, 48, 0.7, seed=1)
        r = [user.reward(p, c) for p, c in zip(evalp, comps, strict=True)]
        print(f"{name}: win {win_rate(r, base_r):.3f} reward {sum(r) / len(r):+.3f} "
              f"base {sum(base_r) / len(r):+.3f} adapt {s:.1f} s (distill {ad.meta['distill_s']:.1f} s, "
              f"{ad.meta['n_distilled']} samples) loss {ad.meta['losses'][0]:.2f} -> {ad.meta['losses'][-1]:.2f}",
              flush=True)
        print("   first personalized answer:", repr(comps[0][:150]), flush=True)
        result["variants"][name] = {"config": over, "win_rate": win_rate(r, base_r), "mean_reward": sum(r) / len(r),
                                    "base_mean_reward": sum(base_r) / len(r), "adapt_s": round(s, 1),
                                    "n_distilled": ad.meta["n_distilled"], "losses": ad.meta["losses"],
                                    "first_answer": comps[0]}
        atomic_write_json(out, result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2]),
                  os.environ.get("OUT", str(ROOT / "benchmarks/results/policy_distill_probe.json"))))

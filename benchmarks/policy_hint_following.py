"""Probe: how often does the base model follow a style hint? (training users' rewards only)

For each hint, 8 samples with the hint vs 8 plain samples (same seed) on pilot prompts
500-507, at temperature 1.0 and 0.7: mean reward of a matching *training* user for the
hinted and the plain samples, and the hinted sample's win rate against the plain one
(ties 1/2). Prints one line per (temperature, hint) and writes them to ``--out`` (session 3's
figures are quoted in ``benchmarks/results/policy_explore_pilot.json``, entry ``probes``).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_hint_following.py \\
        --out benchmarks/results/policy_hint_following.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = str(ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz")

#: hint -> the training user whose reward says whether the hint was followed
CHECK = {
    "Answer as a numbered list.": "bullets",
    "Answer as a bulleted list.": "bullets",
    "Be enthusiastic and upbeat!": "casual",
    "End by asking me a question.": "asks-back",
    "Say \"we\" and \"us\".": "first-plural",
    "Answer in one short sentence.": "concise-15",
    "Be casual and friendly.": "casual",
    "Give a concrete example.": "gives-example",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_hint_following.json"))
    args = ap.parse_args()

    import torch

    from metarlhf.data import read_prompts
    from metarlhf.io import atomic_write_json
    from metarlhf.models import load_policy
    from metarlhf.policy import generate
    from metarlhf.simusers import USERS

    command = " ".join([sys.executable, *sys.argv])
    print("command: " + command, flush=True)
    torch.set_num_threads(2)
    rows = []
    model, tok = load_policy()
    prompts = read_prompts(PROMPTS, limit=508)[500:508]
    n = len(prompts)
    for temp in (1.0, 0.7):
        hs = [h for h in CHECK for _ in prompts]
        ps = [p for _ in CHECK for p in prompts]
        plain = generate(model, tok, prompts, 48, temp, seed=3)
        t0 = time.time()
        comps = generate(model, tok, ps, 48, temp, seed=3, hints=hs)
        for j, h in enumerate(CHECK):
            u = USERS[CHECK[h]]
            r = [u.reward(p, c) for p, c in zip(prompts, comps[j * n:(j + 1) * n], strict=True)]
            rb = [u.reward(p, c) for p, c in zip(prompts, plain, strict=True)]
            wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r, rb, strict=True)) / n
            print(f"T={temp} {h!r} user {u.name}: hinted {sum(r) / n:+.3f} plain {sum(rb) / n:+.3f} "
                  f"win {wins:.3f}", flush=True)
            rows.append({"temperature": temp, "hint": h, "user": u.name, "hinted_reward": sum(r) / n,
                         "plain_reward": sum(rb) / n, "hinted_win_rate": wins, "prompts": n})
        print(f"T={temp}: {len(ps)} hinted samples in {time.time() - t0:.1f} s", flush=True)
    atomic_write_json(args.out, {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Calibrate the fluency figures of an ``eval policy`` result (issue 3).

``eval policy`` counts a *fluency drop* when a personalized answer's words are more than
``FLUENCY_DROP_NATS`` (1) nats/token less likely under the base model than the base
answer's to the same prompt. How often does *another base sample* do that? This script
redraws the result's base answers (checking they are the same), draws further base samples
with other seeds, and reports their drop rate against the first.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_fluency_calibration.py \\
        [--result benchmarks/results/policy_eval_s6.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--result", default=str(ROOT / "benchmarks/results/policy_eval_s6.json"))
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"))
    ap.add_argument("--offset", type=int, default=1000, help="as the eval's --offset")
    ap.add_argument("--resamples", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_fluency_calibration.json"))
    args = ap.parse_args()
    import torch

    from metarlhf.data import read_prompts
    from metarlhf.evaluate_policy import FLUENCY_DROP_NATS, base_nll_rows, fluency_drops
    from metarlhf.models import load_policy
    from metarlhf.policy import generate

    torch.set_num_threads(2)
    result = json.loads(Path(args.result).read_text())
    cfg = result["config"]
    model, tok = load_policy()
    n_train = -(-max(cfg["ks"]) // cfg["samples_per_prompt"])
    prompts = read_prompts(args.prompts, limit=args.offset + n_train + cfg["eval_prompts"])[args.offset:]
    eval_prompts = prompts[n_train : n_train + cfg["eval_prompts"]]
    base = generate(model, tok, eval_prompts, cfg["max_new_tokens"], cfg["eval_temperature"], seed=cfg["seed"] + 1)
    if base[0] != result["rows"][0]["examples"][0]["base"]:
        raise SystemExit("these are not the result's base answers (other prompts, offset or seed?)")
    nll_base = base_nll_rows(model, tok, eval_prompts, base)[0]
    n = len(eval_prompts)
    rates = {}
    for i in range(args.resamples):
        seed = cfg["seed"] + 2 + i
        other = generate(model, tok, eval_prompts, cfg["max_new_tokens"], cfg["eval_temperature"], seed=seed)
        drops = fluency_drops(base_nll_rows(model, tok, eval_prompts, other)[0], nll_base)
        rates[str(seed)] = sum(drops) / n
        print(f"base resample seed {seed}: fluency drop rate {rates[str(seed)]:.3f}", flush=True)
    out = {"command": " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv]),
           "result": Path(args.result).name, "drop_nats": FLUENCY_DROP_NATS, "prompts": n,
           "base_resample_drop_rate": rates,
           "personalized_drop_rate": {f"{s['method']}/{s['explore']}/K={s['k']}": s.get("fluency_drop_rate")
                                      for s in result["summary"]}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

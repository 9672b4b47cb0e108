"""Benchmark: few-shot policy personalization on held-out simulated users.

Runs ``metarlhf eval policy`` (same arguments; defaults below) and adds the targets:

* win rate vs base at K=16 (``meta`` init) >= 0.75, averaged over held-out users;
* ``meta`` init >= 10 points above ``scratch`` at the same step budget;

each for both exploration protocols (``--explore hints plain``, the default).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_eval.py \\
        [--out benchmarks/results/policy_eval.json] [any `metarlhf eval policy` option]
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = {
    "--prompts": str(ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
    "--out": str(ROOT / "benchmarks" / "results" / "policy_eval.json"),
}


def main(argv: list[str]) -> int:
    from metarlhf.cli import main as cli

    args = list(argv)
    for flag, value in DEFAULTS.items():
        if flag not in args:
            args += [flag, value]
    cmd = ["eval", "policy", *args]
    print("command: metarlhf " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = cli(cmd)
    if rc != 0:
        return rc
    out = Path(args[args.index("--out") + 1])
    res = json.loads(out.read_text())
    targets = {}
    for explore in res["config"].get("explore", ["plain"]):  # both protocols reported, hints and plain
        summ = {(r["method"], r["k"]): r for r in res["summary"] if r.get("explore", "plain") == explore}
        t: dict = {}
        for m in ("meta", "scratch"):
            if (m, 16) in summ:
                w = summ[(m, 16)]["win_rate"]
                t[f"win_rate_{m}_k16"] = {"value": w, "target": ">= 0.75", "met": w >= 0.75}
        gaps = {k: summ[("meta", k)]["win_rate"] - summ[("scratch", k)]["win_rate"]
                for (m, k) in summ if m == "meta" and ("scratch", k) in summ}
        if gaps:
            t["meta_minus_scratch_win_rate"] = {
                "by_k": gaps, "target": ">= 0.10 at each K", "met": all(g >= 0.10 for g in gaps.values())}
        targets[f"explore={explore}"] = t
    res["targets"] = targets
    res["command"] = "metarlhf " + shlex.join(cmd)
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    from metarlhf.io import atomic_write_json

    atomic_write_json(out, res)
    print(json.dumps(targets, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

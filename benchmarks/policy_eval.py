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
    from metarlhf.cli import build_parser
    from metarlhf.cli import main as cli
    from metarlhf.evaluate_policy import method_gaps

    args = list(argv)
    for flag, value in DEFAULTS.items():
        if not any(a == flag or a.startswith(flag + "=") for a in args):  # --out x and --out=x alike
            args += [flag, value]
    cmd = ["eval", "policy", *args]
    print("command: metarlhf " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = cli(cmd)
    if rc != 0:
        return rc
    out = Path(build_parser().parse_args(cmd).out)  # where the CLI wrote, however --out was spelled
    res = json.loads(out.read_text())
    targets = {}
    all_gaps = method_gaps(res["rows"])  # meta - scratch, paired by user, with a 95% interval
    for explore in res["config"].get("explore", ["plain"]):  # both protocols reported, hints and plain
        summ = {(r["method"], r["k"]): r for r in res["summary"] if r.get("explore", "plain") == explore}
        t: dict = {}
        for m in ("meta", "scratch"):
            if (m, 16) in summ:
                w = summ[(m, 16)]["win_rate"]
                t[f"win_rate_{m}_k16"] = {"value": w, "ci95": summ[(m, 16)].get("win_rate_ci95"),
                                          "target": ">= 0.75", "met": w >= 0.75}
        gaps = {int(key.split("/k")[1]): g for key, g in all_gaps.items() if key.startswith(explore + "/")}
        if gaps:
            t["meta_minus_scratch_win_rate"] = {
                "by_k": {k: g["gap"] for k, g in gaps.items()},
                "ci95_by_k": {k: g.get("ci95") for k, g in gaps.items()},
                "target": ">= 0.10 at each K", "met": all(g["gap"] >= 0.10 for g in gaps.values())}
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

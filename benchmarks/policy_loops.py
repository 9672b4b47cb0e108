"""Decoding loops in stored `eval policy` answers, without rerunning the evaluation.

An `eval policy` JSON keeps every personalized answer (`answers`) and the base answers
(`base_answers`). This script rebuilds the held-out prompts from the recorded command,
re-scores the answers with each simulated user's true reward (and checks that this
reproduces the stored win rate exactly, so the prompts are the right ones), then reports
per row and per (method, exploration):

* `loop_rate`: the share of answers caught in a decoding loop
  (:func:`metarlhf.evaluate_policy.repetition_loops`); `base_loop_rate` for base;
* `loop_free_win_rate`: the win rate with every loop counted as a loss.

(The live evaluation also reports `sound_win_rate`, with fluency drops counted as losses
as well; the stored JSONs hold no per-answer NLL, so it is not rebuilt here.)

    .venv/bin/python benchmarks/policy_loops.py benchmarks/results/policy_eval_s7.json \\
        [more eval JSONs] --out benchmarks/results/policy_loops.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def held_out_prompts(result: dict) -> list[str]:
    """The eval prompts of a stored run: `--prompts` and `--offset` from its command."""
    from metarlhf.data import read_prompts

    argv = shlex.split(result["command"])
    path = argv[argv.index("--prompts") + 1]
    if not Path(path).exists():  # recorded on another checkout: the file of the same name beside this one
        path = str(ROOT.parent / "shared" / "data" / "hh-rlhf" / Path(path).name)
    offset = int(argv[argv.index("--offset") + 1]) if "--offset" in argv else 1000
    n_train, n_eval = result["n_train_prompts"], result["n_eval_prompts"]
    prompts = read_prompts(path, limit=offset + n_train + n_eval)[offset:]
    return prompts[n_train:n_train + n_eval]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="eval policy JSON files (with `answers`)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_loops.json"))
    args = ap.parse_args(argv)

    from metarlhf.evaluate_policy import load_result, repetition_loops, win_rate, win_rate_without
    from metarlhf.io import atomic_write_json
    from metarlhf.simusers import get_users

    report: dict = {"command": " ".join(["python", *sys.argv]), "files": {}}
    for file in args.results:
        res = load_result(file)
        if "base_answers" not in res:
            print(f"policy_loops: error: {file} holds no answers (eval policy JSONs keep them since session 7)",
                  file=sys.stderr)
            return 2
        prompts = held_out_prompts(res)
        base_answers = res["base_answers"]
        rows = []
        for r in res["rows"]:
            user = get_users([r["user"]])[0]
            pers = [user.reward(p, c) for p, c in zip(prompts, r["answers"], strict=True)]
            base = [user.reward(p, c) for p, c in zip(prompts, base_answers, strict=True)]
            if abs(win_rate(pers, base) - r["win_rate"]) > 1e-9:
                raise SystemExit(f"{file}: {r['user']} {r['method']} {r['explore']}: rebuilt win rate "
                                 f"{win_rate(pers, base):.3f} != stored {r['win_rate']:.3f}; wrong prompts?")
            loops = repetition_loops(r["answers"])
            rows.append({"user": r["user"], "method": r["method"], "explore": r["explore"], "k": r["k"],
                         "win_rate": r["win_rate"], "loop_rate": statistics.mean(loops),
                         "loop_free_win_rate": win_rate_without(pers, base, loops),
                         "loops": [a for a, x in zip(r["answers"], loops, strict=True) if x]})
        summary = []
        for key in sorted({(r["method"], r["explore"], r["k"]) for r in rows}):
            sel = [r for r in rows if (r["method"], r["explore"], r["k"]) == key]
            summary.append({"method": key[0], "explore": key[1], "k": key[2],
                            **{m: statistics.mean(r[m] for r in sel)
                               for m in ("win_rate", "loop_rate", "loop_free_win_rate")}})
            s = summary[-1]
            print(f"{Path(file).name:36s} {key[0]:>8} {key[1]:>8} K={key[2]}: win {s['win_rate']:.3f}  "
                  f"loops {s['loop_rate']:.3f}  loop-free win {s['loop_free_win_rate']:.3f}")
        report["files"][Path(file).name] = {"base_loop_rate": statistics.mean(repetition_loops(base_answers)),
                                            "summary": summary, "rows": rows}
        print(f"{Path(file).name:36s} base answers: loops {report['files'][Path(file).name]['base_loop_rate']:.3f}")
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

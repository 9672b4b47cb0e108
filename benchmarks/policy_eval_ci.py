"""Benchmark: 95% intervals for earlier ``eval policy`` results, from their stored answers.

Results written before the per-prompt ``outcomes`` were kept still hold every answer
(``rows[*].answers`` and ``base_answers``). This script rebuilds the held-out prompts from
the run's own command (``--prompts``, ``--offset``), rescores every answer with the
simulated user's true reward, checks that the rescored win rate equals the stored one (it
stops with an error if any row differs), and reports each (method, explore, K) cell's win
rate with :func:`metarlhf.evaluate_policy.bootstrap_ci` and the paired ``meta`` minus
``scratch`` gap (:func:`metarlhf.evaluate_policy.method_gaps`). The intervals resample the
held-out prompts with the users fixed; they do not cover other users. ``win_rate_ci95_users``
resamples the users as well (a two-stage bootstrap, wider with five users).

``--resample`` also loads the run's base policy, redraws the run's base answers (``seed + 1``)
and stops if they differ from the stored ones (another machine draws other samples), then
draws the independent second base sample (``seed + 2``) that ``eval policy`` now keeps, and
reports ``win_rate_vs_resample``: the personalized answers against it. The headline base
answers share the personalized answers' seed.

    .venv/bin/python benchmarks/policy_eval_ci.py benchmarks/results/policy_eval_s7.json \\
        benchmarks/results/policy_eval_s12_k8_k32.json [--out benchmarks/results/policy_eval_ci.json]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rescore(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The result's rows with ``outcomes`` rebuilt from the stored answers."""
    from metarlhf.cli import build_parser
    from metarlhf.data import prompts_after
    from metarlhf.errors import DataError
    from metarlhf.evaluate_policy import prompt_outcome, win_rate
    from metarlhf.simusers import get_users

    if "base_answers" not in result or any("answers" not in r for r in result["rows"]):
        raise DataError("this result keeps no answers (written before session 7): nothing to rescore")
    args = build_parser().parse_args(shlex.split(result["command"])[1:])  # the run's flags, with their defaults
    if args.users_file:
        raise DataError("users from a --users-file cannot be rebuilt here")
    n_train, n_eval = result["n_train_prompts"], result["n_eval_prompts"]
    prompts = prompts_after(args.prompts, args.offset, n_train + n_eval)[n_train:]
    base = result["base_answers"]
    if len(prompts) != n_eval or len(base) != n_eval:
        raise DataError(f"expected {n_eval} held-out prompts and base answers, got {len(prompts)} / {len(base)}")
    rows = []
    for row in result["rows"]:
        for i, ex in enumerate(row.get("examples", [])):
            if ex["prompt"] != prompts[i] or ex["base"] != base[i]:
                raise DataError(f"row {row['user']}: held-out prompt {i} differs from the run's own")
        (user,) = get_users([row["user"]])
        pers = [user.reward(p, c) for p, c in zip(prompts, row["answers"], strict=True)]
        ref = [user.reward(p, c) for p, c in zip(prompts, base, strict=True)]
        if abs(win_rate(pers, ref) - row["win_rate"]) > 1e-9:
            raise DataError(f"row {row['user']} {row['method']} K={row['k']}: rescored win rate "
                            f"{win_rate(pers, ref):.4f} != stored {row['win_rate']:.4f}")
        rows.append({**row, "outcomes": [prompt_outcome(x, y) for x, y in zip(pers, ref, strict=True)]})
    return rows


def add_resample(result: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``win_rate_vs_resample``, from a second base sample drawn as eval policy draws it."""
    from metarlhf.cli import build_parser
    from metarlhf.data import prompts_after
    from metarlhf.errors import DataError
    from metarlhf.evaluate_policy import win_rate
    from metarlhf.policy import generate, resolve_base
    from metarlhf.simusers import get_users

    args = build_parser().parse_args(shlex.split(result["command"])[1:])
    cfg, n_train, n_eval = result["config"], result["n_train_prompts"], result["n_eval_prompts"]
    prompts = prompts_after(args.prompts, args.offset, n_train + n_eval)[n_train:]
    model, tok, _ = resolve_base(args.policy)
    again = generate(model, tok, prompts, cfg["max_new_tokens"], cfg["eval_temperature"], seed=cfg["seed"] + 1)
    if again != result["base_answers"]:
        raise DataError("the run's base answers do not come out again here (another machine or stack): "
                        "a second sample drawn here would not be the run's")
    resample = result.get("base_resample_answers") or generate(model, tok, prompts, cfg["max_new_tokens"],
                                                               cfg["eval_temperature"], seed=cfg["seed"] + 2)
    out = []
    for row in rows:
        (user,) = get_users([row["user"]])
        pers = [user.reward(p, c) for p, c in zip(prompts, row["answers"], strict=True)]
        ref = [user.reward(p, c) for p, c in zip(prompts, resample, strict=True)]
        out.append({**row, "win_rate_vs_resample": win_rate(pers, ref)})
    return out


def main(argv: list[str]) -> int:
    from metarlhf.errors import DataError
    from metarlhf.evaluate_policy import load_result, method_gaps, summarize
    from metarlhf.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="eval policy result JSON files")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policy_eval_ci.json"))
    ap.add_argument("--resample", action="store_true",
                    help="also the win rate against an independent base sample (loads the base policy)")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"command": "python benchmarks/policy_eval_ci.py " + shlex.join(argv),
                           "interval": "95% percentile bootstrap, 2000 draws, prompts resampled per user, users fixed "
                                       "(win_rate_ci95_users: users resampled too)",
                           "results": {}}
    keys = ("method", "explore", "k", "users", "win_rate", "win_rate_ci95", "win_rate_ci95_users",
            "win_rate_vs_resample")
    for path in args.results:
        result = load_result(path)
        rows = rescore(result)
        note = None
        if args.resample:
            try:
                rows = add_resample(result, rows)
            except DataError as e:  # not this machine's draw: report the rest, say why this is missing
                note = str(e)
                print(f"{Path(path).name}: no second base sample: {e}")
        cells = [{k: s[k] for k in keys if k in s} for s in summarize(rows)]
        out["results"][Path(path).name] = {"n_eval_prompts": len(rows[0]["outcomes"]), "cells": cells,
                                           "meta_minus_scratch": method_gaps(rows),
                                           **({"resample_note": note} if note else {})}
        for c in cells:
            lo, hi = c["win_rate_ci95"]
            ulo, uhi = c["win_rate_ci95_users"]
            vs = f", vs a second base sample {c['win_rate_vs_resample']:.3f}" if "win_rate_vs_resample" in c else ""
            print(f"{Path(path).name}: {c['method']:>8} {c['explore']:>8} K={c['k']:<3} "
                  f"win rate {c['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] (users resampled too [{ulo:.3f}, {uhi:.3f}]){vs}")
        for key, g in method_gaps(rows).items():
            print(f"{Path(path).name}: meta - scratch {key}: {g['gap']:+.3f} "
                  f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]")
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Best-of-N with the user's own reward model, on the held-out users (issue 3, part 2).

``eval policy --methods meta+bon4`` was measured once, in session 3, on training users
with the MiniLM reward init of that time (best-of-4 0.734 against 0.766 without). Since
then the policy recipe, the held-out protocol (``--explore adaptive``) and a more accurate
SmolLM2 reward init (``adapters/meta/reward-smollm2``) have come. This script asks again,
and asks what best-of-N *could* give:

1. Each held-out user gives K thumbs exactly as ``eval policy`` draws them
   (``adaptive_support``), and gets its policy adapter from the init with ``eval policy``'s
   recipe (``EvalConfig.adapt_config``). Its plain answers (``seed + 1``) are the ``meta``
   row of ``eval policy``; with ``--reference`` they are checked against a saved run.
2. The adapted policy draws N answers per held-out prompt, as ``policy.best_of_n`` does
   (the same prompts, seed and batches, so the MiniLM pick at N is ``eval policy``'s
   ``meta+bon<N>`` row). Smaller N are the first n of those N.
3. Each answer is scored by the user's reward model fitted on the same K thumbs: the shipped
   MiniLM init (``personal_scorer``, as ``eval policy`` does) and, with ``--scorers``,
   the SmolLM2 init; ``--extra-minilm NAME=DIR`` adds a MiniLM scorer from another reward
   init (e.g. one meta-trained on ``simuser_reward_data.py``'s thumbs).
4. Reported against the evaluation's base answers, for each n: the win rate of the
   scorer's pick, of a random pick (the mean over the n answers), and of the **oracle**
   pick (the answer the user's true reward likes best: an upper bound for any reranker of
   these samples, not a method), plus each scorer's pairwise accuracy on the samples (pairs
   of one prompt whose true rewards differ) and the fluency-drop rate of the picks.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_best_of_n.py \\
        --reference benchmarks/results/policy_eval_s18_avx2.json \\
        --out benchmarks/results/policy_best_of_n.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SMOL_INIT = ROOT / "adapters" / "meta" / "reward-smollm2"


def pairwise_accuracy(scores: list[float], truth: list[float]) -> tuple[int, int]:
    """(agreeing, counted) over pairs whose true rewards differ; a scorer tie counts 1/2."""
    agree, n = 0.0, 0
    for i, j in combinations(range(len(truth)), 2):
        if truth[i] == truth[j]:
            continue
        n += 1
        d = (scores[i] - scores[j]) * (truth[i] - truth[j])
        agree += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return agree, n


def picks(values: list[float], n: int, m: int) -> list[int]:
    """Per prompt (``n`` answers each, in order), the index of the best-valued of its first ``m``."""
    return [i + max(range(m), key=lambda j, i=i: values[i + j]) for i in range(0, len(values), n)]


def implicit_scores(model, tok, adapter, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
    """The adapted policy as its own reward model (``policy.implicit_scorer``):
    ``log pi(y|x) - log pi_base(y|x)`` summed over the answer's tokens (``implicit``) and
    per token (``implicit_mean``), plus the policy's per-token log-prob alone
    (``policy_logp_mean``: its most likely sample) and the base NLL per token."""
    from metarlhf.policy import adapter_attached, answer_logps

    with adapter_attached(model, adapter) as pm:
        personal, base, n_tok = answer_logps(pm, tok, prompts, completions)
    n_tok = n_tok.clamp(min=1)
    return {"implicit": (personal - base).tolist(), "implicit_mean": ((personal - base) / n_tok).tolist(),
            "policy_logp_mean": (personal / n_tok).tolist(), "base_nll_mean": (-base / n_tok).tolist()}


def fluent_values(values: list[float], nll: list[float], n: int, m: int, drop: float) -> list[float]:
    """``values`` with every answer whose base NLL per token is more than ``drop`` above the
    lowest among its prompt's first ``m`` (``n`` answers per prompt) pushed below the rest: a
    fluency filter that needs no base answer, only the samples themselves. (The pairwise
    accuracy reported for ``implicit_fluent`` is of these shifted values.)"""
    out = list(values)
    for i in range(0, len(values), n):
        best = min(nll[i:i + m])
        for j in range(i, i + n):
            if nll[j] > best + drop:
                out[j] -= 1e9
    return out


def pick_outcomes(truth: list[float], scores: dict[str, list[float]], base_r: list[float], n: int,
                  ns: list[int], nll: list[float] | None) -> tuple[dict, dict, dict]:
    """For each ``m`` in ``ns``: the win rate of a random answer and of the oracle's and each
    scorer's pick among each prompt's first ``m`` answers (``n`` per prompt). Also, at ``m = n``,
    each pick's per-prompt outcomes (random: the mean over the ``n``) and the picked indices.
    ``implicit_fluent`` is re-filtered on the first ``m`` answers (:func:`fluent_values`)."""
    from metarlhf.evaluate_policy import FLUENCY_DROP_NATS, prompt_outcome

    by_n: dict[str, dict[str, float]] = {}
    outcomes: dict[str, list[float]] = {}
    picked: dict[str, list[int]] = {}
    for m in ns:
        random_pp = [statistics.mean(prompt_outcome(truth[i * n + j], b) for j in range(m))
                     for i, b in enumerate(base_r)]
        entry = {"random": statistics.mean(random_pp)}
        for name, values in {"oracle": truth, **scores}.items():
            if name == "implicit_fluent":
                values = fluent_values(scores["implicit"], nll, n, m, FLUENCY_DROP_NATS)
            idx = picks(values, n, m)
            per_prompt = [prompt_outcome(truth[j], b) for j, b in zip(idx, base_r, strict=True)]
            entry[name] = sum(per_prompt) / len(per_prompt)  # = win_rate of the picks
            if m == n:
                outcomes[name], picked[name] = per_prompt, idx
        if m == n:
            outcomes["random"] = random_pp
        by_n[str(m)] = entry
    return by_n, outcomes, picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--users", default="concise-25,numbered,enthusiastic,theme-music,second-person")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="answers drawn per held-out prompt")
    ap.add_argument("--explore", default="adaptive", choices=["adaptive"])
    ap.add_argument("--eval-prompts", type=int, default=12)
    ap.add_argument("--offset", type=int, default=1000, help="eval policy's --offset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="meta", help="policy inits: meta and/or scratch")
    ap.add_argument("--scorers", default="minilm,smollm2",
                    help="reward models: minilm, smollm2 and/or implicit (the adapted policy's own log-ratio "
                         "against base, as sum and per-token mean, the sum among the fluent answers, plus the "
                         "policy's per-token log-prob alone)")
    ap.add_argument("--minilm-init", default=None,
                    help="reward init for the minilm scorer (default: the shipped adapters/meta/reward)")
    ap.add_argument("--extra-minilm", action="append", default=[], metavar="NAME=DIR",
                    help="one more MiniLM scorer, fitted from the reward init DIR and reported as NAME (repeatable)")
    ap.add_argument("--reference", default=None, help="an eval policy JSON of the same command, to check the draw")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)
    scorer_names = args.scorers.split(",")
    extra = dict(e.split("=", 1) for e in args.extra_minilm if "=" in e)
    if (args.n < 2 or any(s not in ("minilm", "smollm2", "implicit") for s in scorer_names)
            or len(extra) != len(args.extra_minilm) or set(extra) & {"oracle", "minilm", "smollm2"}):
        print("error: --n must be >= 2, --scorers a list of minilm / smollm2 / implicit and each --extra-minilm "
              "NAME=DIR with a new NAME", file=sys.stderr)
        raise SystemExit(2)

    from metarlhf.data import prompts_after
    from metarlhf.evaluate_policy import (
        FLUENCY_DROP_NATS,
        EvalConfig,
        adaptive_support,
        base_nll_rows,
        bootstrap_ci,
        fluency_drops,
        personal_scorer,
        prompt_outcome,
        thumbs_rng,
        win_rate,
    )
    from metarlhf.io import atomic_write_json
    from metarlhf.models import EMBEDDED_POLICY_ENCODER
    from metarlhf.policy import adapt_policy, adapter_attached, generate, load_init, resolve_base
    from metarlhf.reward import load_reward_model
    from metarlhf.runtime import software_versions
    from metarlhf.simusers import get_users

    t_start = time.perf_counter()
    ref = json.loads(Path(args.reference).read_text()) if args.reference else None
    cfg = EvalConfig(ks=[args.k], eval_prompts=args.eval_prompts, methods=args.methods.split(","),
                     explore=[args.explore], seed=args.seed)
    acfg = cfg.adapt_config()
    n_train = -(-args.k // cfg.samples_per_prompt)
    prompts = prompts_after(args.prompts, args.offset, n_train + args.eval_prompts)
    train_prompts, eval_prompts = prompts[:n_train], prompts[n_train:]
    model, tok, base_name = resolve_base(None)
    inits = {m: load_init(None if m == "scratch" else "meta", base_name) for m in cfg.methods}
    minilm = load_reward_model(None, adapter_dir=args.minilm_init)
    smol = load_reward_model(EMBEDDED_POLICY_ENCODER, adapter_dir=SMOL_INIT) if "smollm2" in scorer_names else None
    extra_models = {name: load_reward_model(None, adapter_dir=d) for name, d in extra.items()}

    def scorers_for(support: list) -> dict:
        out = {}
        if "minilm" in scorer_names:
            out["minilm"] = personal_scorer(minilm, support, cfg.seed, init=args.minilm_init)
        if smol is not None:
            out["smollm2"] = personal_scorer(smol, support, cfg.seed, init=SMOL_INIT)
        for name, rm in extra_models.items():
            out[name] = personal_scorer(rm, support, cfg.seed, init=extra[name])
        return out

    base_eval = generate(model, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature, seed=cfg.seed + 1)
    nll_base_rows, _ = base_nll_rows(model, tok, eval_prompts, base_eval)
    result: dict = {
        "command": cmd, "software": software_versions(), "config": vars(args),
        "base_matches_reference": ref["base_answers"] == base_eval if ref else None,
        "base_answers": base_eval, "rows": [],
    }
    ns = sorted({n for n in (1, 2, 4, 8, 16, args.n) if n <= args.n})
    n = args.n
    for user in get_users(args.users.split(",")):
        t0 = time.perf_counter()
        support, hints = adaptive_support(model, tok, user, train_prompts, args.k, cfg, thumbs_rng(cfg, user))
        explore_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorers = scorers_for(support)
        reward_s = time.perf_counter() - t0
        base_r = [user.reward(p, c) for p, c in zip(eval_prompts, base_eval, strict=True)]
        for method in cfg.methods:
            t0 = time.perf_counter()
            adapter = adapt_policy(support, base=(model, tok), init=inits[method], seed=cfg.seed, config=acfg,
                                   hints=hints)
            adapt_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with adapter_attached(model, adapter) as pm:
                plain = generate(pm, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature, seed=cfg.seed + 1)
                rep = [p for p in eval_prompts for _ in range(n)]
                samples = generate(pm, tok, rep, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.eval_temperature, seed=cfg.seed + 1)
            gen_s = time.perf_counter() - t0
            truth = [user.reward(p, c) for p, c in zip(rep, samples, strict=True)]
            t0 = time.perf_counter()
            scores = {name: [float(x) for x in f(rep, samples)] for name, f in scorers.items()}
            nll = None
            if "implicit" in scorer_names:
                scores.update(implicit_scores(model, tok, adapter, rep, samples))
                nll = scores.pop("base_nll_mean")
                scores["implicit_fluent"] = fluent_values(scores["implicit"], nll, n, n, FLUENCY_DROP_NATS)
            score_s = time.perf_counter() - t0
            ref_row = next((r for r in ref["rows"] if r["user"] == user.name and r["method"] == method
                            and r["k"] == args.k), None) if ref else None

            by_n, outcomes, picked = pick_outcomes(truth, scores, base_r, n, ns, nll)
            accuracy = {}
            for name, sc in scores.items():
                agree = total = 0
                for i in range(len(eval_prompts)):
                    a, t = pairwise_accuracy(sc[i * n:(i + 1) * n], truth[i * n:(i + 1) * n])
                    agree, total = agree + a, total + t
                accuracy[name] = {"accuracy": agree / total if total else None, "pairs": total}
            drops = {}
            for name, idx in picked.items():
                rows, _ = base_nll_rows(model, tok, eval_prompts, [samples[j] for j in idx])
                drops[name] = statistics.mean(fluency_drops(rows, nll_base_rows))
            plain_r = [user.reward(p, c) for p, c in zip(eval_prompts, plain, strict=True)]
            outcomes["plain"] = [prompt_outcome(r, b) for r, b in zip(plain_r, base_r, strict=True)]
            row = {
                "user": user.name, "family": user.family, "method": method, "k": args.k,
                "n_up": sum(t.label for t in support),
                "plain_win_rate": win_rate(plain_r, base_r),
                "outcomes_at_n": outcomes,  # per prompt: 1 win, 1/2 tie, 0 loss (random: the mean over n)
                "plain_matches_reference": (ref_row["answers"] == plain) if ref_row else None,
                "win_rate_by_n": by_n,
                "scorer_pairwise": accuracy,
                "fluency_drop_rate_at_n": drops,
                "share_of_samples_with_reward_above_base": statistics.mean(
                    truth[i * n + j] > base_r[i] for i in range(len(eval_prompts)) for j in range(n)),
                "explore_s": round(explore_s, 1), "reward_fit_s": round(reward_s, 1),
                "adapt_s": round(adapt_s, 1), "generate_s": round(gen_s, 1), "score_s": round(score_s, 1),
                "picks": {name: [samples[j] for j in idx] for name, idx in picked.items()},
            }
            result["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("user", "method", "n_up", "plain_win_rate",
                                                  "plain_matches_reference", "scorer_pairwise")}),
                  json.dumps(by_n[str(n)]), f"{time.perf_counter() - t_start:.0f} s", flush=True)

    summary = {}
    for method in cfg.methods:
        rows = [r for r in result["rows"] if r["method"] == method]
        summary[method] = {
            "plain": statistics.mean(r["plain_win_rate"] for r in rows),
            "by_n": {str(m): {key: statistics.mean(r["win_rate_by_n"][str(m)][key] for r in rows)
                              for key in rows[0]["win_rate_by_n"][str(m)]} for m in ns},
            "scorer_pairwise_accuracy": {name: statistics.mean(r["scorer_pairwise"][name]["accuracy"]
                                                               for r in rows
                                                               if r["scorer_pairwise"][name]["accuracy"] is not None)
                                         for name in rows[0]["scorer_pairwise"]},
            "fluency_drop_rate_at_n": {name: statistics.mean(r["fluency_drop_rate_at_n"][name] for r in rows)
                                       for name in rows[0]["fluency_drop_rate_at_n"]},
        }

    def gap_ci(rows: list[dict], name: str, against: str) -> tuple[float, float]:
        """Paired 95% interval of ``name``'s per-prompt outcome minus ``against``'s (users fixed)."""
        return bootstrap_ci([[a - b for a, b in zip(r["outcomes_at_n"][name], r["outcomes_at_n"][against],
                                                    strict=True)] for r in rows], seed=args.seed)

    for method in cfg.methods:
        rows = [r for r in result["rows"] if r["method"] == method]
        names = [x for x in rows[0]["outcomes_at_n"] if x not in ("plain", "random")]
        summary[method]["pick_minus_plain_ci"] = {x: gap_ci(rows, x, "plain") for x in names + ["random"]}
        summary[method]["pick_minus_random_ci"] = {x: gap_ci(rows, x, "random") for x in names}
    result["summary"] = summary
    result["target"] = "win rate >= 0.75 at K=16 (issue 3)"
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(args.out, result)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

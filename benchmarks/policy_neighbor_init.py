"""Does a new user gain from starting at the nearest known user's adapter? (issue 3 idea check)

The server starts a user with fewer than ``neighbor_init_below`` records (8) from the
policy adapter of the nearest user in the faiss preference index (``AdaptationRunner.
_policy_init``), and everyone else from the meta-init. This was never measured on the
simulated users. This script measures it with ``eval policy``'s own protocol:

1. **A library of known users.** Each of the 13 *training* users gives K thumbs on
   library prompts (HH-RLHF prompts from ``--library-offset`` on, 500 by default: the recipe
   pilots' range, apart from meta-training's 0-63 and evaluation's 1000+) with the same
   exploration, and gets an adapter from the shipped meta-init, as on the server. Its
   preference vector is the server's (``jobs.user_preference``: MiniLM embeddings of liked
   minus disliked answers).
2. **Each held-out user** collects K thumbs exactly as ``eval policy`` draws them (the same
   seeds; each row records whether the evaluation's support had the same thumbs-up count,
   ``support_matches_eval``), the nearest library user by
   cosine is picked, and ``eval policy`` runs for that user with that user's adapter as the
   init (``--methods <adapter dir>``), so its answers are comparable with ``meta`` and
   ``scratch`` rows of a run with the same command (common random numbers).

Writes a JSON with each held-out user's neighbour, similarity and win rate.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_neighbor_init.py \\
        --work /tmp/s19/nb --out benchmarks/results/policy_neighbor_init_k16.json
    ... --k 4 --explore plain --compare meta,scratch --work /tmp/s19/nb4 \\
        --out benchmarks/results/policy_neighbor_init_k4_plain.json

A ``--work`` directory keeps the library's adapters for a rerun; one made with another
``--k``, ``--explore``, ``--library-offset`` or ``--seed`` is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--users", default="concise-25,numbered,enthusiastic,theme-music,second-person")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--explore", default="adaptive", choices=["adaptive", "plain", "hints"])
    ap.add_argument("--eval-prompts", type=int, default=12)
    ap.add_argument("--offset", type=int, default=1000, help="eval policy's --offset")
    ap.add_argument("--library-offset", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", default="", help="other methods run in the same evaluation, e.g. meta,scratch")
    ap.add_argument("--work", required=True, help="library adapters and per-user eval JSONs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)

    import numpy as np

    from metarlhf.adapters import save_adapter
    from metarlhf.data import prompts_after
    from metarlhf.evaluate_policy import EvalConfig, adaptive_support, evaluate_policy, thumbs_rng
    from metarlhf.io import atomic_write_bytes
    from metarlhf.jobs import user_preference
    from metarlhf.policy import (
        adapt_policy,
        exploration_hints,
        generate,
        resolve_base,
    )
    from metarlhf.reward import load_reward_model
    from metarlhf.runtime import software_versions
    from metarlhf.simusers import TRAIN_USERS, get_users

    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    made = {"k": args.k, "explore": args.explore, "library_offset": args.library_offset, "seed": args.seed}
    stamp = work / "library.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != made:
        print(f"error: {work} holds a library made with {stamp.read_text().strip()}, not {made}: "
              "use another --work", file=sys.stderr)
        raise SystemExit(2)
    atomic_write_bytes(stamp, (json.dumps(made) + "\n").encode())
    model, tok, _ = resolve_base(None)
    embedder = load_reward_model(None)  # the server's personalizer embeds with the default reward model

    class Embed:  # jobs.user_preference's personalizer interface
        @staticmethod
        def embed(prompts: list[str], comps: list[str]) -> np.ndarray:
            import torch

            with torch.no_grad():
                return embedder.embed(prompts, comps).float().cpu().numpy()

    cfg = EvalConfig(ks=[args.k], eval_prompts=args.eval_prompts, methods=["meta"], explore=[args.explore],
                     seed=args.seed)
    s, n_train = cfg.samples_per_prompt, -(-args.k // cfg.samples_per_prompt)

    def support_of(user, train_prompts: list[str]) -> list:
        """``eval policy``'s K thumbs for ``user`` on ``train_prompts`` (its seeds and order)."""
        if args.explore == "adaptive":
            return adaptive_support(model, tok, user, train_prompts, args.k, cfg)[0]
        rng = thumbs_rng(cfg, user)
        rep = [p for p in train_prompts for _ in range(s)]
        hints = exploration_hints(len(rep), args.explore, cfg.plain_every, seed=cfg.seed)
        pool = generate(model, tok, rep, cfg.max_new_tokens, cfg.sample_temperature, seed=cfg.seed, hints=hints)
        thumbs = []
        for i, p in enumerate(train_prompts):
            thumbs += user.thumbs(p, pool[i * s:(i + 1) * s], noise=cfg.label_noise, rng=rng)
        return thumbs[:args.k]

    # 1. the library of known users
    lib_prompts = prompts_after(args.prompts, args.library_offset, n_train)
    library: dict[str, dict] = {}
    acfg = cfg.adapt_config()
    for user in get_users(list(TRAIN_USERS)):
        path = work / "library" / user.name
        support = support_of(user, lib_prompts)
        if not (path / "metarlhf.json").is_file():
            save_adapter(path, adapt_policy(support, base=(model, tok), init="meta", seed=cfg.seed, config=acfg))
        try:
            vec = user_preference(Embed, support)
        except Exception as e:  # noqa: BLE001 - e.g. all thumbs down cancel out: not indexed, as on the server
            print(user.name, "not indexed:", e, flush=True)
            continue
        library[user.name] = {"path": str(path), "vec": vec, "n_up": sum(t.label for t in support)}
        print(f"library {user.name}: {library[user.name]['n_up']} up, {time.perf_counter() - t0:.0f} s", flush=True)

    # 2. the held-out users, each from its nearest library user
    eval_prompts = prompts_after(args.prompts, args.offset, n_train + args.eval_prompts)
    rows = []
    for user in get_users(args.users.split(",")):
        support = support_of(user, eval_prompts[:n_train])
        try:
            vec = user_preference(Embed, support)
            sims = {n: float(np.dot(vec, e["vec"])) for n, e in library.items()}
            nb = max(sims, key=sims.get)
        except Exception as e:  # noqa: BLE001
            print(user.name, "no preference vector:", e, flush=True)
            sims, nb = {}, None
        init = library[nb]["path"] if nb is not None else "meta"
        out = work / f"eval_{user.name}.json"
        compare = [m for m in args.compare.split(",") if m]
        ucfg = EvalConfig(**{**vars(cfg), "methods": list(dict.fromkeys([init, *compare]))})
        res = evaluate_policy([user], eval_prompts, ucfg, base=(model, tok), out=out, progress=False)
        row = res["rows"][0]
        same = row["n_up"] == sum(t.label for t in support)
        rows.append({"user": user.name, "neighbor": nb, "similarity": round(sims.get(nb, float("nan")), 4),
                     "similarities": {n: round(v, 4) for n, v in sorted(sims.items(), key=lambda kv: -kv[1])},
                     "win_rate": row["win_rate"], "win_rate_vs_resample": row["win_rate_vs_resample"],
                     "mean_reward": row["mean_reward"], "n_up": row["n_up"], "support_matches_eval": same,
                     "nll_personal": row["nll_personal"], "nll_base": row["nll_base"], "adapt_s": row["adapt_s"],
                     "compare": {r["method"]: {"win_rate": r["win_rate"], "mean_reward": r["mean_reward"],
                                               "nll_personal": r["nll_personal"]} for r in res["rows"][1:]},
                     "answers": row["answers"], "base_answers": res["base_answers"]})
        print(f"{user.name}: neighbour {nb} ({rows[-1]['similarity']}), win {row['win_rate']:.3f}, "
              f"{ {m: round(c['win_rate'], 3) for m, c in rows[-1]['compare'].items()} }, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    result = {"command": cmd, "what": __doc__.split("\n")[0], "k": args.k, "explore": args.explore,
              "seed": args.seed, "library_offset": args.library_offset, "offset": args.offset,
              "library": {n: {"n_up": e["n_up"]} for n, e in library.items()}, "rows": rows,
              "mean_win_rate": sum(r["win_rate"] for r in rows) / len(rows),
              "mean_win_rate_compare": {m: sum(r["compare"][m]["win_rate"] for r in rows) / len(rows)
                                        for m in (rows[0]["compare"] if rows else {})},
              "software": software_versions(), "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print("mean win rate:", round(result["mean_win_rate"], 4), flush=True)


if __name__ == "__main__":
    main()

"""Thumbs of the simulated *training* users on base-model samples, as feedback JSONL.

The shipped reward init was meta-trained on the persona data (does a persona agree with a
statement?), not on the style of an answer, which is what the simulated users of ``eval
policy`` judge. This writes a meta-training set for ``metarlhf meta-train reward --data``
from the 13 training users (never the held-out five):

* ``--prompts`` from ``--offset`` (100 by default: after policy meta-training's 0-63, before
  the recipe pilots' 500+ and the evaluation's 1000+), ``--samples`` base answers each
  (T=1.0, as ``eval policy``'s thumbs), half of them drawn with a style hint from
  ``policy.STYLE_HINTS`` (``exploration_hints(..., plain_every=2)``) so that every style
  is seen liked and disliked;
* each training user gives its thumbs on each prompt's answers (``SimUser.thumbs``:
  above the group's median is up), one record per user and answer;
* ``--out-heldout`` also writes the five held-out users' thumbs on the same answers, to
  measure a reward init on them (``metarlhf eval reward --data``), never to train on.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/simuser_reward_data.py \\
        --out /tmp/s20/simuser_train.jsonl.gz --out-heldout /tmp/s20/simuser_heldout.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import io
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
    ap.add_argument("--offset", type=int, default=100)
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--samples", type=int, default=2, help="base answers per prompt (>= 2: thumbs are relative)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="a .jsonl.gz file")
    ap.add_argument("--out-heldout", default=None, help="a .jsonl.gz file for the held-out users' thumbs")
    args = ap.parse_args()
    outs = [args.out] + ([args.out_heldout] if args.out_heldout else [])
    if args.samples < 2 or args.n_prompts < 1 or not all(o.endswith(".jsonl.gz") for o in outs):
        print("error: need --samples >= 2, --n-prompts >= 1 and an --out ending in .jsonl.gz", file=sys.stderr)
        raise SystemExit(2)

    from metarlhf.data import prompts_after
    from metarlhf.io import atomic_write_bytes
    from metarlhf.policy import exploration_hints, generate, resolve_base
    from metarlhf.simusers import HELDOUT_USERS, TRAIN_USERS, get_users

    t0 = time.perf_counter()
    prompts = prompts_after(args.prompts, args.offset, args.n_prompts)
    model, tok, base_name = resolve_base(None)
    rep = [p for p in prompts for _ in range(args.samples)]
    hints = exploration_hints(len(rep), "hints", plain_every=2, seed=args.seed)
    answers = generate(model, tok, rep, args.max_new_tokens, 1.0, seed=args.seed, hints=hints)
    gen_s = time.perf_counter() - t0
    ups: dict[str, int] = {}

    def write(path: str, names: tuple[str, ...]) -> None:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
            for user in get_users(list(names)):
                ups[user.name] = 0
                for i, p in enumerate(prompts):
                    for t in user.thumbs(p, answers[i * args.samples:(i + 1) * args.samples]):
                        f.write((json.dumps({"user_id": t.user_id, "prompt": t.prompt, "completion": t.completion,
                                             "label": t.label}) + "\n").encode())
                        ups[user.name] += t.label
        atomic_write_bytes(Path(path), buf.getvalue())

    write(args.out, TRAIN_USERS)
    if args.out_heldout:
        write(args.out_heldout, HELDOUT_USERS)
    summary = {"command": " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv]),
               "base_model": base_name, "prompts": len(prompts), "answers": len(answers),
               "records_per_user": len(answers), "thumbs_up": ups, "generate_s": round(gen_s, 1)}
    atomic_write_bytes(Path(args.out[:-len(".jsonl.gz")] + ".json"), (json.dumps(summary, indent=1) + "\n").encode())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

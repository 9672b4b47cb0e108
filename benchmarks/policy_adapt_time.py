"""Benchmark: wall time of adapting one user's policy LoRA from K=16 thumbs (CPU or CUDA).

Embedded SmolLM2-135M-Instruct, shipped meta init (or --init scratch). The thumbs come
from a simulated user labelling base-model samples (8 prompts x 2 samples, drawn with
the exploration style hints unless --explore plain). Measures ``adapt_policy`` with the
base model already loaded (as in the server) for the default recipe and, with
``--compare``, for other recipes (e.g. all layers trained, fp32), and the full
``metarlhf adapt policy`` command (process start + model load + adapt + save), on the
same ``--device``. ``--ablate N`` then times the default recipe N more times per variant,
the variants alternated in one process, their order rotated each round (so that drift of
a shared CPU hits them alike):
``full``; ``no_pack`` (rows that share a prompt run unpacked, ``policy.PACK_PROMPTS``);
``logits_path`` (neither packing nor the fused LM head: autograd over the full
``[n, C, V]`` logits, as before session 18).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/policy_adapt_time.py
    python benchmarks/policy_adapt_time.py --device cuda --repeats 3   # on a GPU (target <= 3 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"))
    ap.add_argument("--user", default="concise-25")
    ap.add_argument("--init", default="meta")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--explore", choices=["hints", "plain"], default="hints")
    ap.add_argument("--compare", default="", help="JSON {name: AdaptConfig overrides} timed after the default")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--policy", default=None, help="base policy model directory (default: embedded SmolLM2)")
    ap.add_argument("--ablate", type=int, default=0, help="alternated runs per speed-up variant (0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_adapt_time.json"))
    args = ap.parse_args()
    print("command: " + " ".join([sys.executable, *sys.argv]), flush=True)

    from dataclasses import asdict

    import torch

    from metarlhf.data import read_prompts
    from metarlhf.io import atomic_write_json
    from metarlhf.models import load_policy
    from metarlhf.policy import AdaptConfig, adapt_policy, exploration_hints, generate, use_bf16
    from metarlhf.runtime import describe_device, resolve_device, tune_malloc
    from metarlhf.simusers import USERS

    malloc_tuned = tune_malloc()  # as in every `metarlhf` process, the server's included
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 2))
    model, tok = load_policy(args.policy, device=str(device))
    prompts = read_prompts(args.prompts, limit=2000)[1900:1900 + args.k // 2]
    rep = [p for p in prompts for _ in range(2)]
    comps = generate(model, tok, rep, max_new_tokens=48, temperature=1.0, seed=0,
                     hints=exploration_hints(len(rep), args.explore))
    user = USERS[args.user]
    records = []
    for i, p in enumerate(prompts):
        records += user.thumbs(p, comps[2 * i:2 * i + 2])
    # the cold command first, while this process is idle
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fb.jsonl"
        data.write_text("".join(json.dumps({"user_id": t.user_id, "prompt": t.prompt, "completion": t.completion,
                                            "label": t.label}) + "\n" for t in records))
        cmd = [sys.executable, "-m", "metarlhf", "adapt", "policy", "--data", str(data), "--user", user.name,
               "--k", str(len(records)), "--out", str(Path(tmp) / "ad"), "--init", args.init,
               "--device", str(device)] + (["--policy", args.policy] if args.policy else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        cli_s = round(time.perf_counter() - t0, 2)
        cli_adapt_s = json.loads((Path(tmp) / "ad" / "metarlhf.json").read_text())["wall_s"]  # adapt_policy inside it
    init = None if args.init == "scratch" else args.init
    recipes = {"default": {}, **json.loads(args.compare or "{}")}
    timings = {}
    for name, over in recipes.items():
        cfg = AdaptConfig(**{**asdict(AdaptConfig()), **over})
        ts = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            ad = adapt_policy(records, base=(model, tok), init=init, seed=r, config=cfg)
            ts.append(round(time.perf_counter() - t0, 2))
            print(f"{name}: adapt_policy K={len(records)} steps={ad.meta['steps']}: {ts[-1]} s "
                  f"(loss {ad.meta['losses'][0]:.3f} -> {ad.meta['losses'][-1]:.3f})", flush=True)
        timings[name] = {"config": asdict(cfg), "adapt_policy_s": ts, "losses": ad.meta["losses"]}
    times = timings["default"]["adapt_policy_s"]
    ablation = ablate(records, model, tok, init, args.ablate) if args.ablate else None
    limit = 3 if device.type == "cuda" else 60  # the targets
    res = {
        "k": len(records), "user": user.name, "init": args.init, "explore": args.explore,
        "n_up": sum(t.label for t in records), "steps": timings["default"]["config"]["steps"],
        "adapt_policy_s": times, "recipes": timings, "cli_end_to_end_s": cli_s, "cli_adapt_policy_s": cli_adapt_s,
        "ablation": ablation, "tune_malloc": malloc_tuned,
        "bf16_autocast": use_bf16("auto", device.type),
        "target": f"<= {limit} s", "met": max(times) <= limit,
        "device": (f"{describe_device(device)}, torch {torch.__version__}" if device.type == "cuda" else
                   f"CPU ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=2))
    return 0


def ablate(records: list, model: object, tok: object, init: str | None, n: int) -> dict:
    """Default-recipe ``adapt_policy`` wall times with each speed-up switched off, the
    variants alternated ``n`` times: ``{variant: {"s": [...], "final_loss": [...]}}``."""
    from metarlhf import policy

    pack, plain_head = policy.PACK_PROMPTS, policy.plain_head
    variants = {"full": (True, plain_head), "no_pack": (False, plain_head), "logits_path": (False, lambda m: None)}
    out: dict = {name: {"s": [], "final_loss": []} for name in variants}
    try:
        names = list(variants)
        for r in range(n):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always runs first
                packed, head = variants[name]
                policy.PACK_PROMPTS, policy.plain_head = packed, head
                t0 = time.perf_counter()
                ad = policy.adapt_policy(records, base=(model, tok), init=init, seed=r)
                out[name]["s"].append(round(time.perf_counter() - t0, 2))
                out[name]["final_loss"].append(ad.meta["losses"][-1])
                print(f"ablation {name}: {out[name]['s'][-1]} s (loss -> {ad.meta['losses'][-1]:.5f})", flush=True)
    finally:
        policy.PACK_PROMPTS, policy.plain_head = pack, plain_head
    for v in out.values():
        v["mean_s"] = round(sum(v["s"]) / len(v["s"]), 2)
    return out


if __name__ == "__main__":
    sys.exit(main())

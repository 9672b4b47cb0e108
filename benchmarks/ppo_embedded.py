"""PPO of the embedded SmolLM2-135M-Instruct (LoRA) against one persona's personalized reward.

1. Fit a personalized reward adapter for one persona user (``--persona``) from ``--k``
   of their thumbs labels with :func:`metarlhf.reward.adapt_reward`, and store it in an
   adapter store under ``--work`` as ``users/default/<persona>/reward/v1`` + ``CURRENT``.
2. Run ``metarlhf ppo --reward user:<persona>`` on HH-RLHF prompts, evaluating the mean
   reward and KL on held-out HH-RLHF prompts (disjoint from the training prompts)
   before training (step 0) and every ``--eval-every`` steps.
3. Write ``benchmarks/results/ppo_embedded.json`` (reward gain, final KL, the bound,
   the exact command) and ``ppo_embedded.png`` (reward and KL curves).

Run from the repository root (CPU; about 2 cores)::

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/ppo_embedded.py
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

DATA = Path("../shared/data")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--persona", default="agreeableness")
    p.add_argument("--k", type=int, default=64, help="thumbs labels used to fit the reward adapter")
    p.add_argument("--reward-steps", type=int, default=40)
    p.add_argument("--prompts", default=str(DATA / "hh-rlhf/harmless-base-test.jsonl.gz"))
    p.add_argument("--personas", default=str(DATA / "personas"))
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mini-batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-bound", type=float, default=4.0, help="configured bound on the KL per sequence (nats)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the PPO run and its reward model)")
    p.add_argument("--work", default="runs/ppo_embedded")
    p.add_argument("--results", default="benchmarks/results")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from metarlhf.adapters import save_adapter
    from metarlhf.cli import main as cli_main
    from metarlhf.data import read_jsonl, read_prompts
    from metarlhf.io import atomic_write_bytes, atomic_write_json
    from metarlhf.reward import adapt_reward
    from metarlhf.runtime import describe_device

    bench_cmd = "flock /tmp/metarlhf-cpu.lock .venv/bin/python " + shlex.join(sys.argv)
    print("command:", bench_cmd, flush=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    # 1. personalized reward adapter from K thumbs of one persona
    t0 = time.perf_counter()
    records = read_jsonl(Path(a.personas) / f"{a.persona}.jsonl.gz", default_user=a.persona)
    random.Random(0).shuffle(records)
    train_recs = records[: a.k]
    adapter = adapt_reward(train_recs, init="scratch", steps=a.reward_steps, seed=0)
    store = work / "adapters"
    vdir = store / "users" / "default" / a.persona / "reward" / "v1"
    save_adapter(vdir, adapter)
    atomic_write_bytes(vdir.parent / "CURRENT", b"v1\n")
    # how well does it model the persona? accuracy on the persona's held-out labels
    from metarlhf.reward import load_reward_model

    rm = load_reward_model(adapter_dir=vdir)
    test = records[a.k : a.k + 200]
    s = rm.score([r.prompt for r in test], [r.completion for r in test])
    reward_acc = float(((s > 0).long() == torch.tensor([r.label for r in test])).float().mean())
    del rm
    print(f"reward adapter: {a.persona}, K={a.k}, held-out label accuracy {reward_acc:.3f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    # 2. train / held-out prompts, disjoint
    allp = read_prompts(a.prompts)
    train = list(dict.fromkeys(allp[: a.train_prompts]))
    seen = set(train)
    heldout = [q for q in dict.fromkeys(allp[a.train_prompts + 500 :]) if q not in seen][: a.heldout]
    train_file, heldout_file = work / "train_prompts.jsonl", work / "heldout_prompts.jsonl"
    atomic_write_bytes(train_file, "".join(json.dumps({"prompt": q}) + "\n" for q in train).encode())
    atomic_write_bytes(heldout_file, "".join(json.dumps({"prompt": q}) + "\n" for q in heldout).encode())

    out = work / "run"
    cli_args = [
        "ppo", "--prompts", str(train_file), "--reward", f"user:{a.persona}", "--adapters-root", str(store),
        "--out", str(out), "--eval-prompts", str(heldout_file), "--eval-limit", str(a.heldout),
        "--eval-every", str(a.eval_every), "--kl-bound", str(a.kl_bound), "--device", a.device,
        "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--mini-batch-size", str(a.mini_batch_size),
        "--ppo-epochs", "2", "--max-new-tokens", str(a.max_new_tokens), "--max-prompt-tokens", "128",
        "--lr", str(a.lr), "--kl-coef", str(a.kl_coef), "--save-every", "10",
    ]
    ppo_cmd = "metarlhf " + shlex.join(cli_args)
    print("ppo command:", ppo_cmd, flush=True)
    t1 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    rc = cli_main(cli_args)
    ppo_seconds = time.perf_counter() - t1
    if rc != 0:
        print("ppo failed with exit code", rc)
        return rc

    # 3. summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval_reward" in r]
    train_rows = [r for r in rows if "reward" in r]
    first, last = evals[0], evals[-1]
    summary = {
        "command": bench_cmd,
        "ppo_command": ppo_cmd,
        "device": describe_device(a.device),
        "policy": "SmolLM2-135M-Instruct (embedded), LoRA r=8 on q_proj,v_proj",
        "reward": {"persona": a.persona, "k": a.k, "adapt_steps": a.reward_steps, "init": "scratch",
                   "heldout_label_accuracy": reward_acc},
        "heldout_prompts": len(heldout),
        "heldout_reward_before": first["eval_reward"],
        "heldout_reward_after": last["eval_reward"],
        "heldout_reward_gain": last["eval_reward"] - first["eval_reward"],
        "heldout_kl_final": last["eval_kl"],
        "train_kl_final": train_rows[-1]["kl"],
        "train_kl_max": max(r["kl"] for r in train_rows),
        "kl_bound": a.kl_bound,
        "kl_within_bound": last["eval_kl"] < a.kl_bound and train_rows[-1]["kl"] < a.kl_bound,
        "eval_curve": [{"step": r["step"], "reward": r["eval_reward"], "kl": r["eval_kl"]} for r in evals],
        "train_curve": [{k: r[k] for k in ("step", "reward", "kl", "entropy", "clipfrac", "tokens_per_s")}
                        for r in train_rows],
        "ppo_seconds": ppo_seconds,
    }
    results = Path(a.results)
    atomic_write_json(results / "ppo_embedded.json", summary)
    shutil.copyfile(out / "curves.png", results / "ppo_embedded.png")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("eval_curve", "train_curve")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

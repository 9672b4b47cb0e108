"""``metarlhf ppo``: offline batch PPO of the base policy against a reward.

    metarlhf ppo --prompts PATH --reward {base,user:<id>,python:<file>:<fn>} --out DIR [--reward-init DIR]

Writes ``DIR/metrics.jsonl``, ``DIR/curves.png``, ``DIR/checkpoint/`` (``--resume``
continues from it) and the trained policy: ``DIR/adapter/`` (LoRA, the project adapter
format, kind="policy") or, with ``--full``, ``DIR/model/`` (an HF model dir in
safetensors that can replace the base for serving).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

from metarlhf.commands import int_at_least


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`metarlhf.ppo.PPOConfig` field."""
    from metarlhf.ppo.config import PPOConfig  # no torch import

    hints = typing.get_type_hints(PPOConfig)
    group = parser.add_argument_group("PPO hyper-parameters")
    for f in dataclasses.fields(PPOConfig):
        if f.name in ("lora",):
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(hint) is list:
            group.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
            typ = next((a for a in args if a is not type(None)), hint)
            group.add_argument(flag, type=typ, default=None, help=help_)


def register(groups: dict[str, Any]) -> None:
    p = groups["top"].add_parser(
        "ppo", help="offline batch PPO of the base policy against a reward",
        description=__doc__.split("\n\n")[0] + " Writes metrics.jsonl, curves.png, checkpoint/ and the policy.",
    )
    p.add_argument("--prompts", required=True, help="prompt file: HH-RLHF JSONL(.gz), JSONL with 'prompt', or text lines")
    p.add_argument("--reward", required=True,
                   help="'base' (base reward model), 'user:<id>' or 'user:<adapter dir>' (a personalized reward "
                        "adapter), or 'python:<file>:<fn>' with fn(prompts, completions) -> list[float]")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--adapters-root", default="adapters",
                   help="adapter store of user:<id> rewards (default: adapters, in the working directory)")
    p.add_argument("--tenant", default="default", help="tenant of user:<id> rewards (default: default)")
    p.add_argument("--policy", default=None, help="policy model dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--encoder", default=None,
                   help="reward encoder dir, or 'embedded-policy' (SmolLM2; default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--reward-init", default=None,
                   help="reward init for --reward base, made for --encoder (default: the shipped adapters/meta/reward "
                        "of the installed package, made for the default encoder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--full", action="store_true", help="train the full model instead of a LoRA adapter")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N prompts")
    p.add_argument("--eval-prompts", default=None, help="held-out prompt file, scored every --eval-every steps")
    p.add_argument("--eval-limit", type=int_at_least(1), default=64, help="held-out prompts to use (default: 64)")
    p.add_argument("--eval-every", type=int_at_least(0), default=10,
                   help="evaluate every N steps (default: 10; 0: never)")
    p.add_argument("--kl-bound", type=float, default=None, help="draw this KL bound on the plot and report it")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from metarlhf.data import read_prompts
    from metarlhf.models import DEFAULT_POLICY_NAME, load_policy, model_name
    from metarlhf.ppo import (
        PPOConfig,
        PPOTrainer,
        check_out_dir,
        check_reward_init,
        resolve_device,
        resolve_reward,
        train,
    )

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PPOConfig)
                 if getattr(args, f.name, None) is not None}
    overrides["lora"] = not args.full
    config = PPOConfig.from_dict(overrides)
    check_out_dir(args.out, lora=config.lora)  # before any model is loaded, not when saving at the end
    device = resolve_device(args.device)  # fails fast (exit 2) before any model is loaded
    check_reward_init(args.reward, args.reward_init)  # before the prompts are read
    prompts = read_prompts(args.prompts, limit=args.limit)
    eval_prompts = read_prompts(args.eval_prompts, limit=args.eval_limit) if args.eval_prompts else None
    reward_fn = resolve_reward(args.reward, args.adapters_root, args.tenant, args.encoder, device, args.reward_init)
    model, tok = load_policy(args.policy, dtype=torch.float32, device=str(device))
    trainer = PPOTrainer(model, tok, reward_fn, config, device=device)
    result = train(
        trainer, prompts, args.out, eval_prompts=eval_prompts, eval_every=args.eval_every, resume=args.resume,
        progress=not args.no_progress, kl_bound=args.kl_bound,
        base_model_name=model_name(args.policy, DEFAULT_POLICY_NAME),
    )
    last = result["last"]
    summary = {"out": args.out, "policy": result["policy_dir"], "steps": result["steps"]}
    summary.update({k: last[k] for k in ("reward", "kl", "eval_reward", "eval_kl") if k in last})
    print(json.dumps(summary))
    return 0

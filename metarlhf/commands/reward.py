"""``metarlhf meta-train reward``, ``metarlhf adapt reward`` and ``metarlhf eval reward``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metarlhf.commands import (
    add_device_arg,
    add_skip_invalid_arg,
    device_from_args,
    int_at_least,
    support_records,
)
from metarlhf.errors import DataError


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    from metarlhf.meta import ALGOS

    p = groups["meta-train"].add_parser("reward", help="meta-train the reward LoRA + head init (MAML family)")
    p.add_argument("--data", required=True, help="persona directory or JSONL of records with user ids")
    add_skip_invalid_arg(p)
    p.add_argument("--algo", choices=ALGOS, default="metasgd")
    p.add_argument("--out", required=True, help="output init directory (written atomically at the end)")
    p.add_argument("--encoder", default=None,
                   help="local HF encoder dir, or 'embedded-policy' (SmolLM2; default: embedded MiniLM)")
    p.add_argument("--encoder-layers", type=int, default=None, help="use only the encoder's first N layers")
    p.add_argument("--lora-layers", type=int, nargs="+", default=None,
                   help="put the LoRA only on these layer indices (default: every layer)")
    p.add_argument("--standardise", action="store_true",
                   help="standardise pooled features per dimension (label-free statistics of the train users, "
                        "stored in the init); for decoder encoders, whose hidden states have huge dimensions")
    p.add_argument("--first-order", action="store_true", help="metasgd: detach inner gradients")
    p.add_argument("--inner", choices=["head", "all", "subspace"], default="head",
                   help="what the inner loop adapts: the head (ANIL), LoRA + head, or r coordinates of the head "
                        "in a meta-learned basis (subspace)")
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--inner-lr-head", type=float, default=3.0, help="initial inner lr of the head weights")
    p.add_argument("--inner-lr-bias", type=float, default=1.0, help="initial inner lr of the head bias")
    p.add_argument("--inner-lr-z", type=float, default=1.0, help="subspace: initial inner lr of the coordinates")
    p.add_argument("--inner-lr-r", type=float, default=0.0,
                   help="subspace: initial inner lr of a full residual r added to the head (0: no residual)")
    p.add_argument("--resid-l2", type=float, default=0.0, help="subspace + residual: L2 pull of r to 0")
    p.add_argument("--keep-basis", action="store_true",
                   help="with --init-from a subspace init: keep its w0, b0, basis and inner rates (no new PCA)")
    p.add_argument("--basis-rank", type=int, default=16, help="subspace: rank of the head basis")
    p.add_argument("--basis-records", type=int, default=128,
                   help="subspace: records per train user for the PCA start of the basis")
    p.add_argument("--steps", type=int, default=300, help="meta-steps (meta-batches)")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--meta-lr", type=float, default=2e-3)
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16], help="support sizes sampled per task")
    p.add_argument("--query", type=int, default=24, help="query records per task")
    p.add_argument("--val-every", type=int, default=30)
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--holdout-test", type=int, default=20, help="users held out for testing (never seen)")
    p.add_argument("--holdout-val", type=int, default=10, help="users held out for validation")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None,
                   help="warm start: LoRA + head of this reward init (meta-trained on the same split)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this wall time (then validate)")
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>.ckpt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=_meta_train)

    p = groups["adapt"].add_parser("reward", help="fit one user's reward adapter")
    p.add_argument("--data", required=True)
    add_skip_invalid_arg(p)
    p.add_argument("--user", required=True)
    p.add_argument("--k", type=int_at_least(1), required=True, help="number of the user's records to adapt on")
    p.add_argument("--out", required=True)
    p.add_argument("--init", default=None, help="init dir, or 'scratch' (default: shipped meta-init)")
    p.add_argument("--encoder", default=None,
                   help="local HF encoder dir, or 'embedded-policy' (SmolLM2; default: embedded MiniLM)")
    p.add_argument("--steps", type=int_at_least(0), default=None, help="default: the init's inner steps")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.set_defaults(func=_adapt)

    p = groups["eval"].add_parser("reward", help="few-shot accuracy of base / linear / scratch / meta")
    p.add_argument("--data", required=True)
    add_skip_invalid_arg(p)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", default=None, help="file of user ids, one per line")
    who.add_argument("--holdout", type=int_at_least(1), default=None, help="the N held-out test users of the split")
    p.add_argument("--k", type=int_at_least(1), nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--out", required=True,
                   help="results JSON, not ending in .png (a PNG and a .detail.json go next to it)")
    p.add_argument("--init", default=None, help="meta-init dir (default: shipped)")
    p.add_argument("--encoder", default=None,
                   help="local HF encoder dir, or 'embedded-policy' (SmolLM2; default: embedded MiniLM)")
    p.add_argument("--seeds", type=int_at_least(1), default=2)
    p.add_argument("--query", type=int_at_least(1), default=200)
    p.add_argument("--steps", type=int_at_least(0), default=None,
                   help="step budget for every method (default: init's)")
    p.add_argument("--methods", nargs="+", default=["base", "linear", "scratch", "meta"])
    add_device_arg(p)
    p.set_defaults(func=_eval)


def _meta_train(args: argparse.Namespace) -> int:
    from metarlhf.adapters import check_out
    from metarlhf.meta import MetaTrainConfig, meta_train_reward

    device = device_from_args(args)
    check_out(args.out, kind="reward_init")  # before hours of training, not when saving at the end
    cfg = MetaTrainConfig(
        algo=args.algo, first_order=args.first_order, inner=args.inner, inner_steps=args.inner_steps, inner_lr_head=args.inner_lr_head,
        inner_lr_bias=args.inner_lr_bias, inner_lr_z=args.inner_lr_z, basis_rank=args.basis_rank,
        inner_lr_r=args.inner_lr_r, resid_l2=args.resid_l2, keep_basis=args.keep_basis,
        basis_records=args.basis_records,
        steps=args.steps, meta_batch=args.meta_batch, meta_lr=args.meta_lr, k_choices=list(args.k),
        n_query=args.query, val_every=args.val_every, ckpt_every=args.ckpt_every, seed=args.seed,
        holdout_test=args.holdout_test, holdout_val=args.holdout_val, split_seed=args.split_seed,
        max_seconds=args.max_seconds, init_from=args.init_from, encoder_layers=args.encoder_layers,
        lora_layers=args.lora_layers, standardise=args.standardise,
    )
    result = meta_train_reward(args.data, args.out, cfg, encoder_dir=args.encoder, resume=args.resume,
                               ckpt_dir=args.checkpoint_dir, progress=not args.no_progress, device=device,
                               skip_invalid=args.skip_invalid)
    print(json.dumps(result))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from metarlhf.adapters import check_out, save_adapter
    from metarlhf.reward import adapt_reward

    device = device_from_args(args)
    check_out(args.out, kind="reward")  # before the data and the model are read
    support = support_records(args.data, args.user, args.k, seed=args.seed, skip_invalid=args.skip_invalid)
    t0 = time.perf_counter()
    adapter = adapt_reward(support, init=args.init, encoder=args.encoder, steps=args.steps, seed=args.seed,
                           device=device)
    save_adapter(args.out, adapter)
    print(json.dumps({"out": args.out, "k": args.k, "steps": adapter.meta["steps"],
                      "final_loss": adapter.meta["final_loss"], "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from metarlhf.evaluate_reward import evaluate_reward

    device = device_from_args(args)
    users = None
    if args.users is not None:
        path = Path(args.users)
        if not path.is_file():
            raise DataError(f"{path}: no such users file")
        users = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not users:
            raise DataError(f"{path}: no user ids")
        dup = sorted({u for u in users if users.count(u) > 1})
        if dup:  # each would be scored twice and weigh twice in every mean
            raise DataError(f"{path}: user ids listed more than once: {', '.join(dup[:5])}")
    result = evaluate_reward(args.data, args.out, users=users, holdout=args.holdout, ks=list(args.k),
                             init=args.init, encoder_dir=args.encoder, seeds=args.seeds, max_query=args.query,
                             steps=args.steps, methods=list(args.methods), device=device,
                             skip_invalid=args.skip_invalid)
    print(json.dumps(result))
    return 0

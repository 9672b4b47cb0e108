"""``metarlhf meta-train policy``, ``metarlhf adapt policy`` and ``metarlhf eval policy``."""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from metarlhf.commands import (
    add_device_arg,
    add_skip_invalid_arg,
    device_from_args,
    int_at_least,
    support_records,
)
from metarlhf.errors import ConfigError

log = logging.getLogger(__name__)


def _base(args: argparse.Namespace, device: str) -> tuple:
    """The base policy ``(model, tokenizer)`` from ``--policy``, on ``device``."""
    from metarlhf.models import load_policy

    return load_policy(args.policy, device=device)


_positive = int_at_least(1)
_nonneg = int_at_least(0)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    from metarlhf.policy import EXPLORE_MODES, META_ALGOS, AdaptConfig

    p = groups["meta-train"].add_parser("policy", help="meta-train the policy LoRA init over simulated users")
    p.add_argument("--algo", choices=list(META_ALGOS), default="reptile",
                   help="reptile / fomaml: first-order meta-gradients on A and B; subspace: A from the top singular "
                        "directions of per-task updates, B = 0 (the init is the base model)")
    p.add_argument("--prompts", required=True, help="HH-RLHF .jsonl.gz (first Human turn) or JSONL of prompts")
    p.add_argument("--out", required=True, help="output adapter directory (kind policy_init)")
    p.add_argument("--work", default=None, help="work dir for pool/metrics/checkpoints (default <out>.work)")
    p.add_argument("--users", default=None, help="comma-separated simulated users (default: the training split)")
    p.add_argument("--allow-heldout", action="store_true",
                   help="let --users name held-out users (meta-training on them leaks them into `eval policy`)")
    p.add_argument("--users-file", default=None, help="Python file defining USERS = {name: f(prompt, completion)}")
    p.add_argument("--meta-steps", type=_positive, default=40)
    p.add_argument("--inner-steps", type=_positive, default=4)
    p.add_argument("--support-prompts", type=_positive, default=4)
    p.add_argument("--query-prompts", type=_positive, default=4)
    p.add_argument("--samples-per-prompt", type=_positive, default=2)
    p.add_argument("--pool-prompts", type=_positive, default=64)
    p.add_argument("--offset", type=_nonneg, default=0, help="skip the first N prompts of the file")
    p.add_argument("--max-new-tokens", type=_positive, default=48)
    p.add_argument("--lr", type=float, default=AdaptConfig.lr, help="inner (adaptation) Adam lr")
    p.add_argument("--reptile-eps", type=float, default=0.1)
    p.add_argument("--task-a", choices=["shared", "per-task"], default="shared",
                   help="subspace: every task starts from the same seeded A (shared) or its own draw (per-task)")
    p.add_argument("--outer-lr", type=float, default=1e-3, help="fomaml outer Adam lr")
    p.add_argument("--checkpoint-every", type=_positive, default=5)
    p.add_argument("--policy", default=None, help="base policy model directory (default: embedded SmolLM2)")
    add_device_arg(p)
    p.add_argument("--resume", action="store_true", help="continue from <work>/checkpoint")
    p.add_argument("--explore", choices=["hints", "plain"], default="plain",
                   help="pool samples drawn with style hints (as `eval policy --explore hints`) or plain")
    _recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_meta_train)

    p = groups["adapt"].add_parser("policy", help="fit one user's policy LoRA from thumbs (KTO) / pairs (DPO)")
    p.add_argument("--data", required=True, help="feedback JSONL file or per-user directory")
    add_skip_invalid_arg(p)
    p.add_argument("--user", required=True, help="user id whose records to use")
    p.add_argument("--k", type=_positive, required=True, help="number of records to adapt on")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--init", default="meta", help="'meta' (shipped init, default), 'scratch', or an adapter dir")
    p.add_argument("--policy", default=None, help="base policy model directory (default: embedded SmolLM2)")
    add_device_arg(p)
    p.add_argument("--steps", type=_positive, default=AdaptConfig.steps)
    p.add_argument("--lr", type=float, default=AdaptConfig.lr, help="Adam lr (AdaptConfig default)")
    p.add_argument("--beta", type=float, default=0.1)
    _recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapt)

    p = groups["eval"].add_parser("policy", help="few-shot policy personalization on simulated users")
    p.add_argument("--users-file", default=None, help="Python file defining USERS = {name: f(prompt, completion)}")
    p.add_argument("--users", default=None, help="comma-separated users (default: held-out built-ins + file's)")
    p.add_argument("--k", type=_positive, nargs="+", default=[8, 16, 32])
    p.add_argument("--prompts", required=True, help="HH-RLHF .jsonl.gz or JSONL of prompts")
    p.add_argument("--offset", type=_nonneg, default=1000, help="skip the first N prompts (meta-training's)")
    p.add_argument("--eval-prompts", type=_positive, default=16, help="held-out prompts per user")
    p.add_argument("--samples-per-prompt", type=_positive, default=2)
    p.add_argument("--methods", default="meta,scratch",
                   help="comma-separated: meta, scratch, or adapter dirs, each optionally +bon<N> (best of N by "
                        "the user's reward model), +ibon<N> (by the user's adapter itself), +aug<N> or +rank")
    p.add_argument("--init", default=None, help="adapter dir used for method 'meta' (default: shipped)")
    p.add_argument("--allow-seen", action="store_true",
                   help="evaluate users or prompts an init was meta-trained on (refused by default)")
    p.add_argument("--steps", type=_positive, default=AdaptConfig.steps)
    p.add_argument("--lr", type=float, default=AdaptConfig.lr, help="Adam lr (AdaptConfig default)")
    p.add_argument("--max-new-tokens", type=_positive, default=48)
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--explore", nargs="+", choices=EXPLORE_MODES, default=["hints", "plain"],
                   help="exploration protocols for the thumbs samples: fixed style-hint schedule, plain, or a "
                        "Thompson-sampling bandit over the hints (adaptive)")
    p.add_argument("--plain-every", type=_nonneg, default=4, help="hints protocol: every n-th sample is plain")
    p.add_argument("--round-prompts", type=_positive, default=2,
                   help="adaptive protocol: prompts per round after the first half of K")
    d = AdaptConfig()
    p.add_argument("--distill-samples", type=_nonneg, default=d.distill_samples,
                   help="extra self-generated thumbs up in the style the user's thumbs liked (needs hinted "
                        "exploration; 0: off)")
    p.add_argument("--distill-hints", type=_positive, default=d.distill_hints,
                   help="how many liked hints the extra samples use")
    _recipe_args(p)
    p.add_argument("--policy", default=None, help="base policy model directory (default: embedded SmolLM2)")
    add_device_arg(p)
    p.add_argument("--out", required=True, help="results JSON (a PNG is written next to it)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)


def _nonneg_float(value: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        x = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from e
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return x


def _recipe_args(p: argparse.ArgumentParser) -> None:
    """Loss mix and trained layers of the adaptation (defaults: :class:`metarlhf.policy.AdaptConfig`)."""
    from metarlhf.policy import AdaptConfig

    d = AdaptConfig()
    p.add_argument("--kto-weight", type=float, default=d.kto_weight, help="weight of KTO on thumbs")
    p.add_argument("--sft-weight", type=float, default=d.sft_weight,
                   help="weight of the per-token NLL of thumbs-up / chosen completions")
    p.add_argument("--pair-weight", type=float, default=d.pair_weight,
                   help="weight of DPO on (up, down) thumbs of the same prompt")
    p.add_argument("--train-layers", type=_nonneg, default=None,
                   help=f"train the LoRA of the top N decoder layers only (0: all; at most the policy's layer "
                        f"count; default: {d.train_layers}, all of a smaller model's)")
    p.add_argument("--kl-weight", type=_nonneg_float, default=d.kl_weight,
                   help="fluency anchor: weight of the per-token KL(reference || policy) on the feedback's "
                        "completions (0: off)")
    p.add_argument("--contrast-weight", type=_nonneg_float, default=d.contrast_weight,
                   help="prompt contrast: weight of DPO between each thumbs-up answer after its own prompt and "
                        "after another support prompt, against memorised templates (0: off)")


def _train_layers(args: argparse.Namespace) -> int:
    """``--train-layers``, or the :class:`metarlhf.policy.AdaptConfig` default."""
    from metarlhf.policy import AdaptConfig

    return AdaptConfig.train_layers if args.train_layers is None else args.train_layers


def _check_train_layers(args: argparse.Namespace, model: object) -> None:
    """An explicit ``--train-layers`` above the policy's decoder layer count is refused (the
    default, made for SmolLM2's 30 layers, trains all layers of a smaller model)."""
    from metarlhf.policy import decoder_of

    dec = decoder_of(model)
    if args.train_layers is not None and dec is not None and args.train_layers > len(dec.layers):
        raise ConfigError(f"--train-layers {args.train_layers}, but the policy has only {len(dec.layers)} decoder "
                          "layers (0 trains all)")


def _users(names: str | None, users_file: str | None, default: tuple[str, ...]) -> list:
    from metarlhf.simusers import get_users, load_users_file

    extra = load_users_file(users_file) if users_file else {}
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not wanted:
            raise ConfigError("--users is empty")
        return get_users(wanted, extra)
    return get_users(list(default), extra) + [u for n, u in extra.items() if n not in default]


def cmd_meta_train(args: argparse.Namespace) -> int:
    from metarlhf.adapters import check_out
    from metarlhf.data import read_prompts
    from metarlhf.policy import AdaptConfig, MetaConfig, check_meta_train, meta_train_policy
    from metarlhf.simusers import HELDOUT_USERS, TRAIN_USERS

    device = device_from_args(args)
    check_out(args.out, kind="policy_init")  # before the model is loaded and trained, not when saving at the end
    if args.users and not args.allow_heldout:
        heldout = [n.strip() for n in args.users.split(",") if n.strip() in HELDOUT_USERS]
        if heldout:
            raise ConfigError(f"--users names held-out user(s) {', '.join(heldout)}: meta-training on them leaks "
                              "them into `eval policy`; pass --allow-heldout to do it anyway")
    cfg = MetaConfig(
        algo=args.algo, meta_steps=args.meta_steps, inner_steps=args.inner_steps,
        support_prompts=args.support_prompts, query_prompts=args.query_prompts,
        samples_per_prompt=args.samples_per_prompt, pool_prompts=args.pool_prompts,
        max_new_tokens=args.max_new_tokens, reptile_eps=args.reptile_eps, outer_lr=args.outer_lr,
        checkpoint_every=args.checkpoint_every, seed=args.seed, explore=args.explore,
        task_a=args.task_a,
    )
    acfg = AdaptConfig(lr=args.lr, kto_weight=args.kto_weight, sft_weight=args.sft_weight,
                       pair_weight=args.pair_weight, train_layers=_train_layers(args), kl_weight=args.kl_weight,
                       contrast_weight=args.contrast_weight)
    users = _users(args.users, args.users_file, TRAIN_USERS) if (args.users or args.users_file) else _users(
        None, None, TRAIN_USERS)
    prompts = read_prompts(args.prompts, limit=args.offset + cfg.pool_prompts)[args.offset:]
    # before the model is loaded: too few prompts, a --work holding other files, unreadable files of a
    # run to resume (meta_train_policy checks again; it only reads)
    check_meta_train(prompts, users, args.out, args.work, cfg, acfg, resume=args.resume)
    base = _base(args, device)
    _check_train_layers(args, base[0])
    t0 = time.perf_counter()
    adapter = meta_train_policy(prompts, users, args.out, work=args.work, config=cfg, adapt_config=acfg,
                                base=base, resume=args.resume,
                                source={"prompts": str(args.prompts), "offset": args.offset})
    print(f"wrote {args.out} ({args.algo}, {cfg.meta_steps} meta-steps over {len(users)} users, "
          f"{time.perf_counter() - t0:.0f} s this run, {adapter.meta['wall_s']} s total)")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from metarlhf.adapters import check_out, save_adapter
    from metarlhf.policy import AdaptConfig, adapt_policy

    device = device_from_args(args)
    check_out(args.out, kind="policy")  # before the data and the model are read
    support = support_records(args.data, args.user, args.k, seed=args.seed, skip_invalid=args.skip_invalid)
    cfg = AdaptConfig(steps=args.steps, lr=args.lr, beta=args.beta, kto_weight=args.kto_weight,
                      sft_weight=args.sft_weight, pair_weight=args.pair_weight, train_layers=_train_layers(args),
                      kl_weight=args.kl_weight, contrast_weight=args.contrast_weight)
    base = _base(args, device)
    _check_train_layers(args, base[0])
    init = None if args.init == "scratch" else args.init
    t0 = time.perf_counter()
    adapter = adapt_policy(support, base=base, init=init, seed=args.seed, config=cfg)
    save_adapter(Path(args.out), adapter)
    losses = adapter.meta["losses"]
    print(f"wrote {args.out}: user {args.user}, K={len(support)}, {cfg.steps} steps, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from metarlhf.data import prompts_after
    from metarlhf.evaluate_policy import EvalConfig, check_eval_out, check_init_overlap, evaluate_policy
    from metarlhf.simusers import HELDOUT_USERS

    check_eval_out(args.out)  # before the model is loaded, not after the whole evaluation
    device = device_from_args(args)
    users = _users(args.users, args.users_file, HELDOUT_USERS)
    cfg = EvalConfig(
        ks=list(dict.fromkeys(args.k)), eval_prompts=args.eval_prompts, samples_per_prompt=args.samples_per_prompt,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], steps=args.steps, lr=args.lr,
        max_new_tokens=args.max_new_tokens, label_noise=args.label_noise, seed=args.seed, meta_init=args.init,
        explore=list(dict.fromkeys(args.explore)), plain_every=args.plain_every, kto_weight=args.kto_weight,
        sft_weight=args.sft_weight, pair_weight=args.pair_weight, train_layers=_train_layers(args),
        kl_weight=args.kl_weight, contrast_weight=args.contrast_weight, distill_samples=args.distill_samples,
        distill_hints=args.distill_hints, round_prompts=args.round_prompts, allow_seen=args.allow_seen,
    )
    if args.init is not None and not any(m.split("+")[0] == "meta" for m in cfg.methods):
        raise ConfigError(f"--init is the init of method 'meta' (and meta+...), which --methods {args.methods!r} "
                          "does not run; add meta to --methods or leave --init out")
    n_train = -(-max(cfg.ks) // cfg.samples_per_prompt)
    prompts = prompts_after(args.prompts, args.offset, n_train + cfg.eval_prompts)
    # before the model is loaded: an init meta-trained on these users or prompts
    check_init_overlap(cfg, [u.name for u in users], prompts[: n_train + cfg.eval_prompts], warn=False)  # fail fast
    base = _base(args, device)
    _check_train_layers(args, base[0])
    result = evaluate_policy(users, prompts, cfg, base=base, out=args.out)
    for row in result["summary"]:
        ci = "[{:.3f}, {:.3f}]".format(*row["win_rate_ci95"]) if "win_rate_ci95" in row else ""
        print(f"{row['method']:>8} {row['explore']:>5} K={row['k']:<3} win rate {row['win_rate']:.3f} {ci} "
              f"mean reward {row['mean_reward']:+.3f} (base {row['base_mean_reward']:+.3f})  "
              f"adapt {row['adapt_s']:.1f} s")
    print(f"wrote {args.out}")
    return 0

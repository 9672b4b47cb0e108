"""``metarlhf generate``: generate with the base policy or one user's policy adapter.

    metarlhf generate --message "How do I make tea?" [--adapter DIR] [--stream]
    metarlhf generate --prompt "Once upon a time" --temperature 0.8 --seed 1 [--policy DIR]

Runs one request through :class:`metarlhf.engine.MultiAdapterEngine` (chat messages go
through the model's chat template). Bad parameters or adapters exit with code 2.
"""

from __future__ import annotations

import argparse
import sys


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    p = groups["top"].add_parser("generate", help="generate text with the base policy or a user's adapter")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--message", help="a user chat message (rendered with the model's chat template)")
    src.add_argument("--prompt", help="raw completion prompt")
    p.add_argument("--system", default=None, help="optional system message (with --message)")
    p.add_argument("--adapter", default=None, help="policy adapter directory (default: the base model)")
    p.add_argument("--user", default="cli", help="user name for the adapter cache key")
    p.add_argument("--policy", "--model-dir", dest="policy", default=None,
                   help="base policy model directory (default: embedded SmolLM2); --model-dir is an alias")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from metarlhf.engine import AdapterRef, GenerationRequest, MultiAdapterEngine, SamplingParams
    from metarlhf.errors import ConfigError

    if args.system is not None and args.message is None:
        raise ConfigError("--system goes with --message (a chat); a raw --prompt has no system message")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop=args.stop, seed=args.seed)
    if args.message is not None:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append({"role": "user", "content": args.message})
        kw = {"messages": msgs}
    else:
        kw = {"prompt": args.prompt}
    ref = AdapterRef(args.user, 1, args.adapter) if args.adapter else None
    req = GenerationRequest(adapter=ref, params=params, **kw)
    engine = MultiAdapterEngine.from_pretrained(args.policy, capacity=2)
    if args.stream:
        for delta in engine.stream(req):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        res = engine.generate_one(req)
        print(res.text)
        print(f"[{res.prompt_tokens} prompt tokens, {res.completion_tokens} completion tokens, "
              f"finish: {res.finish_reason}]", file=sys.stderr)
    return 0

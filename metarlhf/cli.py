"""The ``metarlhf`` command line.

    metarlhf meta-train {reward,policy} ...
    metarlhf adapt      {reward,policy} ...
    metarlhf eval       {reward,policy} ...
    metarlhf ppo ...
    metarlhf serve ...
    metarlhf generate ...

Each feature module contributes its subcommands through ``register(groups)``; this
file only wires them up and turns domain errors into a message and exit code 2.
Heavy imports happen inside the command handlers, so ``metarlhf --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from metarlhf.errors import MetaRLHFError

#: Modules that define ``register(groups: dict[str, argparse._SubParsersAction]) -> None``.
COMMAND_MODULES = [
    "metarlhf.commands.reward",
    "metarlhf.commands.policy",
    "metarlhf.commands.ppo",
    "metarlhf.commands.serve",
    "metarlhf.commands.generate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarlhf", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {"top": top}
    for name, help_ in [
        ("meta-train", "meta-train a LoRA initialisation (MAML family)"),
        ("adapt", "fit one user's adapter from their feedback"),
        ("eval", "evaluate few-shot personalization"),
    ]:
        p = top.add_parser(name, help=help_)
        groups[name] = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # feature not built yet
                continue
            raise
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    from metarlhf.runtime import tune_malloc

    tune_malloc()  # fewer page faults in training loops (no-op off glibc)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except MetaRLHFError as e:
        print(f"metarlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metarlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

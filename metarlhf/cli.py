"""The ``metarlhf`` command line.

    metarlhf meta-train {reward,policy} ...
    metarlhf adapt      {reward,policy} ...
    metarlhf eval       {reward,policy} ...
    metarlhf ppo ...
    metarlhf serve ...
    metarlhf generate ...

Each feature module contributes its subcommands through ``register(groups)``; this
file only wires them up and turns domain errors (any :class:`MetaRLHFError`) and
operating-system errors on the paths given (``OSError``: a file where a directory is
expected, no permission, disk full) into a ``metarlhf: error: ...`` line and exit code 2.
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


def os_error_message(e: OSError) -> str:
    """``[Errno 17] File exists: 'x'`` -> ``cannot use 'x': file exists``."""
    if e.filename is None or not e.strerror:
        return str(e)
    where = repr(str(e.filename)) + (f" -> {str(e.filename2)!r}" if e.filename2 is not None else "")
    return f"cannot use {where}: {e.strerror[0].lower()}{e.strerror[1:]}"


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
    except OSError as e:  # a path the OS refuses: caused by the arguments or the machine, not a bug
        logging.getLogger(__name__).debug("OSError", exc_info=True)
        print(f"metarlhf: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metarlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

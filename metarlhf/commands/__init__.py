"""CLI subcommands, one module per feature. See ``metarlhf.cli``."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` for a command that loads a model."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")


def device_from_args(args: argparse.Namespace) -> str:
    """``--device`` resolved and checked first (exit 2 before any data or model is read)."""
    from metarlhf.runtime import resolve_device

    return str(resolve_device(args.device))


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (anything else exits 2 naming the flag)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from e
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    return parse


def add_skip_invalid_arg(p: argparse.ArgumentParser) -> None:
    """``--skip-invalid`` for a command that reads feedback records with ``--data``."""
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed lines of --data (counted, with a warning) instead of stopping at the first")


def support_records(path: str, user_id: str, k: int, seed: int = 0, skip_invalid: bool = False) -> list:
    """K support records of one user: :func:`metarlhf.data.user_support` (imported when called)."""
    from metarlhf.data import user_support

    return user_support(path, user_id, k, seed=seed, skip_invalid=skip_invalid)

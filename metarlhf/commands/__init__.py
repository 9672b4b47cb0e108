"""CLI subcommands, one module per feature. See ``metarlhf.cli``."""

from __future__ import annotations

import argparse


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` for a command that loads a model."""
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")


def device_from_args(args: argparse.Namespace) -> str:
    """``--device`` resolved and checked first (exit 2 before any data or model is read)."""
    from metarlhf.runtime import resolve_device

    return str(resolve_device(args.device))

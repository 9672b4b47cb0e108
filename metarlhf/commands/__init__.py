"""CLI subcommands, one module per feature. See ``metarlhf.cli``."""

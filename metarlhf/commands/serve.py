"""``metarlhf serve``: start the personalization server with uvicorn.

Settings come from ``METARLHF_*`` environment variables (see ``server/settings.py``);
the flags here override the most common ones. With no API key configured, a key for
tenant ``default`` is generated and printed.
"""

from __future__ import annotations

import argparse


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    p = groups["top"].add_parser("serve", help="run the personalization server (OpenAI-compatible API + web page)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1 or METARLHF_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000 or METARLHF_PORT)")
    p.add_argument("--adapter-root", default=None, help="adapter store root (default adapters/)")
    p.add_argument("--policy", "--policy-dir", dest="policy_dir", default=None,
                   help="base policy model directory (default: embedded SmolLM2); --policy-dir is an alias")
    p.add_argument("--encoder-dir", default=None, help="local HF encoder directory, or 'embedded-policy' (default: embedded MiniLM)")
    p.add_argument("--reward-init", default=None,
                   help="reward init dir for --encoder-dir, or 'scratch' (default: the shipped init if it fits)")
    p.add_argument("--adapt-threshold", type=int, default=None, help="new feedback records that trigger adaptation")
    p.add_argument("--device", default=None, help="policy device: auto (default: CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import secrets

    import uvicorn
    from pydantic import ValidationError

    from metarlhf.errors import ConfigError
    from metarlhf.runtime import resolve_device
    from server.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "adapter_root": args.adapter_root, "policy_dir": args.policy_dir,
        "encoder_dir": args.encoder_dir, "reward_init": args.reward_init, "adapt_threshold": args.adapt_threshold, "device": args.device}.items()
        if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(f"invalid server settings: {e}") from e
    resolve_device(settings.device)  # an absent CUDA device: exit 2 before anything loads
    if settings.reward_init not in (None, "scratch"):
        from metarlhf.reward import require_init_dir

        require_init_dir(settings.reward_init)  # exit 2 before anything loads
    if not settings.api_keys:
        key = "sk-" + secrets.token_urlsafe(24)
        settings.api_keys = {key: "default"}
        print(f"metarlhf: no API key configured (METARLHF_API_KEYS); generated one for tenant 'default':\n"
              f"    {key}", flush=True)
    print(f"metarlhf: serving on http://{settings.host}:{settings.port}  (web page at /, API docs at /docs)",
          flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0

"""metarlhf: meta-learned few-shot personalization of reward models and policies.

The library never imports a web framework; the FastAPI service lives in ``server/``.
Heavy pieces (torch, transformers, peft) are imported by the modules that need them.
"""

__version__ = "0.1.0"

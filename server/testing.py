"""Tiny, fast stand-ins for the real models, for tests, the web test and demos.

:class:`TinyPersonalizer` runs the *real* adaptation code (``metarlhf.reward.adapt_reward``
and ``metarlhf.policy.adapt_policy``) on tiny random models from
:mod:`metarlhf.testing`, from scratch (there is no meta-init for a random model), for a
couple of steps: seconds on CPU, same code path as production.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from metarlhf.adapters import Adapter

TINY_BASE = "tiny-llama"


def tiny_engine(capacity: int = 8, max_context: int = 256, seed: int = 0) -> Any:
    from metarlhf.engine import MultiAdapterEngine
    from metarlhf.testing import tiny_policy

    model, tok = tiny_policy(seed=seed)
    model.config._name_or_path = TINY_BASE
    return MultiAdapterEngine(model, tok, base_name=TINY_BASE, capacity=capacity, max_context=max_context)


class TinyPersonalizer:
    """Real adapt_reward / adapt_policy on tiny random models (a private policy copy)."""

    policy_base = TINY_BASE

    def __init__(self, policy_steps: int = 2, reward_steps: int = 2, seed: int = 0) -> None:
        from metarlhf.reward import RewardModel
        from metarlhf.testing import tiny_encoder, tiny_policy

        enc, etok = tiny_encoder(seed=seed)
        self.reward_model = RewardModel(enc, etok, "tiny-bert")
        self.embed_dim = int(enc.config.hidden_size)
        model, tok = tiny_policy(seed=seed)
        model.config._name_or_path = TINY_BASE
        self.policy = (model, tok)
        self.policy_steps = policy_steps
        self.reward_steps = reward_steps
        self.fail_next = False  # tests: make the next adaptation raise
        self.calls = 0
        # as DefaultPersonalizer: one lock per model, so a policy adaptation never blocks embed
        self._reward_lock = threading.Lock()
        self._policy_lock = threading.Lock()

    def adapt_reward(self, records: Any) -> Adapter:
        from metarlhf.reward import adapt_reward

        with self._reward_lock:
            self.calls += 1
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("injected adaptation failure")
            return adapt_reward(records, init="scratch", encoder=self.reward_model, steps=self.reward_steps)

    def adapt_policy(self, records: Any, init: str | Path | None, should_stop: Any = None) -> Adapter:
        from metarlhf.policy import adapt_policy

        with self._policy_lock:
            return adapt_policy(records, base=self.policy, init=str(init) if init is not None else "scratch",
                                steps=self.policy_steps, should_stop=should_stop)

    def embed(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        import torch

        with self._reward_lock, torch.no_grad():
            return self.reward_model.embed(prompts, completions).float().cpu().numpy()


class LiveServer:
    """Run an app with uvicorn on 127.0.0.1 in a background thread (tests).

    ``with LiveServer(app) as url: ...`` -- the lifespan has completed when it yields.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.app, self.host, self.port = app, host, port
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> str:
        import time

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

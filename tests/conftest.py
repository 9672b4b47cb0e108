import os

# Tests never touch the network or the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def float64():
    """Float64 default dtype for hand-computed references (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def tiny_policy():
    from metarlhf.testing import tiny_policy

    return tiny_policy()


@pytest.fixture
def tiny_encoder():
    from metarlhf.testing import tiny_encoder

    return tiny_encoder()


SERVER_KEYS = {"sk-tenant-a-key": "acme", "sk-tenant-b-key": "globex"}  # the tests' KEY_A / KEY_B


@pytest.fixture
def make_client(tmp_path):
    """``make(raise_server_exceptions=True, **settings)``: a started TestClient of the app on a
    tiny engine and TinyPersonalizer, tenants acme and globex, adapt_threshold 2; all share
    ``tmp_path``'s adapter root (so a second client is a restart)."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from server.testing import TinyPersonalizer, tiny_engine

    clients = []

    def make(raise_server_exceptions=True, **overrides):
        s = Settings(**{"api_keys": SERVER_KEYS, "adapter_root": str(tmp_path / "adapters"),
                        "adapt_threshold": 2, "max_tokens_limit": 32, "default_max_tokens": 6, "max_n": 3,
                        "batch_wait_ms": 2, **overrides})
        app = create_app(s, engine=tiny_engine(), personalizer=TinyPersonalizer())
        c = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()

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

"""``metarlhf generate`` on a tiny random policy saved as a local model directory."""

import pytest
from test_engine import make_adapter

from metarlhf.cli import main
from metarlhf.models import DEFAULT_POLICY_NAME, model_name
from metarlhf.testing import save_tiny, tiny_policy


@pytest.fixture
def model_dir(tmp_path):
    model, tok = tiny_policy()
    path = save_tiny(model, tok, tmp_path / "policy")
    adapter = make_adapter(tmp_path / "ad", model, seed=1, base=model_name(path, DEFAULT_POLICY_NAME))
    return str(path), adapter


def test_generate_base_and_adapter(model_dir, capsys):
    path, adapter = model_dir
    assert main(["generate", "--model-dir", path, "--prompt", "abc", "--max-new-tokens", "4"]) == 0
    base = capsys.readouterr()
    assert "completion tokens" in base.err
    assert main(["generate", "--model-dir", path, "--message", "hi", "--adapter", adapter, "--max-new-tokens", "4",
                 "--stream"]) == 0


def test_generate_bad_input_exits_2(model_dir, capsys, tmp_path):
    path, adapter = model_dir
    assert main(["generate", "--model-dir", path, "--prompt", "abc", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model-dir", path, "--prompt", "abc", "--max-new-tokens", "0"]) == 2
    bad = make_adapter(tmp_path / "bad", tiny_policy()[0], seed=2, base="some-other-model")
    assert main(["generate", "--model-dir", path, "--prompt", "abc", "--adapter", bad]) == 2
    assert "base model" in capsys.readouterr().err

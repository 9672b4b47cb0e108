import pytest
import torch

from metarlhf.errors import ModelError
from metarlhf.models import load_encoder, load_policy, resolve_encoder_dir
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy


def test_load_local_policy_dir(tmp_path):
    m, tok = tiny_policy()
    save_tiny(m, tok, tmp_path / "pol")
    model, tok2 = load_policy(tmp_path / "pol")
    ids = tok2("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, m(ids).logits, atol=1e-5)


def test_load_local_encoder_dir(tmp_path):
    m, tok = tiny_encoder()
    save_tiny(m, tok, tmp_path / "enc")
    enc, _ = load_encoder(tmp_path / "enc")
    assert enc.config.hidden_size == 32


def test_missing_or_bogus_model_dir(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_encoder_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_policy(tmp_path / "empty")

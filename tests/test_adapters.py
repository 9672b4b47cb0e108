import pytest
import torch

from metarlhf.adapters import WEIGHTS_FILE, Adapter, load_adapter, save_adapter
from metarlhf.errors import AdapterError


def _adapter(r=8):
    return Adapter(
        tensors={"a.lora_A.weight": torch.randn(r, 4), "head.weight": torch.randn(1, 4)},
        config={"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["query", "value"]},
        meta={"kind": "reward", "base_model": "enc", "k": 8},
    )


def test_roundtrip_and_checksum(tmp_path):
    a = _adapter()
    save_adapter(tmp_path / "v1", a)
    b = load_adapter(tmp_path / "v1", expect_base="enc", expect_rank=8, expect_kind="reward")
    assert torch.equal(a.tensors["head.weight"], b.tensors["head.weight"])
    assert b.meta["k"] == 8 and len(b.meta["sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mismatch_and_corruption_are_refused(tmp_path):
    save_adapter(tmp_path / "v1", _adapter())
    with pytest.raises(AdapterError, match="base model"):
        load_adapter(tmp_path / "v1", expect_base="other")
    with pytest.raises(AdapterError, match="rank"):
        load_adapter(tmp_path / "v1", expect_rank=4)
    with pytest.raises(AdapterError, match="policy"):
        load_adapter(tmp_path / "v1", expect_kind="policy")
    w = tmp_path / "v1" / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter(tmp_path / "v1")
    with pytest.raises(AdapterError, match="not an adapter"):
        load_adapter(tmp_path)


def test_failed_save_leaves_old_version(tmp_path):
    save_adapter(tmp_path / "v1", _adapter())
    bad = _adapter()
    bad.tensors["x"] = "not a tensor"
    with pytest.raises(AttributeError):
        save_adapter(tmp_path / "v1", bad)
    assert load_adapter(tmp_path / "v1").rank == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]

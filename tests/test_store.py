import threading

import pytest
import torch

from metarlhf.adapters import WEIGHTS_FILE, Adapter
from metarlhf.errors import AdapterError, ConfigError, NotFoundError
from metarlhf.store import AdapterStore, check_id


def adapter(value: float, kind: str = "policy") -> Adapter:
    return Adapter(tensors={"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((2, 4), value)},
                   config={"r": 2, "peft_type": "LORA"}, meta={"kind": kind, "base_model": "tiny"})


@pytest.mark.parametrize("bad", ["../x", "..", ".", "", "a/b", "a b", "x" * 129, "é", "a\x00"])
def test_check_id_rejects_unsafe_ids(bad):
    with pytest.raises(ConfigError):
        check_id(bad)


def test_check_id_accepts_safe_ids():
    assert check_id("Alice_1.2-x") == "Alice_1.2-x"
    assert check_id("x" * 128)


def test_versions_grow_and_current_points_at_newest(tmp_path):
    s = AdapterStore(tmp_path, keep=5)
    assert s.current("t", "alice", "policy") is None
    v1 = s.save("t", "alice", "policy", adapter(1.0))
    v2 = s.save("t", "alice", "policy", adapter(2.0))
    assert (v1.version, v2.version) == (1, 2)
    assert s.current("t", "alice", "policy") == 2
    assert (tmp_path / "users/t/alice/policy/CURRENT").read_text().strip() == "v2"
    got = s.resolve("t", "alice", "policy")
    assert got.version == 2 and got.path == tmp_path / "users/t/alice/policy/v2"
    assert s.versions("t", "alice", "reward") == []


def test_rollback_and_set_current(tmp_path):
    s = AdapterStore(tmp_path)
    for v in range(3):
        s.save("t", "u", "policy", adapter(float(v)))
    assert s.rollback("t", "u", "policy") == 2
    assert s.current("t", "u", "policy") == 2
    assert s.rollback("t", "u", "policy", 3) == 3
    with pytest.raises(NotFoundError):
        s.rollback("t", "u", "policy", 9)
    s.set_current("t", "u", "policy", 1)
    with pytest.raises(NotFoundError):
        s.rollback("t", "u", "policy")  # nothing older than v1


def test_keeps_last_n_but_never_the_current_and_never_reuses_numbers(tmp_path):
    s = AdapterStore(tmp_path, keep=2)
    s.save("t", "u", "policy", adapter(1.0))
    s.set_current("t", "u", "policy", 1)
    for v in range(2, 5):
        s.save("t", "u", "policy", adapter(float(v)), make_current=False)
    assert s.versions("t", "u", "policy") == [1, 3, 4]  # v2 pruned, v1 kept because it is current
    s.set_current("t", "u", "policy", 4)
    s.prune("t", "u", "policy")
    assert s.versions("t", "u", "policy") == [3, 4]
    # even if the newest directory disappears, its number is not handed out again
    import shutil

    shutil.rmtree(s.path("t", "u", "policy", 4))
    assert s.save("t", "u", "policy", adapter(5.0)).version == 5


def test_corrupted_current_falls_back_to_previous_version(tmp_path, caplog):
    s = AdapterStore(tmp_path)
    s.save("t", "u", "policy", adapter(1.0))
    v2 = s.save("t", "u", "policy", adapter(2.0))
    (v2.path / WEIGHTS_FILE).write_bytes(b"garbage")
    with caplog.at_level("ERROR"):
        got = s.resolve("t", "u", "policy")
    assert got.version == 1
    assert "falling back" in caplog.text
    # and with every version broken: None (= base)
    (s.path("t", "u", "policy", 1) / WEIGHTS_FILE).write_bytes(b"garbage")
    assert s.resolve("t", "u", "policy") is None


def test_resolve_checks_kind_and_base(tmp_path):
    s = AdapterStore(tmp_path)
    s.save("t", "u", "policy", adapter(1.0))
    assert s.resolve("t", "u", "policy", expect_base="other-model") is None
    with pytest.raises(AdapterError):
        s.verify(s.path("t", "u", "policy", 1), "reward")


def test_delete_user_and_tenants_are_separate(tmp_path):
    s = AdapterStore(tmp_path)
    s.save("a", "u", "policy", adapter(1.0))
    s.save("b", "u", "policy", adapter(2.0))
    assert sorted(s.users()) == [("a", "u"), ("b", "u")]
    assert s.delete_user("a", "u")
    assert not (tmp_path / "users/a/u").exists()
    assert s.current("b", "u", "policy") == 1
    assert not s.delete_user("a", "u")


def test_path_shapes_never_reach_the_filesystem(tmp_path):
    s = AdapterStore(tmp_path)
    for bad in ("../x", "..", "a/../../b"):
        with pytest.raises(ConfigError):
            s.save("t", bad, "policy", adapter(1.0))
        with pytest.raises(ConfigError):
            s.current(bad, "u", "policy")
    with pytest.raises(ConfigError):
        s.current("t", "u", "optimizer")
    assert not any(p.name == "x" for p in tmp_path.parent.iterdir())


def test_concurrent_reader_never_sees_a_partial_version(tmp_path):
    s = AdapterStore(tmp_path, keep=50)
    s.save("t", "u", "policy", adapter(0.0))
    errors, seen = [], set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                v = s.resolve("t", "u", "policy")
                assert v is not None
                s.verify(v.path, "policy")
                seen.add(v.version)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 25):
        s.save("t", "u", "policy", adapter(float(i)))
    stop.set()
    t.join()
    assert not errors, errors[:3]
    assert len(seen) > 1

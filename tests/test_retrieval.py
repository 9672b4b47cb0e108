import numpy as np
import pytest

from metarlhf.errors import DataError
from metarlhf.retrieval import PreferenceIndex, preference_vector


def test_preference_vector_is_normalised_liked_minus_disliked_mean():
    emb = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    v = preference_vector(emb, [True, True, False])
    # mean(liked) = (2, 0); mean(disliked) = (0, 2); diff (2, -2) -> (1, -1)/sqrt(2)
    np.testing.assert_allclose(v, np.array([1, -1]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(preference_vector(emb[:1], [True]), [1.0, 0.0])
    np.testing.assert_allclose(preference_vector(emb[2:], [False]), [0.0, -1.0])


def test_preference_vector_rejects_degenerate_input():
    with pytest.raises(DataError):
        preference_vector(np.zeros((0, 3)), [])
    with pytest.raises(DataError):
        preference_vector(np.ones((2, 3)), [True, False])  # cancels out


def test_search_orders_by_cosine_and_excludes_self():
    idx = PreferenceIndex(2)
    idx.upsert("t", "east", np.array([1.0, 0.0]))
    idx.upsert("t", "northeast", np.array([1.0, 1.0]))
    idx.upsert("t", "west", np.array([-1.0, 0.0]))
    res = idx.search("t", np.array([1.0, 0.1]), k=2)
    assert [u for u, _ in res] == ["east", "northeast"]
    assert res[0][1] == pytest.approx(1 / np.sqrt(1.01), rel=1e-5)
    assert [u for u, _ in idx.neighbors("t", "east", k=5)] == ["northeast", "west"]
    assert idx.neighbors("t", "nobody") == []


def test_tenants_never_see_each_other():
    idx = PreferenceIndex(2)
    idx.upsert("a", "u1", np.array([1.0, 0.0]))
    idx.upsert("b", "u2", np.array([1.0, 0.0]))
    assert [u for u, _ in idx.search("a", np.array([1.0, 0.0]), k=10)] == ["u1"]
    assert idx.search("c", np.array([1.0, 0.0])) == []


def test_upsert_replaces_and_remove_deletes():
    idx = PreferenceIndex(2)
    idx.upsert("t", "u", np.array([1.0, 0.0]))
    idx.upsert("t", "u", np.array([0.0, 1.0]))
    assert len(idx) == 1
    np.testing.assert_allclose(idx.get("t", "u"), [0.0, 1.0])
    assert idx.remove("t", "u") and not idx.remove("t", "u")
    assert idx.search("t", np.array([1.0, 0.0])) == []


def test_bad_vectors_are_rejected():
    idx = PreferenceIndex(3)
    with pytest.raises(DataError):
        idx.upsert("t", "u", np.array([1.0, 0.0]))
    with pytest.raises(DataError):
        idx.upsert("t", "u", np.array([0.0, 0.0, 0.0]))
    with pytest.raises(DataError):
        idx.upsert("t", "u", np.array([np.nan, 1.0, 0.0]))


def test_persisted_and_rebuilt(tmp_path):
    path = tmp_path / "prefs.safetensors"
    idx = PreferenceIndex(2, path)
    idx.upsert("t", "a", np.array([1.0, 0.0]))
    idx.upsert("t", "b", np.array([0.0, 1.0]))
    idx.upsert("u", "c", np.array([1.0, 1.0]))
    idx.save()
    back = PreferenceIndex.load(path, 2)
    assert len(back) == 3
    assert [u for u, _ in back.search("t", np.array([0.1, 1.0]), k=1)] == ["b"]
    assert len(PreferenceIndex.load(tmp_path / "missing.safetensors", 2)) == 0
    with pytest.raises(DataError):
        PreferenceIndex.load(path, 5)
    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError):
        PreferenceIndex.load(path, 2)

"""Head-subspace inner loop (inner="subspace"): PCA basis, inner step and meta-gradients
against hand-computed float64 references, and the init / user adapter round trip."""

import json
import math

import pytest
import torch

from metarlhf.errors import AdapterError, ConfigError
from metarlhf.meta import MetaLearner, meta_gradients, pca_head_basis
from metarlhf.reward import (
    BASIS_KEY,
    SUBSPACE_INNER_KEYS,
    Z_KEY,
    RewardModel,
    adapt_head,
    fold_z,
    head_weight,
    logistic_loss,
    materialise_head,
)


def test_pca_head_basis_hand_computed(float64):
    # centred weights [[1,0],[-1,0],[0,2],[0,-2]]: singular values sqrt(8), sqrt(2) along e2, e1
    heads = torch.tensor([[2.0, 1, 0.5], [0, 1, 1.5], [1, 3, 1.0], [1, -1, 1.0]])
    w0, b0, basis = pca_head_basis(heads, 2)
    assert torch.allclose(w0, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(b0, torch.tensor([1.0]))
    ref = torch.tensor([[0.0, math.sqrt(8 / 3)], [math.sqrt(2 / 3), 0.0]])  # rows: std of the heads along v_i
    assert torch.allclose(basis, ref, atol=1e-12)
    with pytest.raises(ConfigError, match="basis rank"):
        pca_head_basis(heads, 4)


def test_head_weight_materialise_and_fold_are_pure(float64):
    p = {"head.weight": torch.tensor([[1.0, 2.0, 3.0]]), "head.bias": torch.tensor([0.5]),
         BASIS_KEY: torch.tensor([[1.0, 0, 0], [0, 1, 1]]), Z_KEY: torch.tensor([2.0, -1.0])}
    assert torch.allclose(head_weight(p), torch.tensor([3.0, 1.0, 2.0]))
    m = materialise_head(p)
    assert set(m) == {"head.weight", "head.bias"} and torch.allclose(m["head.weight"], torch.tensor([[3.0, 1, 2]]))
    f = fold_z(p)
    assert set(f) == {"head.weight", "head.bias", BASIS_KEY} and torch.allclose(f["head.weight"], m["head.weight"])
    assert torch.allclose(p["head.weight"], torch.tensor([[1.0, 2.0, 3.0]]))  # inputs untouched
    emb = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    assert torch.allclose(RewardModel.head_scores(p, emb), torch.tensor([3.5, 2.5]))


# ---- hand-written calculus of the subspace head: w = w0 + z B, logits = x w + b
def _grad_zb(w0, basis, z, b, x, y):
    """Analytic gradient of the mean BCE w.r.t. (z, b)."""
    r = torch.sigmoid(x @ (w0 + z @ basis) + b) - y  # [n]
    return basis @ (x.T @ r) / len(y), r.mean()


def _bce(w, b, x, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)


@pytest.fixture
def problem(float64):
    g = torch.Generator().manual_seed(0)
    d, r = 5, 2
    xs, xq = torch.randn(6, d, generator=g), torch.randn(7, d, generator=g)
    ys, yq = (torch.rand(6, generator=g) > 0.5).double(), (torch.rand(7, generator=g) > 0.5).double()
    theta = {"head.weight": 0.3 * torch.randn(1, d, generator=g), "head.bias": 0.2 * torch.randn(1, generator=g),
             BASIS_KEY: torch.randn(r, d, generator=g), Z_KEY: torch.zeros(r)}
    return theta, (xs, ys), (xq, yq)


def _task_loss(p, data):
    x, y = data
    return logistic_loss(RewardModel.head_scores(p, x), y)


@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_subspace_meta_gradient_matches_hand_reference(problem, steps):
    theta, (xs, ys), (xq, yq) = problem
    lr = {Z_KEY: torch.tensor([0.7, 0.4]), "head.bias": torch.tensor([0.5])}
    learner = MetaLearner(theta, "metasgd", lr, list(SUBSPACE_INNER_KEYS))
    grads, _ = meta_gradients(learner, [((xs, ys), (xq, yq))], steps, lambda p, t: _task_loss(p, t[0]),
                              lambda p, t: _task_loss(p, t[1]))
    got = dict(zip([*learner.params, *(f"lr.{k}" for k in learner.log_lrs)], grads, strict=True))

    # reference: the inner steps written out with the analytic gradient; autograd only for the outer one
    w0 = theta["head.weight"][0].clone().requires_grad_(True)
    b0 = theta["head.bias"][0].clone().requires_grad_(True)
    basis = theta[BASIS_KEY].clone().requires_grad_(True)
    z0 = theta[Z_KEY].clone().requires_grad_(True)
    log_az = torch.log(lr[Z_KEY]).requires_grad_(True)
    log_ab = torch.log(lr["head.bias"][0]).requires_grad_(True)
    z, b = z0, b0
    for _ in range(steps):
        gz, gb = _grad_zb(w0, basis, z, b, xs, ys)
        z, b = z - torch.exp(log_az) * gz, b - torch.exp(log_ab) * gb
    if steps == 1:  # the adapted point itself, from z0 = 0
        gz0, gb0 = _grad_zb(theta["head.weight"][0], theta[BASIS_KEY], torch.zeros(2), theta["head.bias"][0], xs, ys)
        assert torch.allclose(z.detach(), -lr[Z_KEY] * gz0, atol=1e-12)
    q = _bce(w0 + z @ basis, b, xq, yq)
    ref = torch.autograd.grad(q, [w0, b0, basis, z0, log_az, log_ab])
    assert torch.allclose(got["head.weight"][0], ref[0], atol=1e-6, rtol=0)
    assert torch.allclose(got["head.bias"][0], ref[1], atol=1e-6, rtol=0)
    assert torch.allclose(got[BASIS_KEY], ref[2], atol=1e-6, rtol=0)
    assert torch.allclose(got[Z_KEY], ref[3], atol=1e-6, rtol=0)
    assert torch.allclose(got[f"lr.{Z_KEY}"], ref[4], atol=1e-6, rtol=0)
    assert torch.allclose(got["lr.head.bias"][0], ref[5], atol=1e-6, rtol=0)
    # the basis gets a second-order gradient: it differs from the first-order one
    lf = MetaLearner(theta, "metasgd", lr, list(SUBSPACE_INNER_KEYS), first_order=True)
    gf, _ = meta_gradients(lf, [((xs, ys), (xq, yq))], steps, lambda p, t: _task_loss(p, t[0]),
                           lambda p, t: _task_loss(p, t[1]))
    assert not torch.allclose(gf[list(lf.params).index(BASIS_KEY)], got[BASIS_KEY], atol=1e-6)


def test_adapt_head_subspace_moves_only_within_the_basis(float64):
    g = torch.Generator().manual_seed(3)
    d, r = 6, 2
    params = {"head.weight": torch.randn(1, d, generator=g), "head.bias": torch.zeros(1),
              BASIS_KEY: torch.randn(r, d, generator=g)}
    emb = torch.randn(10, d, generator=g)
    labels = (emb[:, 0] > 0).double()
    from metarlhf.reward import EncodedRecords

    enc = EncodedRecords([[0]] * 10, torch.arange(10), labels, torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, dtype=torch.long))
    log_lrs = {Z_KEY: torch.full((r,), math.log(0.5)), "head.bias": torch.zeros(1)}
    adapted, losses = adapt_head(emb, enc, params, log_lrs, steps=20)
    assert set(adapted) == {"head.weight", "head.bias"}  # materialised: no basis, no z
    assert losses[-1] < losses[0]
    delta = adapted["head.weight"][0] - params["head.weight"][0]
    q, _ = torch.linalg.qr(params[BASIS_KEY].T)  # [d, r] orthonormal span of the basis
    assert delta.norm() > 1e-3
    assert torch.allclose(q @ (q.T @ delta), delta, atol=1e-10)  # the change lies in span(B)
    with pytest.raises(AdapterError, match="head.z"):
        adapt_head(emb, enc, params, {"head.weight": torch.zeros(1, d), "head.bias": torch.zeros(1)}, steps=1)


def test_subspace_init_round_trip_and_user_adapter_has_no_basis(tmp_path):
    from metarlhf.adapters import load_adapter, save_adapter
    from metarlhf.data import Thumbs
    from metarlhf.reward import LR_PREFIX, adapt_reward, load_reward_model
    from metarlhf.testing import save_tiny, tiny_encoder

    enc_dir = save_tiny(*tiny_encoder(), tmp_path / "enc")
    model = load_reward_model(enc_dir, adapter_dir=None)
    h = model.hidden_size
    g = torch.Generator().manual_seed(0)
    params = model.fresh_params(0) | {BASIS_KEY: torch.randn(3, h, generator=g)}
    log_lrs = {Z_KEY: torch.zeros(3), "head.bias": torch.zeros(1)}
    init = tmp_path / "init"
    save_adapter(init, model.make_adapter(params, {"kind": "reward_init", "inner": "subspace", "inner_steps": 4},
                                          log_lrs=log_lrs))
    stored = load_adapter(init).tensors
    assert stored[BASIS_KEY].shape == (3, h) and LR_PREFIX + Z_KEY in stored
    recs = [Thumbs("u", "q", f"text {i} {'yes' if i % 2 else 'no'}", i % 2) for i in range(8)]
    ad = adapt_reward(recs, init=init, encoder=model)
    assert BASIS_KEY not in ad.tensors and Z_KEY not in ad.tensors and ad.meta["steps"] == 4
    assert ad.meta["losses"][-1] < ad.meta["losses"][0]
    assert model.head_basis is None  # the shared model was not touched
    user = tmp_path / "user"
    save_adapter(user, ad)
    loaded = load_reward_model(enc_dir, adapter_dir=user)
    assert loaded.head_basis is None
    full = load_reward_model(enc_dir, adapter_dir=init)  # loading the init keeps its basis
    assert torch.allclose(full.head_basis, params[BASIS_KEY])
    assert torch.allclose(full.adapter_params()[BASIS_KEY], params[BASIS_KEY])
    ad2 = adapt_reward(recs, init=init, encoder=enc_dir)  # non-shared path: same result
    assert torch.allclose(ad2.tensors["head.weight"], ad.tensors["head.weight"], atol=1e-5)
    bad = tmp_path / "bad"
    save_adapter(bad, model.make_adapter(params | {BASIS_KEY: torch.zeros(3, h + 1)},
                                         {"kind": "reward_init", "inner": "subspace"}, log_lrs=log_lrs))
    with pytest.raises(AdapterError, match="head.basis"):
        adapt_reward(recs, init=bad, encoder=model)
    meta = json.loads((init / "metarlhf.json").read_text())
    assert meta["inner"] == "subspace"

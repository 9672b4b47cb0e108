"""Subspace + residual inner loop (w = w0 + z B + r): the inner update and the meta-gradient
against hand-computed float64 references, the init / user adapter round trip, and the
meta-train options (residual rate, L2 pull, keeping a warm init's basis)."""

import json
import math

import pytest
import torch

from metarlhf.errors import AdapterError, ConfigError
from metarlhf.meta import MetaLearner, MetaTrainConfig, meta_gradients
from metarlhf.reward import (
    BASIS_KEY,
    LR_PREFIX,
    R_KEY,
    SUBSPACE_INNER_KEYS,
    Z_KEY,
    EncodedRecords,
    RewardModel,
    adapt_head,
    fold_z,
    head_weight,
    inner_keys,
    logistic_loss,
    materialise_head,
    residual_penalty,
)


def _thumbs(labels):
    n = len(labels)
    empty = torch.zeros(0, dtype=torch.long)
    return EncodedRecords([[0]] * n, torch.arange(n), labels, empty, empty)


def test_head_weight_with_residual_and_folding(float64):
    p = {"head.weight": torch.tensor([[1.0, 2.0, 3.0]]), "head.bias": torch.tensor([0.5]),
         BASIS_KEY: torch.tensor([[1.0, 0, 0]]), Z_KEY: torch.tensor([2.0]), R_KEY: torch.tensor([0.0, -1.0, 4.0])}
    assert torch.allclose(head_weight(p), torch.tensor([3.0, 1.0, 7.0]))
    m = materialise_head(p)
    assert set(m) == {"head.weight", "head.bias"} and torch.allclose(m["head.weight"], torch.tensor([[3.0, 1, 7]]))
    f = fold_z(p)
    assert set(f) == {"head.weight", "head.bias", BASIS_KEY} and torch.allclose(f["head.weight"], m["head.weight"])
    assert float(residual_penalty(p, 0.5)) == pytest.approx(0.25 * 17)  # 0.5 * 0.5 * (1 + 16)
    assert residual_penalty(p, 0.0) == 0.0 and residual_penalty({"head.bias": p["head.bias"]}, 1.0) == 0.0
    assert inner_keys(p, {Z_KEY: 0, "head.bias": 0}) == SUBSPACE_INNER_KEYS
    assert inner_keys(p, {Z_KEY: 0, "head.bias": 0, R_KEY: 0}) == (*SUBSPACE_INNER_KEYS, R_KEY)


def test_adapt_head_residual_two_steps_hand_computed(float64):
    # d = 3, one basis row along e1: the residual is the only way to move along e2 / e3
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, -0.5, 0.0]])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w0, b0, basis = torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.1]), torch.tensor([[2.0, 0.0, 0.0]])
    az, ab, ar, lam = 0.5, 0.25, 2.0, 0.3
    params = {"head.weight": w0.unsqueeze(0), "head.bias": b0, BASIS_KEY: basis}
    log_lrs = {Z_KEY: torch.tensor([math.log(az)]), "head.bias": torch.tensor([math.log(ab)]),
               R_KEY: torch.full((3,), math.log(ar))}
    adapted, losses = adapt_head(x, _thumbs(y), params, log_lrs, steps=2, resid_l2=lam)

    # by hand: grad of the mean BCE w.r.t. w is x^T (sigmoid(s) - y) / n; z gets B g_w, r gets g_w + lam r
    z, r, b = torch.zeros(1), torch.zeros(3), b0[0]
    for _ in range(2):
        e = torch.sigmoid(x @ (w0 + z @ basis + r) + b) - y  # [n]
        gw = x.T @ e / 4
        z, r, b = z - az * (basis @ gw), r - ar * (gw + lam * r), b - ab * e.mean()
    assert torch.allclose(adapted["head.weight"][0], w0 + z @ basis + r, atol=1e-12)
    assert torch.allclose(adapted["head.bias"][0], b, atol=1e-12)
    assert set(adapted) == {"head.weight", "head.bias"}
    assert float(r[1:].abs().min()) > 1e-3  # it moved outside span(B)
    assert losses[-1] < losses[0]
    # without a residual rate the same init stays inside span(B)
    sub, _ = adapt_head(x, _thumbs(y), params, {k: v for k, v in log_lrs.items() if k != R_KEY}, steps=2)
    assert torch.allclose(sub["head.weight"][0, 1:], w0[1:], atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_residual_meta_gradient_matches_hand_reference(float64, steps):
    g = torch.Generator().manual_seed(0)
    d, rk, lam = 5, 2, 0.2
    xs, xq = torch.randn(6, d, generator=g), torch.randn(7, d, generator=g)
    ys, yq = (torch.rand(6, generator=g) > 0.5).double(), (torch.rand(7, generator=g) > 0.5).double()
    theta = {"head.weight": 0.3 * torch.randn(1, d, generator=g), "head.bias": 0.2 * torch.randn(1, generator=g),
             BASIS_KEY: torch.randn(rk, d, generator=g), Z_KEY: torch.zeros(rk), R_KEY: torch.zeros(d)}
    lr = {Z_KEY: torch.tensor([0.7, 0.4]), "head.bias": torch.tensor([0.5]), R_KEY: torch.full((d,), 0.3)}
    keys = [*SUBSPACE_INNER_KEYS, R_KEY]
    learner = MetaLearner(theta, "metasgd", lr, keys)

    def support(p, t):
        return logistic_loss(RewardModel.head_scores(p, t[0][0]), t[0][1]) + residual_penalty(p, lam)

    def query(p, t):
        return logistic_loss(RewardModel.head_scores(p, t[1][0]), t[1][1])

    grads, _ = meta_gradients(learner, [((xs, ys), (xq, yq))], steps, support, query)
    got = dict(zip([*learner.params, *(f"lr.{k}" for k in learner.log_lrs)], grads, strict=True))

    # reference: inner steps with the analytic gradient; autograd only for the outer one
    w0 = theta["head.weight"][0].clone().requires_grad_(True)
    b0 = theta["head.bias"][0].clone().requires_grad_(True)
    basis = theta[BASIS_KEY].clone().requires_grad_(True)
    log_ar = torch.log(lr[R_KEY]).requires_grad_(True)
    log_az = torch.log(lr[Z_KEY]).requires_grad_(True)
    z, r, b = torch.zeros(rk), torch.zeros(d), b0
    for _ in range(steps):
        e = torch.sigmoid(xs @ (w0 + z @ basis + r) + b) - ys
        gw = xs.T @ e / len(ys)
        z, r, b = z - torch.exp(log_az) * (basis @ gw), r - torch.exp(log_ar) * (gw + lam * r), b - 0.5 * e.mean()
    q = torch.nn.functional.binary_cross_entropy_with_logits(xq @ (w0 + z @ basis + r) + b, yq)
    ref = torch.autograd.grad(q, [w0, b0, basis, log_ar, log_az])
    assert torch.allclose(got["head.weight"][0], ref[0], atol=1e-6, rtol=0)
    assert torch.allclose(got["head.bias"][0], ref[1], atol=1e-6, rtol=0)
    assert torch.allclose(got[BASIS_KEY], ref[2], atol=1e-6, rtol=0)
    assert torch.allclose(got[f"lr.{R_KEY}"], ref[3], atol=1e-6, rtol=0)
    assert torch.allclose(got[f"lr.{Z_KEY}"], ref[4], atol=1e-6, rtol=0)
    assert float(got[f"lr.{R_KEY}"].abs().sum()) > 0


def test_residual_init_round_trip_and_errors(tmp_path):
    from metarlhf.adapters import save_adapter
    from metarlhf.data import Thumbs
    from metarlhf.reward import adapt_reward, load_reward_model
    from metarlhf.testing import save_tiny, tiny_encoder

    enc_dir = save_tiny(*tiny_encoder(), tmp_path / "enc")
    model = load_reward_model(enc_dir, adapter_dir=None)
    h = model.hidden_size
    g = torch.Generator().manual_seed(0)
    params = model.fresh_params(0) | {BASIS_KEY: torch.randn(2, h, generator=g)}
    sub_lrs = {Z_KEY: torch.zeros(2), "head.bias": torch.zeros(1)}
    recs = [Thumbs("u", "q", f"text {i} {'yes' if i % 2 else 'no'}", i % 2) for i in range(8)]
    meta = {"kind": "reward_init", "inner": "subspace", "inner_steps": 3}
    plain, resid = tmp_path / "plain", tmp_path / "resid"
    save_adapter(plain, model.make_adapter(params, meta, log_lrs=sub_lrs))
    save_adapter(resid, model.make_adapter(params, meta | {"inner_residual": True, "inner_resid_l2": 0.01},
                                           log_lrs=sub_lrs | {R_KEY: torch.full((h,), math.log(3.0))}))
    a = adapt_reward(recs, init=plain, encoder=model)
    b = adapt_reward(recs, init=resid, encoder=model)
    assert R_KEY not in b.tensors and BASIS_KEY not in b.tensors and Z_KEY not in b.tensors
    assert b.meta["losses"][-1] < a.meta["losses"][-1]  # the residual fits the support set better
    q, _ = torch.linalg.qr(params[BASIS_KEY].T)  # [h, 2]
    da = a.tensors["head.weight"][0] - params["head.weight"][0]
    db = b.tensors["head.weight"][0] - params["head.weight"][0]
    assert torch.allclose(q @ (q.T @ da), da, atol=1e-5)  # plain: inside span(B)
    assert (db - q @ (q.T @ db)).norm() > 1e-3  # residual: outside too
    b2 = adapt_reward(recs, init=resid, encoder=enc_dir)  # non-shared path: same result
    assert torch.allclose(b2.tensors["head.weight"], b.tensors["head.weight"], atol=1e-5)
    loaded = load_reward_model(enc_dir, adapter_dir=resid)
    assert R_KEY in loaded.inner_log_lrs
    bad = tmp_path / "bad"  # metadata promises a residual, tensors lack its rate
    save_adapter(bad, model.make_adapter(params, meta | {"inner_residual": True}, log_lrs=sub_lrs))
    with pytest.raises(AdapterError, match="inner_residual"):
        adapt_reward(recs, init=bad, encoder=model)


def test_meta_train_config_residual_options():
    MetaTrainConfig(inner="subspace", inner_lr_r=3.0, resid_l2=0.01)
    with pytest.raises(ConfigError, match="inner='subspace'"):
        MetaTrainConfig(inner="head", inner_lr_r=1.0)
    with pytest.raises(ConfigError, match=">= 0"):
        MetaTrainConfig(inner="subspace", inner_lr_r=-1.0)
    with pytest.raises(ConfigError, match="keep_basis"):
        MetaTrainConfig(inner="subspace", keep_basis=True)


def test_meta_train_residual_keep_basis_end_to_end(tmp_path):
    """--inner-lr-r with --keep-basis: starts from the warm init's basis; the result stores the
    residual rate and metadata, adapt / eval use them."""
    from metarlhf.adapters import load_adapter
    from metarlhf.cli import main
    from metarlhf.testing import save_tiny, tiny_encoder
    from tests.test_reward_meta_cli import _meta_train, _write_personas

    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = _write_personas(tmp_path / "personas")
    first = tmp_path / "first"
    assert _meta_train(tmp_path, enc, data, first, "--inner", "subspace", "--basis-rank", "2") == 0
    second = tmp_path / "second"
    assert _meta_train(tmp_path, enc, data, second, "--inner", "subspace", "--basis-rank", "2", "--init-from",
                       str(first), "--keep-basis", "--inner-lr-r", "2.0", "--resid-l2", "0.01",
                       "--max-seconds", "0") == 0  # no outer step: the warm init itself plus the residual
    meta = json.loads((second / "metarlhf.json").read_text())
    assert meta["inner_residual"] is True and meta["inner_resid_l2"] == 0.01
    a, b = load_adapter(first).tensors, load_adapter(second).tensors
    for k in (BASIS_KEY, "head.weight", "head.bias", LR_PREFIX + Z_KEY):
        assert torch.allclose(a[k], b[k], atol=1e-6), k  # kept, not refitted
    assert torch.allclose(b[LR_PREFIX + R_KEY], torch.full_like(b[LR_PREFIX + R_KEY], math.log(2.0)))
    user = json.loads((second / "split.json").read_text())["test"][0]
    assert main(["adapt", "reward", "--data", str(data), "--user", user, "--k", "8", "--out",
                 str(tmp_path / "u"), "--init", str(second), "--encoder", str(enc)]) == 0
    res = tmp_path / "res.json"
    assert main(["eval", "reward", "--data", str(data), "--holdout", "2", "--k", "4", "--out", str(res),
                 "--init", str(second), "--encoder", str(enc), "--seeds", "1", "--query", "10",
                 "--methods", "base", "meta"]) == 0
    detail = json.loads((tmp_path / "res.detail.json").read_text())
    assert detail["inner_residual"] is True and detail["inner_resid_l2"] == 0.01
    # --keep-basis from an init without a basis of that rank is a clean error
    assert _meta_train(tmp_path, enc, data, tmp_path / "bad", "--inner", "subspace", "--basis-rank", "3",
                       "--init-from", str(first), "--keep-basis") == 2

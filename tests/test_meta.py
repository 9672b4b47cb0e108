"""Meta-gradients of the MAML family against hand-computed references (float64, 1e-6)."""

import math

import pytest
import torch

from metarlhf.errors import ConfigError
from metarlhf.meta import MetaLearner, inner_update, meta_gradients, reptile_meta_grad


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _loss(p, data):
    x, y = data
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ p["w"] + p["b"], y)


# ---- hand-written logistic regression calculus on z = [x, 1], theta = [w, b]
def _z(x):
    return torch.cat([x, torch.ones(len(x), 1)], 1)


def _g(theta, x, y):
    z = _z(x)
    return z.T @ (torch.sigmoid(z @ theta) - y) / len(y)


def _h(theta, x, y):
    z = _z(x)
    s = torch.sigmoid(z @ theta)
    return z.T @ torch.diag(s * (1 - s)) @ z / len(y)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    d = 3
    xs, xq = torch.randn(6, d, generator=g), torch.randn(5, d, generator=g)
    ys, yq = (torch.rand(6, generator=g) > 0.5).double(), (torch.rand(5, generator=g) > 0.5).double()
    theta = torch.randn(d + 1, generator=g) * 0.5
    return theta, (xs, ys), (xq, yq)


def _params(theta):
    return {"w": theta[:-1].clone(), "b": theta[-1:].clone()}


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _run(algo, theta, s, q, lr, steps, **kw):
    learner = MetaLearner(_params(theta), algo, lr, **kw)
    grads, _ = meta_gradients(learner, [(s, q)], steps, lambda p, t: _loss(p, t[0]), lambda p, t: _loss(p, t[1]))
    return learner, grads


def test_maml_second_order_one_and_two_steps(problem):
    theta, (xs, ys), (xq, yq) = problem
    a = 0.7
    i = torch.eye(len(theta))
    _, grads = _run("maml", theta, (xs, ys), (xq, yq), a, 1)
    phi = theta - a * _g(theta, xs, ys)
    ref = (i - a * _h(theta, xs, ys)) @ _g(phi, xq, yq)
    assert torch.allclose(_flat(grads), ref, atol=1e-6, rtol=0)
    _, grads = _run("maml", theta, (xs, ys), (xq, yq), a, 2)
    phi1 = theta - a * _g(theta, xs, ys)
    phi2 = phi1 - a * _g(phi1, xs, ys)
    ref = (i - a * _h(theta, xs, ys)) @ (i - a * _h(phi1, xs, ys)) @ _g(phi2, xq, yq)
    assert torch.allclose(_flat(grads), ref, atol=1e-6, rtol=0)


def test_fomaml_is_query_gradient_at_adapted_params(problem):
    theta, (xs, ys), (xq, yq) = problem
    a = 0.7
    _, grads = _run("fomaml", theta, (xs, ys), (xq, yq), a, 2)
    phi1 = theta - a * _g(theta, xs, ys)
    phi2 = phi1 - a * _g(phi1, xs, ys)
    assert torch.allclose(_flat(grads), _g(phi2, xq, yq), atol=1e-6, rtol=0)
    # and it differs from second order (so the test can fail)
    _, g2 = _run("maml", theta, (xs, ys), (xq, yq), a, 2)
    assert not torch.allclose(_flat(grads), _flat(g2), atol=1e-4)


def test_metasgd_grads_for_params_and_log_lrs(problem):
    theta, (xs, ys), (xq, yq) = problem
    alpha = torch.tensor([0.3, 0.9, 1.5, 0.6])
    lrs = {"w": alpha[:-1].clone(), "b": alpha[-1:].clone()}
    for first_order in (False, True):
        learner, grads = _run("metasgd", theta, (xs, ys), (xq, yq), lrs, 1, first_order=first_order)
        assert len(grads) == 4  # w, b, log_lr.w, log_lr.b
        gs = _g(theta, xs, ys)
        phi = theta - alpha * gs
        gq = _g(phi, xq, yq)
        jac = torch.eye(4) if first_order else torch.eye(4) - torch.diag(alpha) @ _h(theta, xs, ys)
        ref_theta = jac.T @ gq
        ref_loglr = alpha * (-gs * gq)  # d/d log(alpha) = alpha * d/d alpha
        assert torch.allclose(_flat(grads[:2]), ref_theta, atol=1e-6, rtol=0)
        assert torch.allclose(_flat(grads[2:]), ref_loglr, atol=1e-6, rtol=0)


def test_reptile_grad_is_theta_minus_adapted(problem):
    theta, (xs, ys), (xq, yq) = problem
    a = 0.5
    _, grads = _run("reptile", theta, (xs, ys), (xq, yq), a, 3)
    phi = theta.clone()
    for _ in range(3):
        phi = phi - a * _g(phi, xs, ys)
    assert torch.allclose(_flat(grads), theta - phi, atol=1e-6, rtol=0)
    p = _params(theta)
    assert torch.allclose(_flat(reptile_meta_grad(p, [_params(phi)]).values()), theta - phi)


def test_meta_batch_averages_tasks(problem):
    theta, s, q = problem
    learner = MetaLearner(_params(theta), "maml", 0.4)
    one, _ = meta_gradients(learner, [(s, q)], 1, lambda p, t: _loss(p, t[0]), lambda p, t: _loss(p, t[1]))
    two, _ = meta_gradients(learner, [(s, q), (q, s)], 1, lambda p, t: _loss(p, t[0]), lambda p, t: _loss(p, t[1]))
    other, _ = meta_gradients(learner, [(q, s)], 1, lambda p, t: _loss(p, t[0]), lambda p, t: _loss(p, t[1]))
    assert torch.allclose(_flat(two), (_flat(one) + _flat(other)) / 2, atol=1e-12)


def test_clone_adapt_leaves_meta_params_untouched(problem):
    theta, (xs, ys), _ = problem
    learner = MetaLearner(_params(theta), "fomaml", 0.5)
    before = {k: v.detach().clone() for k, v in learner.params.items()}
    clone = learner.clone()
    clone.adapt(lambda p: _loss(p, (xs, ys)))
    assert not torch.allclose(clone.params["w"], before["w"])
    assert all(torch.equal(learner.params[k].detach(), before[k]) for k in before)
    assert inner_update({"a": torch.ones(2)}, {"a": torch.ones(2)}, {"a": torch.full((2,), 0.5)})["a"].tolist() == [
        0.5, 0.5]


def test_bad_algorithm_and_options():
    with pytest.raises(ConfigError, match="unknown meta-learning algorithm"):
        MetaLearner({"w": torch.zeros(2)}, "sgd", 0.1)
    with pytest.raises(ConfigError, match="fomaml"):
        MetaLearner({"w": torch.zeros(2)}, "maml", 0.1, first_order=True)
    with pytest.raises(ConfigError, match="adapt_keys"):
        MetaLearner({"w": torch.zeros(2)}, "maml", 0.1, adapt_keys=["v"])


def test_second_order_through_tiny_encoder_matches_finite_differences():
    """MAML (head-only inner loop, LoRA in the outer loop) on a tiny BERT, float64."""
    from metarlhf.data import Thumbs
    from metarlhf.meta import MetaTrainConfig, _task_loss_fns
    from metarlhf.reward import HEAD_KEYS, RewardModel
    from metarlhf.testing import tiny_encoder

    enc, tok = tiny_encoder(hidden=16, layers=1)
    model = RewardModel(enc, tok, "tiny").double()
    params = {k: v.double() for k, v in model.fresh_params(0).items()}
    g = torch.Generator().manual_seed(1)
    for k in params:  # non-zero LoRA B and head so every path carries gradient
        params[k] = params[k] + 0.1 * torch.randn(params[k].shape, generator=g, dtype=torch.float64)
    recs = [Thumbs("u", "p", f"text {i} {'yes' if i % 2 else 'no'}", i % 2) for i in range(8)]
    s, q = model.encode_records(recs[:4]), model.encode_records(recs[4:])
    cfg = MetaTrainConfig(algo="maml", inner="head", inner_steps=2)
    prepare, sl, ql = _task_loss_fns(model, cfg)
    lr = 2.0

    def outer_loss(p):
        learner = MetaLearner(p, "maml", lr, list(HEAD_KEYS))
        clone = learner.clone()
        task = prepare(learner.params, s, q)
        for _ in range(2):
            clone.adapt(lambda pp: sl(pp, task))
        return ql(clone.params, task), learner

    loss, learner = outer_loss(params)
    grads = dict(zip(learner.params, torch.autograd.grad(loss, list(learner.params.values())), strict=True))
    key = next(k for k in params if "lora_A" in k)
    h = 1e-5
    for name, idx in [(key, (0, 0)), (key, (1, 3)), ("head.weight", (0, 2))]:
        plus = {k: v.clone() for k, v in params.items()}
        minus = {k: v.clone() for k, v in params.items()}
        plus[name][idx] += h
        minus[name][idx] -= h
        fd = (outer_loss(plus)[0].item() - outer_loss(minus)[0].item()) / (2 * h)
        assert math.isclose(grads[name][idx].item(), fd, abs_tol=1e-6), (name, idx, grads[name][idx].item(), fd)

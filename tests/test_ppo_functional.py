"""PPO math against hand-computed values."""

import math

import pytest
import torch

from metarlhf.errors import ConfigError
from metarlhf.ppo.functional import (
    adaptive_kl_update,
    compute_advantages,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    postprocess_scores,
    shape_rewards,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_masked_mean_and_var():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    m = T([[1, 1, 1, 0]])
    assert close(masked_mean(x, m), 2.0)
    assert close(masked_var(x, m), 1.0)  # (1 + 0 + 1) / (3 - 1)
    assert close(masked_var(x, m, unbiased=False), 2 / 3)
    assert close(masked_mean(T([[1.0, 3.0], [5.0, 7.0]]), T([[1, 1], [1, 0]]), dim=1), [2.0, 5.0])


def test_masked_whiten_hand_computed():
    x = T([[2.0, 4.0, 6.0, 50.0]])
    m = T([[1, 1, 1, 0]])
    # mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    assert close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)
    assert close(masked_whiten(x, m, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], tol=1e-4)


def test_gae_hand_computed():
    values, rewards = T([[1.0, 2.0, 3.0]]), T([[0.0, 0.0, 1.0]])
    adv, ret = compute_gae(values, rewards, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t=2: d=1-3=-2, A=-2; t=1: d=0+3-2=1, A=1+0.5*-2=0; t=0: d=0+2-1=1, A=1+0.5*0=1
    assert close(adv, [[1.0, 0.0, -2.0]])
    assert close(ret, [[2.0, 2.0, 1.0]])


def test_gae_discount_and_mask():
    # gamma=0.9, lam=1: A1 = 1-0.5 = 0.5; A0 = (0 + 0.9*0.5 - 0.5) + 0.9*0.5 = 0.4; returns = discounted sums
    adv, ret = compute_gae(T([[0.5, 0.5]]), T([[0.0, 1.0]]), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert close(adv, [[0.4, 0.5]])
    assert close(ret, [[0.9, 1.0]])
    # masked tail is terminal: its value and reward are ignored
    adv, ret = compute_gae(T([[1.0, 2.0, 3.0]]), T([[0.0, 1.0, 5.0]]), T([[1, 1, 0]]), gamma=1.0, lam=0.5)
    # t=1: d=1+0-2=-1; t=0: d=0+2-1=1, A=1+0.5*-1=0.5
    assert close(adv, [[0.5, -1.0, 0.0]])
    assert close(ret, [[1.5, 1.0, 0.0]])


def test_kl_estimators():
    logp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    assert close(kl_penalty(logp, ref, "k1"), [[math.log(2)]])
    # k3 with r = ref/pi = 0.5: (r - 1) - log r = -0.5 + log 2
    assert close(kl_penalty(logp, ref, "k3"), [[-0.5 + math.log(2)]])
    assert close(kl_penalty(ref, logp, "k3"), [[1.0 - math.log(2)]])  # r = 2
    with pytest.raises(ConfigError):
        kl_penalty(logp, ref, "k2")


def test_policy_loss_clipping():
    logp = T([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    old = torch.zeros(1, 3)
    adv = T([[1.0, -1.0, 1.0]])
    mask = T([[1, 1, 0]])
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2 masked
    assert close(loss, -0.2)
    assert close(clipfrac, 1.0)
    assert close(approx_kl, ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)
    loss, clipfrac, _ = policy_loss(logp, old, adv, T([[0, 0, 1]]), cliprange=0.2)
    assert close(loss, -1.1) and close(clipfrac, 0.0)  # ratio 1.1 lies inside the clip range


def test_value_loss_clipping():
    values, old, ret = T([[1.0, 0.0, 0.6]]), T([[0.5, 0.5, 0.5]]), T([[2.0, 0.0, 1.0]])
    loss, clipfrac = value_loss(values, old, ret, torch.ones(1, 3), cliprange_value=0.2)
    # token 0: max(1, (0.7-2)^2=1.69); token 1: max(0, 0.09); token 2: unclipped 0.16
    assert close(loss, 0.5 * (1.69 + 0.09 + 0.16) / 3)
    assert close(clipfrac, 2 / 3)


def test_entropy():
    assert close(entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    logits = torch.log(T([0.5, 0.25, 0.25]))
    assert close(entropy_from_logits(logits), 0.5 * math.log(2) + 0.5 * math.log(4))


def test_shape_rewards_puts_score_on_last_token():
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    r = shape_rewards(T([1.0, 2.0]), kl, mask, kl_coef=0.5)
    assert close(r, [[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0]])


def test_adaptive_kl_and_explained_variance():
    assert adaptive_kl_update(0.1, current_kl=12.0, target=6.0, horizon=160, n_steps=16) == pytest.approx(0.102)
    assert adaptive_kl_update(0.1, current_kl=5.7, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.005))
    ret, m = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3), ret, m) == pytest.approx(0.0)


def test_postprocess_scores():
    s = postprocess_scores(T([3.0, -0.5, 0.2]), T([True, False, False]), missing_eos_penalty=1.0, reward_clip=1.0)
    assert close(s, [1.0, -1.0, -0.8])


def test_compute_advantages_whitened_and_zero_kl():
    logp = torch.zeros(2, 3)
    mask = T([[1, 1, 1], [1, 1, 0]])
    out = compute_advantages(T([1.0, -1.0]), logp, logp, torch.zeros(2, 3), mask, kl_coef=0.1, gamma=1.0, lam=1.0)
    assert close(out["kl"], torch.zeros(2, 3))
    # lam=gamma=1, zero values: every token's advantage is its sequence's score, then whitened
    raw = T([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    assert close(out["advantages"], masked_whiten(raw, mask), tol=1e-4)
    assert close(masked_mean(out["advantages"], mask), 0.0, tol=1e-5)

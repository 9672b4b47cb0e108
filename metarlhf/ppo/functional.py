"""Pure PPO math on tensors: masked statistics, KL estimators, GAE, losses, entropy.

Every function is side-effect free and tested against hand-computed values in
``tests/test_ppo_functional.py``. Shapes: ``b`` sequences, ``t`` response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarlhf.errors import ConfigError


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n < 2:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / std`` over the masked entries; with ``shift_mean=False`` the mean is kept.

    Unmasked entries come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi. ``[b, t] -> [b, t]``.

    * ``k1``: ``log pi - log ref`` (unbiased, can be negative per token);
    * ``k3``: ``(r - 1) - log r`` with ``r = ref / pi`` (unbiased, always >= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def compute_gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``values``, ``rewards``, ``mask``: ``[b, t]``. Positions with ``mask == 0`` (after
    the EOS) are terminal: their value and reward count as 0. Returns
    ``(advantages, returns)``, both ``[b, t]``, zero where masked.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    b, t = values.shape
    advantages = torch.zeros_like(values)
    last = torch.zeros(b, dtype=values.dtype, device=values.device)
    for i in reversed(range(t)):
        next_value = values[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        last = delta + gamma * lam * last
        advantages[:, i] = last
    advantages = advantages * mask_f
    returns = (advantages + values) * mask_f
    return advantages, returns


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate. Returns ``(loss, clip_fraction, approx_kl)``.

    ``loss = mean(max(-A * r, -A * clip(r, 1-eps, 1+eps)))`` with ``r = exp(logp - old)``;
    ``approx_kl = mean((r - 1) - log r)`` (k3 of the old policy against the new one).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    clipfrac = masked_mean((loss2 > loss1).to(logprobs.dtype), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (clip(v, old ± eps) - R)^2))``.

    Returns ``(loss, clip_fraction)``.
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss1, loss2), mask)
    clipfrac = masked_mean((loss2 > loss1).to(values.dtype), mask)
    return loss, clipfrac


def tempered_logits(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` over the last dimension, in float32, numerically safe for any
    finite temperature > 0 as :func:`metarlhf.engine.sample_token` is: the logits are shifted
    so that the largest is 0 before dividing (a detached shift, which softmax does not see),
    so a tiny temperature sends the others to -inf instead of overflowing to inf - inf = NaN;
    below :data:`metarlhf.engine.MIN_SAMPLING_TEMPERATURE`, where the division cannot be
    formed in float32, the limit: 0 at the largest logit(s), -inf elsewhere (greedy).
    ``[..., vocab] -> [..., vocab]``."""
    from metarlhf.engine import MIN_SAMPLING_TEMPERATURE

    z = logits.float()
    z = z - z.detach().amax(-1, keepdim=True)  # [..., vocab], <= 0, the max is 0
    if temperature < MIN_SAMPLING_TEMPERATURE:
        return torch.where(z == 0, z, float("-inf"))
    return z / temperature


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy from log-probabilities over the last dimension (``-inf`` entries, tokens of
    probability 0, add 0 and no NaN). ``[..., vocab] -> [...]``."""
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension. ``[..., vocab] -> [...]``."""
    return entropy_from_logprobs(F.log_softmax(logits.float(), dim=-1))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the masked entries (nan if Var(R) = 0)."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r <= 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_r)


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards ``-kl_coef * kl``, plus each sequence's score on its last unmasked token.

    ``scores``: ``[b]``; ``kl``, ``mask``: ``[b, t]``. Returns ``[b, t]`` (0 where masked).
    """
    mask_f = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask_f
    last = (mask_f.sum(1).long() - 1).clamp(min=0)  # [b]
    rewards[torch.arange(len(scores), device=kl.device), last] += scores.to(kl.dtype)
    return rewards


def adaptive_kl_update(kl_coef: float, current_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019) proportional controller: nudges ``kl_coef`` towards ``target`` KL."""
    error = max(-0.2, min(0.2, current_kl / target - 1.0))
    return kl_coef * (1.0 + error * n_steps / horizon)


def postprocess_scores(
    scores: Tensor, has_eos: Tensor, missing_eos_penalty: float | None, reward_clip: float | None
) -> Tensor:
    """Subtract the missing-EOS penalty from truncated completions, then clip to ``±reward_clip``."""
    scores = scores.clone()
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_eos).to(scores.dtype)
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def compute_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    mask: Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
) -> dict[str, Tensor]:
    """Stage 3: KL-shaped per-token rewards, GAE, whitened advantages. All ``[b, t]``."""
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = shape_rewards(scores, kl, mask, kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(values, rewards, mask, gamma, lam)
    advantages = masked_whiten(advantages, mask)
    return {"kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns}

"""Offline batch PPO of the base policy against a reward.

One PPO step is four separate stages, each its own function:

1. **rollout** (:meth:`PPOTrainer.rollout`): sample completions for a batch of prompts
   (batched ``generate`` with a KV cache), then one no-grad forward pass gives the
   old log-probs and values, and one more (adapter disabled, or the frozen copy for
   full fine-tuning) gives the reference log-probs.
2. **score** (:func:`score_completions`): call the reward ``f(prompts, completions)``
   and check that it returned one finite number per prompt; optional missing-EOS
   penalty and clipping (:func:`postprocess_scores`).
3. **advantages** (:func:`compute_advantages`): per-token reward = ``-beta * KL`` with
   the sequence score added on the last response token; GAE over the response;
   whitened advantages.
4. **optimise** (:meth:`PPOTrainer.optimise`): ``ppo_epochs`` passes over shuffled
   minibatches with the clipped policy loss, the clipped value loss and an entropy
   bonus; gradient-norm clipping.

The math (KL estimators, masked statistics, GAE, both losses, entropy, the adaptive
KL controller) lives in pure functions tested against hand-computed values.

Simplifications, stated up front:

* Single process, no gradient accumulation: one minibatch is one optimiser step.
* The reference is the frozen base: for LoRA the same model inside
  ``disable_adapter()``; for full fine-tuning a frozen copy (there is no other way).
* The value estimate is a linear head on the policy's last hidden state (one forward
  gives log-probs and values), or, with ``value_model="critic"``, a separate copy of
  the base trunk with its own head. The head starts at zero.
* Rewards are sequence-level, given to the last response token (the EOS if there is
  one). ``gamma`` defaults to 1, as in InstructGPT-style RLHF.
* On CUDA the weights stay float32 and the forward passes run under bf16 autocast.

Layout: :mod:`~metarlhf.ppo.config` (``PPOConfig``, no torch import, so the CLI stays
fast), :mod:`~metarlhf.ppo.functional` (the pure math) and :mod:`~metarlhf.ppo.trainer`
(models, rewards, ``PPOTrainer``, ``train``). Names from all three are importable from
``metarlhf.ppo``; the torch-heavy ones are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from metarlhf.ppo.config import PPOConfig

_LAZY = {
    "functional": [
        "masked_sum", "masked_mean", "masked_var", "masked_whiten", "kl_penalty", "compute_gae", "policy_loss",
        "value_loss", "entropy_from_logits", "entropy_from_logprobs", "tempered_logits", "explained_variance",
        "shape_rewards", "adaptive_kl_update", "postprocess_scores", "compute_advantages",
    ],
    "trainer": [
        "RewardFn", "resolve_device", "load_python_reward", "user_reward_adapter_dir", "check_reward_init", "base_reward_init",
        "resolve_reward", "check_out_dir",
        "score_completions", "ValueHead", "Critic", "response_forward", "first_eos_mask", "Rollout", "PPOTrainer",
        "prompt_batches", "plot_curves", "evaluate", "train",
    ],
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = ["PPOConfig", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"metarlhf.ppo.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'metarlhf.ppo' has no attribute {name!r}")

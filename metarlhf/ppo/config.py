"""PPO hyper-parameters. Imports no torch, so ``metarlhf --help`` stays instant."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from metarlhf.errors import ConfigError

MIN_PPO_TEMPERATURE = 0.05  # below it the sampled policy is nearly greedy and the PPO ratios / KL break down

@dataclass
class PPOConfig:
    """PPO hyper-parameters. Every field is also a CLI flag of ``metarlhf ppo``."""

    steps: int = field(default=100, metadata={"help": "PPO steps (one rollout batch each)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per rollout"})
    mini_batch_size: int = field(default=8, metadata={"help": "sequences per optimiser step"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "completion length cap"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "prompts are left-truncated to this"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also scales logits; >= 0.05)"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    ent_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial KL penalty coefficient (beta)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator: k1 or k3"})
    adaptive_kl: bool = field(default=False, metadata={"help": "adapt beta towards kl_target"})
    kl_target: float = field(default=6.0, metadata={"help": "target KL per sequence (adaptive beta)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive beta horizon, in samples"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten per-token rewards"})
    reward_clip: float | None = field(default=None, metadata={"help": "clip scores to ±this"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtract from scores of truncated completions"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    lora: bool = field(default=True, metadata={"help": "train a LoRA adapter (else the full model)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "LoRA target modules"})
    value_model: str = field(default="head", metadata={"help": "'head' on the policy or a separate 'critic'"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA), fp32 or bf16"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N steps (0 = only at the end)"})

    def __post_init__(self) -> None:
        positive = ["steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "max_prompt_tokens", "lora_r",
                    "lora_alpha", "kl_horizon"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0 (0 = only at the end), got {self.save_every}")
        if self.mini_batch_size > self.batch_size:
            raise ConfigError(f"mini_batch_size ({self.mini_batch_size}) exceeds batch_size ({self.batch_size})")
        if not (MIN_PPO_TEMPERATURE <= self.temperature and math.isfinite(self.temperature)):
            # PPO needs a stochastic policy: near 0 the policy's and the reference's log-probs
            # become 0 / -1/t and the KL term blows up as soon as their top tokens differ
            raise ConfigError(f"temperature must be a finite number >= {MIN_PPO_TEMPERATURE}, got {self.temperature}")
        for name in ["lr", "cliprange", "cliprange_value", "kl_target", "max_grad_norm"]:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.ent_coef < 0:
            raise ConfigError("kl_coef, vf_coef and ent_coef must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.value_model not in ("head", "critic"):
            raise ConfigError(f"value_model must be 'head' or 'critic', got {self.value_model!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ConfigError(f"reward_clip must be > 0, got {self.reward_clip}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty must be >= 0 (it is subtracted: < 0 rewards truncation), "
                              f"got {self.missing_eos_penalty}")
        if self.adaptive_kl and self.kl_coef <= 0:
            raise ConfigError("adaptive_kl needs kl_coef > 0: the controller scales beta, and 0 stays 0")
        for f in fields(self):  # what the checks above let through: nan compares false, and inf trains to NaN weights
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PPOConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown PPO config fields: {sorted(unknown)}")
        return cls(**d)

"""PPO stages around a causal LM: rollout, score, advantages, optimise; checkpoints and outputs.

See :mod:`metarlhf.ppo` for the algorithm and its simplifications.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarlhf.errors import AdapterError, ConfigError, DataError, ModelError, NotFoundError
from metarlhf.ppo.config import PPOConfig
from metarlhf.ppo.functional import (
    adaptive_kl_update,
    compute_advantages,
    entropy_from_logprobs,
    explained_variance,
    kl_penalty,
    masked_mean,
    policy_loss,
    postprocess_scores,
    tempered_logits,
    value_loss,
)
from metarlhf.runtime import resolve_device

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float] | Tensor]


def load_python_reward(spec: str) -> RewardFn:
    """``<file>:<function>`` -> the callable ``f(prompts, completions) -> list[float]``."""
    file, sep, fn_name = spec.rpartition(":")
    if not sep or not file or not fn_name:
        raise ConfigError(f"python reward must be 'python:<file>:<function>', got 'python:{spec}'")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"python reward file {file!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"metarlhf_reward_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"cannot import python reward file {file!r}")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure in user code is a bad reward spec
        raise ConfigError(f"importing python reward file {file!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"python reward file {file!r} has no function {fn_name!r}")
    return fn


def user_reward_adapter_dir(user: str, adapters_root: str | os.PathLike = "adapters", tenant: str = "default") -> Path:
    """The serving version of a user's reward adapter in the store, or an adapter directory path.

    ``user`` is a user id (resolved with :meth:`metarlhf.store.AdapterStore.resolve`: the
    ``CURRENT`` version if its checksum verifies, else the newest older one that does) or
    the path of any reward adapter directory (e.g. a cluster's).
    """
    direct = Path(user)
    if (direct / "metarlhf.json").is_file():
        return direct
    if "/" in user or os.sep in user:
        raise NotFoundError(f"reward adapter directory {user!r} does not exist (no metarlhf.json there)")
    from metarlhf.store import AdapterStore

    version = AdapterStore(adapters_root).resolve(tenant, user, "reward")
    if version is None:
        raise NotFoundError(
            f"no usable reward adapter for user {user!r} (tenant {tenant!r}) under {str(adapters_root)!r}"
        )
    return version.path


def _reward_model_fn(adapter_dir: Path | None, encoder_dir: str | None, device: torch.device) -> RewardFn:
    try:
        from metarlhf.reward import load_reward_model
    except ImportError as e:
        raise ConfigError(f"reward models are unavailable (metarlhf.reward cannot be imported: {e})") from e
    rm = load_reward_model(encoder_dir=encoder_dir, adapter_dir=adapter_dir, device=str(device))

    def score(prompts: list[str], completions: list[str]) -> Tensor:
        with torch.no_grad():
            return rm.score(prompts, completions).float().cpu()

    return score


def base_reward_init(reward_init: str | os.PathLike | None = None) -> Path:
    """The reward init of ``--reward base``: ``reward_init``, or by default the shipped
    ``adapters/meta/reward`` of this package's repository (never a path relative to the
    working directory). A missing init is a ``ConfigError``, never a silent zero reward."""
    if reward_init is not None:
        from metarlhf.reward import require_init_dir

        require_init_dir(reward_init)
        return Path(reward_init)
    from metarlhf.models import shipped_init_dir

    shipped = shipped_init_dir("reward")
    if not (shipped / "metarlhf.json").is_file():
        raise ConfigError(
            f"--reward base needs a reward init, and there is no shipped one at {str(shipped)!r}; "
            "pass --reward-init DIR (made by `metarlhf meta-train reward`)"
        )
    return shipped


def check_reward_init(spec: str, reward_init: str | os.PathLike | None) -> None:
    """``reward_init`` (if given) must be a reward init directory, and ``spec`` must be ``base``;
    ``base`` without one needs the shipped init."""
    if reward_init is not None and spec != "base":
        raise ConfigError(f"a reward init only applies to the 'base' reward, not {spec!r}")
    if spec == "base":
        base_reward_init(reward_init)


def resolve_reward(
    spec: str,
    adapters_root: str | os.PathLike = "adapters",
    tenant: str = "default",
    encoder_dir: str | None = None,
    device: torch.device | str = "cpu",
    reward_init: str | os.PathLike | None = None,
) -> RewardFn:
    """``base`` | ``user:<id or adapter dir>`` | ``python:<file>:<fn>`` -> reward callable.

    ``base`` is the reward init ``reward_init`` (an init made for ``encoder_dir``, e.g.
    ``adapters/meta/reward-smollm2`` with the SmolLM2 encoder), by default the shipped
    ``adapters/meta/reward`` (made for the embedded MiniLM encoder) found next to the
    package. ``adapters_root`` is the adapter store of ``user:<id>`` rewards only."""
    device = torch.device(device)
    check_reward_init(spec, reward_init)
    if spec == "base":
        init = base_reward_init(reward_init)
        try:
            return _reward_model_fn(init, encoder_dir, device)
        except AdapterError as e:  # the shipped init is MiniLM's: another encoder needs its own
            if reward_init is not None:
                raise
            raise AdapterError(f"{e}; pass --reward-init with an init made for this encoder") from e
    kind, sep, rest = spec.partition(":")
    if sep and kind == "user" and rest:
        return _reward_model_fn(user_reward_adapter_dir(rest, adapters_root, tenant), encoder_dir, device)
    if sep and kind == "python" and rest:
        return load_python_reward(rest)
    raise ConfigError(f"cannot resolve reward {spec!r}: use 'base', 'user:<id>' or 'python:<file>:<function>'")


def score_completions(reward_fn: RewardFn, prompts: list[str], completions: list[str]) -> Tensor:
    """Stage 2: call the reward and validate its output. Returns ``[b]`` float32 on CPU."""
    try:
        raw = reward_fn(prompts, completions)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise DataError(f"the reward function raised {type(e).__name__}: {e}") from e
    try:
        scores = torch.as_tensor(raw.detach().cpu() if isinstance(raw, Tensor) else list(raw), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"the reward function must return a list of floats, got {type(raw).__name__}: {e}") from e
    scores = scores.reshape(-1) if scores.dim() <= 1 and scores.numel() == len(prompts) else scores
    if scores.dim() != 1 or scores.numel() != len(prompts):
        raise DataError(
            f"the reward function returned {tuple(scores.shape)} values for {len(prompts)} prompts; "
            f"it must return exactly one float per prompt (batch starts with prompt {prompts[0][:60]!r})"
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise DataError(
            f"the reward function returned {scores[i].item()} for batch item {i} "
            f"(prompt {prompts[i][:80]!r}); rewards must be finite ({len(bad)} non-finite in this batch)"
        )
    return scores


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """``hidden -> 1``, zero-initialised so the first values are 0."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h.to(self.proj.weight.dtype)).squeeze(-1)


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def _trunk_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder trunk and the LM head of a causal LM (peft-wrapped or not)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.get_decoder(), base.get_output_embeddings()


def response_forward(
    lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    context_len: int,
    temperature: float,
    value_head: nn.Module | None = None,
    critic: nn.Module | None = None,
    with_entropy: bool | str = False,
) -> dict[str, Tensor]:
    """One forward pass; log-probs (and values, entropy) of the response tokens only.

    ``input_ids``: ``[b, ctx + t]``. The LM head runs on the ``t`` response positions
    only, never on the prompt, so the ``[b, seq, vocab]`` logits are never built.
    """
    trunk, head = _trunk_and_head(lm)
    hidden = trunk(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask), use_cache=False
    ).last_hidden_state  # [b, seq, h]
    h = hidden[:, context_len - 1 : -1]  # [b, t, h]: the state before each response token
    logits = tempered_logits(head(h), temperature)  # [b, t, vocab], float32
    targets = input_ids[:, context_len:]  # [b, t]
    logp_all = F.log_softmax(logits, dim=-1)  # [b, t, vocab]
    out = {"logprobs": torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)}  # [b, t]
    if with_entropy:
        # Entropy from the same log-softmax; kept out of the graph unless it is in the loss.
        with torch.set_grad_enabled(with_entropy == "grad" and torch.is_grad_enabled()):
            out["entropy"] = entropy_from_logprobs(logp_all)  # [b, t]
    if critic is not None:
        ch = critic.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask), use_cache=False
        ).last_hidden_state
        out["values"] = critic.head(ch[:, context_len - 1 : -1]).float()
    elif value_head is not None:
        out["values"] = value_head(h).float()
    return out


class Critic(nn.Module):
    """A separate value model: a trainable copy of the base trunk plus a value head."""

    def __init__(self, base_lm: nn.Module) -> None:
        super().__init__()
        trunk, _ = _trunk_and_head(base_lm)
        self.trunk = copy.deepcopy(trunk)
        self.head = ValueHead(base_lm.config.hidden_size)


def first_eos_mask(responses: Tensor, eos_token_id: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mask of response tokens up to and including the first EOS. Returns ``(mask, has_eos)``.

    ``responses``: ``[b, t]`` -> mask ``[b, t]`` (bool), has_eos ``[b]`` (bool).
    """
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for i in ids:
        is_eos |= responses == i
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos, is_eos.any(1)


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of experience. Token tensors are ``[b, ctx + t]``, the rest ``[b, t]`` / ``[b]``."""

    prompts: list[str]
    completions: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    context_len: int
    mask: Tensor
    has_eos: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor


class PPOTrainer:
    """PPO on a causal LM: ``step(prompts)`` = rollout -> score -> advantages -> optimise.

    ``model``/``tokenizer`` are the base policy (e.g. from :func:`metarlhf.models.load_policy`).
    With ``config.lora`` the model is wrapped in a peft LoRA and only the adapter (and the
    value head) train; the reference is the same model with the adapter disabled.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        reward_fn: RewardFn,
        config: PPOConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = cfg = config or PPOConfig()
        self.device = resolve_device(str(device))
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.eos_token_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ModelError("the policy has no eos_token_id; cannot tell where completions end")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = model.to(self.device).float()
        # A separate critic is a full trainable copy of the base trunk, made before LoRA is injected.
        self.critic = Critic(model).to(self.device).requires_grad_(True) if cfg.value_model == "critic" else None
        self.ref_model: nn.Module | None = None
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            )
            try:
                self.model = get_peft_model(model, lcfg)
            except ValueError as e:
                raise ConfigError(f"cannot apply LoRA to targets {cfg.lora_targets}: {e}") from e
        else:
            self.model = model
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.value_head = None if self.critic is not None else ValueHead(model.config.hidden_size).to(self.device)
        self.model.eval()  # no dropout: PPO ratios must be 1 on the first minibatch
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += list((self.critic if self.critic is not None else self.value_head).parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-5, weight_decay=0.0)
        self.kl_coef = cfg.kl_coef
        self.step_count = 0
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

    # -- helpers ---------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def trainable_parameters(self) -> dict[str, Tensor]:
        """Everything the optimiser updates, by stable name (policy, then value)."""
        out = {f"policy.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        value = self.critic if self.critic is not None else self.value_head
        out.update({f"value.{n}": p for n, p in value.named_parameters()})
        return out

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Chat-template, left-pad and left-truncate prompts. ``[b, ctx]``."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                     for p in prompts]
        else:
            texts = prompts
        tok.truncation_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True,
                  max_length=self.config.max_prompt_tokens, add_special_tokens=False)
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    @contextmanager
    def _plain_sampling(self) -> Iterator[None]:
        """Sample from softmax(logits / T) and nothing else. A policy's generation_config.json
        may carry repetition_penalty, min_new_tokens, no_repeat_ngram_size...; ``generate``
        would apply them, but the log-probs PPO uses (``response_forward``) do not, so the
        ratios and the KL would be off-policy. Passing ``generation_config=`` to ``generate``
        is not enough (transformers merges the model's defaults back in), so the model's own
        config is swapped for one with only the special token ids, and restored after."""
        from transformers import GenerationConfig

        # the causal LM inside whatever wraps it (peft, a value head): every module that has one
        # (its own attribute, not one a wrapper forwards)
        owners = [m for m in self.model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
        saved = [m.generation_config for m in owners]
        for m, g in zip(owners, saved, strict=True):
            m.generation_config = GenerationConfig(bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id,
                                                   pad_token_id=g.pad_token_id)
        try:
            yield
        finally:
            for m, g in zip(owners, saved, strict=True):
                m.generation_config = g

    # -- stage 1 ---------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        cfg = self.config
        enc = self.encode_prompts(prompts)
        ctx = enc["input_ids"].shape[1]
        with self._autocast(), self._plain_sampling():
            out = self.model.generate(
                **enc, do_sample=True, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_k=0, top_p=1.0, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_token_id,
                use_cache=True,
            )  # [b, ctx + t]
        responses = out[:, ctx:]  # [b, t]
        mask, has_eos = first_eos_mask(responses, self.eos_token_id)
        attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)  # [b, ctx + t]
        completions = self.tokenizer.batch_decode(responses.masked_fill(~mask, self.tokenizer.pad_token_id),
                                                  skip_special_tokens=True)
        with self._autocast():
            cur = response_forward(self.model, out, attn, ctx, cfg.temperature, self.value_head, self.critic)
            if self.ref_model is not None:
                ref = response_forward(self.ref_model, out, attn, ctx, cfg.temperature)
            else:
                with self.model.disable_adapter():
                    ref = response_forward(self.model, out, attn, ctx, cfg.temperature)
        m = mask.float()
        return Rollout(
            prompts=list(prompts), completions=completions, input_ids=out, attention_mask=attn, context_len=ctx,
            mask=m, has_eos=has_eos.cpu(), logprobs=cur["logprobs"] * m, ref_logprobs=ref["logprobs"] * m,
            values=cur["values"] * m,
        )

    # -- stage 2 ---------------------------------------------------------------------
    def score(self, batch: Rollout) -> tuple[Tensor, Tensor]:
        """Raw scores and post-processed scores (EOS penalty, clipping), both ``[b]``."""
        raw = score_completions(self.reward_fn, batch.prompts, batch.completions)
        cfg = self.config
        return raw, postprocess_scores(raw, batch.has_eos, cfg.missing_eos_penalty, cfg.reward_clip)

    # -- stage 3 ---------------------------------------------------------------------
    def advantages(self, batch: Rollout, scores: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        return compute_advantages(
            scores.to(self.device), batch.logprobs, batch.ref_logprobs, batch.values, batch.mask,
            self.kl_coef, cfg.gamma, cfg.lam, cfg.kl_estimator, cfg.whiten_rewards,
        )

    # -- stage 4 ---------------------------------------------------------------------
    def optimise(self, batch: Rollout, adv: dict[str, Tensor]) -> dict[str, float]:
        cfg = self.config
        b = batch.input_ids.shape[0]
        stats: dict[str, list[float]] = {k: [] for k in
                                         ["pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "grad_norm"]}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train(False)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(b)
            for start in range(0, b, cfg.mini_batch_size):
                idx = perm[start : start + cfg.mini_batch_size].to(self.device)
                m = batch.mask[idx]
                with self._autocast():
                    out = response_forward(self.model, batch.input_ids[idx], batch.attention_mask[idx],
                                           batch.context_len, cfg.temperature, self.value_head, self.critic,
                                           with_entropy="grad" if cfg.ent_coef > 0 else True)
                pg, clipfrac, approx_kl = policy_loss(out["logprobs"], batch.logprobs[idx], adv["advantages"][idx],
                                                      m, cfg.cliprange)
                vf, vf_clipfrac = value_loss(out["values"], batch.values[idx], adv["returns"][idx], m,
                                             cfg.cliprange_value)
                entropy = masked_mean(out["entropy"], m)
                loss = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optimizer.step()
                for k, v in [("pg_loss", pg), ("vf_loss", vf), ("clipfrac", clipfrac), ("vf_clipfrac", vf_clipfrac),
                             ("approx_kl", approx_kl), ("entropy", entropy), ("grad_norm", grad_norm)]:
                    stats[k].append(float(v.detach()))
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def step(self, prompts: list[str]) -> dict[str, float]:
        """One PPO step on a batch of prompts. Returns the metrics of that step."""
        cfg = self.config
        t0 = time.perf_counter()
        batch = self.rollout(prompts)
        t_gen = time.perf_counter() - t0
        raw, scores = self.score(batch)
        adv = self.advantages(batch, scores)
        t1 = time.perf_counter()
        stats = self.optimise(batch, adv)
        dt = time.perf_counter() - t0
        m = batch.mask
        seq_kl = float((adv["kl"].sum(1)).mean())
        n_tokens = int(m.sum())
        metrics = {
            "step": self.step_count + 1,
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "score": float(scores.mean()),
            "kl": seq_kl,
            "kl_coef": self.kl_coef,
            "entropy": stats["entropy"],
            "clipfrac": stats["clipfrac"],
            "approx_kl": stats["approx_kl"],
            "pg_loss": stats["pg_loss"],
            "vf_loss": stats["vf_loss"],
            "vf_clipfrac": stats["vf_clipfrac"],
            "grad_norm": stats["grad_norm"],
            "explained_variance": explained_variance(batch.values, adv["returns"], m),
            "response_len": float(m.sum(1).mean()),
            "eos_frac": float(batch.has_eos.float().mean()),
            "tokens": n_tokens,
            "tokens_per_s": n_tokens / dt,
            "time_rollout_s": t_gen,
            "time_optimise_s": time.perf_counter() - t1,
            "time_step_s": dt,
        }
        if cfg.adaptive_kl:
            self.kl_coef = adaptive_kl_update(self.kl_coef, seq_kl, cfg.kl_target, cfg.kl_horizon, len(prompts))
        self.step_count += 1
        return metrics

    # -- checkpoints -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Trainable weights, optimiser moments and RNG state, all as tensors (safetensors-able)."""
        tensors = {f"param.{n}": p.detach() for n, p in self.trainable_parameters().items()}
        name_of = {id(p): n for n, p in self.trainable_parameters().items()}
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                tensors[f"optim.{name_of[id(p)]}.{k}"] = torch.as_tensor(v).detach()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.device(self.device).type == "cuda":  # the device sampling runs on, not the current one
            tensors["rng.cuda"] = torch.cuda.get_rng_state(torch.device(self.device))
        return tensors

    def base_model_record(self, base_model_name: str | None = None) -> dict[str, Any]:
        """The base model a checkpoint was trained on: its name and architecture fingerprint."""
        from metarlhf.models import base_fingerprint

        return {"name": base_model_name, **base_fingerprint(self.model)}

    def save_checkpoint(self, path: str | os.PathLike, base_model_name: str | None = None) -> Path:
        """Write a resumable checkpoint directory atomically (replaces any older one).

        It records the base model (``base_model_name`` and the architecture fingerprint) so
        that :meth:`load_checkpoint` can refuse to resume on another base."""
        from metarlhf.io import atomic_dir, save_tensors

        state = {"step": self.step_count, "kl_coef": self.kl_coef, "config": asdict(self.config),
                 "base_model": self.base_model_record(base_model_name)}
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "state.safetensors", self.state_tensors())
            (tmp / "trainer.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return Path(path)

    def _check_checkpoint_base(self, path: Path, saved: dict[str, Any] | None, base_model_name: str | None) -> None:
        """Refuse a checkpoint recorded for another base model (name or architecture)."""
        if not isinstance(saved, dict):  # made before checkpoints recorded their base
            log.warning("checkpoint %s does not record its base model (an older checkpoint); resuming on %s "
                        "unchecked (tensor shapes are still verified)", path, base_model_name or "this model")
            return
        here = self.base_model_record(base_model_name)
        for key, now in here.items():
            was = saved.get(key)
            if key == "name" and (was in (None, "unknown") or now in (None, "unknown")):
                continue
            if was != now:
                raise ConfigError(
                    f"checkpoint {path} was trained on base model {saved.get('name')!r} ({key}={was!r}), but this "
                    f"run's base is {here['name']!r} ({key}={now!r}); resume with the same --policy, or use a "
                    "new --out"
                )

    def load_checkpoint(self, path: str | os.PathLike, base_model_name: str | None = None) -> int:
        """Restore weights, optimiser and counters from :meth:`save_checkpoint`. Returns the step.

        A checkpoint made on another base model (``base_model_name`` or architecture) is
        refused with a ``ConfigError``; one from before checkpoints recorded their base is
        resumed with a warning (its tensor shapes are still checked)."""
        from metarlhf.io import load_tensors

        path = Path(path)
        try:
            state = json.loads((path / "trainer.json").read_text())
            tensors = load_tensors(path / "state.safetensors")
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"checkpoint {path} is unreadable: {e}") from e
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ModelError(f"checkpoint {path}/state.safetensors is unreadable: {e}") from e
        saved_cfg = state.get("config", {})
        for key in ("lora", "lora_r", "lora_targets", "value_model"):
            if saved_cfg.get(key) != getattr(self.config, key):
                raise ConfigError(
                    f"checkpoint {path} was made with {key}={saved_cfg.get(key)!r}, but this run has "
                    f"{key}={getattr(self.config, key)!r}"
                )
        self._check_checkpoint_base(path, state.get("base_model"), base_model_name)
        params = self.trainable_parameters()
        for n, p in params.items():
            if f"param.{n}" not in tensors:
                raise ModelError(f"checkpoint {path} lacks parameter {n}")
            saved_shape = tuple(tensors[f"param.{n}"].shape)
            if saved_shape != tuple(p.shape):
                raise ModelError(
                    f"checkpoint {path} holds {n} of shape {saved_shape}, but this model's is {tuple(p.shape)}; "
                    "it was trained on another base model"
                )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
        for n, p in params.items():
            st = {k.rsplit(".", 1)[1]: v.to(self.device) for k, v in tensors.items()
                  if k.startswith(f"optim.{n}.") and k.count(".") == n.count(".") + 2}
            if st:
                if "step" in st:
                    st["step"] = st["step"].cpu()
                self.optimizer.state[p] = st
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.device(self.device).type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], torch.device(self.device))
        self.step_count = int(state["step"])
        self.kl_coef = float(state["kl_coef"])
        return self.step_count

    # -- outputs -----------------------------------------------------------------------
    def save_policy(self, out: str | os.PathLike, base_model_name: str, extra_meta: dict | None = None) -> Path:
        """LoRA: a project adapter dir (kind="policy"). Full: an HF model dir in safetensors."""
        out = Path(out)
        if self.config.lora:
            from peft import get_peft_model_state_dict

            from metarlhf.adapters import Adapter, save_adapter

            tensors = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.model).items()}
            pcfg = self.model.peft_config["default"].to_dict()
            pcfg = json.loads(json.dumps(pcfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
            meta = {"kind": "policy", "base_model": base_model_name, "init": "ppo", "steps": self.step_count}
            meta.update(extra_meta or {})
            return save_adapter(out, Adapter(tensors=tensors, config=pcfg, meta=meta))
        from metarlhf.io import atomic_dir

        with atomic_dir(out) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "metarlhf_ppo.json").write_text(json.dumps(
                {"base_model": base_model_name, "steps": self.step_count, **(extra_meta or {})}, indent=2) + "\n")
        return out


# --------------------------------------------------------------------------------------
# Training loop with metrics, checkpoints and plots
# --------------------------------------------------------------------------------------


def prompt_batches(prompts: list[str], batch_size: int, seed: int, start_step: int, steps: int) -> list[list[str]]:
    """Deterministic batches for steps ``start_step .. steps-1`` (reshuffled every epoch)."""
    rng = random.Random(seed)
    order: list[int] = []
    batches = []
    for step in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            batch.append(prompts[order.pop()])
        if step >= start_step:
            batches.append(batch)
    return batches


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike, kl_bound: float | None = None) -> Path:
    """PNG of the mean reward and KL per step, from a metrics JSONL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_reward" in r]
    rows = [r for r in rows if "reward" in r]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(steps, [r["reward"] for r in rows], label="train batch")
    if evals:
        a.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out")
    a.set(xlabel="PPO step", ylabel="mean reward", title="reward")
    a.legend()
    b.plot(steps, [r["kl"] for r in rows], label="train batch")
    if evals:
        b.plot([r["step"] for r in evals], [r["eval_kl"] for r in evals], "o-", label="held-out")
    if kl_bound is not None:
        b.axhline(kl_bound, color="r", ls="--", label=f"bound {kl_bound}")
    b.set(xlabel="PPO step", ylabel="KL per sequence (nats)", title="KL(policy || base)")
    b.legend()
    fig.tight_layout()
    import io as _io

    from metarlhf.io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric rows written after the checkpoint being resumed."""
    if not path.is_file():
        return
    from metarlhf.io import atomic_write_bytes

    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


@torch.no_grad()
def evaluate(trainer: PPOTrainer, prompts: list[str], batch_size: int | None = None) -> dict[str, float]:
    """Mean raw reward and KL of fresh samples on ``prompts`` (no update)."""
    bs = batch_size or trainer.config.batch_size
    rewards, kls = [], []
    for i in range(0, len(prompts), bs):
        batch = trainer.rollout(prompts[i : i + bs])
        rewards.append(score_completions(trainer.reward_fn, batch.prompts, batch.completions))
        kl = kl_penalty(batch.logprobs, batch.ref_logprobs, "k1") * batch.mask
        kls.append(kl.sum(1).cpu())
    return {"eval_reward": float(torch.cat(rewards).mean()), "eval_kl": float(torch.cat(kls).mean())}


#: Files :func:`train` writes into its output directory, and what its ``checkpoint/`` holds.
OUT_FILES = ("config.json", "metrics.jsonl", "curves.png")
CHECKPOINT_FILES = frozenset({"state.safetensors", "trainer.json"})


def check_out_dir(out_dir: str | os.PathLike, lora: bool | None = None) -> Path:
    """``out_dir`` must be a directory or not exist yet, and what :func:`train` writes in it
    must be writable there: its files not directories, ``checkpoint/`` and the policy
    directory (``adapter/`` with ``lora``, ``model/`` without; neither if ``lora`` is None)
    missing or earlier outputs of the same kind. A ``ConfigError`` otherwise, before any
    model is loaded or trained rather than when saving at the end."""
    from metarlhf.adapters import check_out
    from metarlhf.io import check_output_dir

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {str(out)!r} exists and is not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output directory {str(out)!r}: {str(parent)!r} is not a directory")
            break
    if not out.is_dir():
        return out
    known = {*OUT_FILES, "checkpoint", "adapter", "model"}
    foreign = sorted(f.name for f in out.iterdir() if f.name not in known and not f.name.startswith("."))
    if foreign:  # not an earlier run's output: never overwrite or delete what metarlhf did not write
        raise ConfigError(f"refusing to use {str(out)!r} as the output directory: it holds files a PPO run does "
                          f"not write ({', '.join(foreign[:5])}); choose another --out or remove them")
    if (out / "config.json").is_file():
        from dataclasses import fields

        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{str(out / 'config.json')!r} is not a PPO run's config ({e}); "
                              "choose another --out") from e
        names = {f.name for f in fields(PPOConfig)}
        if not isinstance(saved, dict) or "ppo_epochs" not in saved or not set(saved) <= names:
            raise ConfigError(f"{str(out / 'config.json')!r} is not a PPO run's config; choose another --out")
    for name in OUT_FILES:
        if (out / name).is_dir():
            raise ConfigError(f"cannot write the file {str(out / name)!r}: a directory of that name exists")
    check_output_dir(out / "checkpoint", lambda p: all(f.name in CHECKPOINT_FILES for f in p.iterdir()))
    if lora is True:
        check_out(out / "adapter", kind="policy")
    elif lora is False:
        check_output_dir(out / "model")  # its file names are the model's: checked again when saving
    return out


def train(
    trainer: PPOTrainer,
    prompts: list[str],
    out_dir: str | os.PathLike,
    eval_prompts: list[str] | None = None,
    eval_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    kl_bound: float | None = None,
    base_model_name: str = "unknown",
) -> dict[str, Any]:
    """Run ``config.steps`` PPO steps; writes metrics.jsonl, checkpoint/, curves.png and the policy.

    Output directory layout::

        config.json      the PPOConfig
        metrics.jsonl    one row per step (+ eval rows), appended and fsynced
        checkpoint/      resumable state (weights, optimiser, RNG), replaced atomically
        curves.png       reward and KL per step
        adapter/ | model/  the trained policy (LoRA adapter, or full HF model dir)
    """
    from tqdm.auto import tqdm

    from metarlhf.io import atomic_write_json

    cfg = trainer.config
    if not prompts:
        raise DataError("no prompts to train on")
    out = check_out_dir(out_dir, lora=cfg.lora)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, ckpt = out / "metrics.jsonl", out / "checkpoint"
    start = 0
    if resume and (ckpt / "trainer.json").is_file():
        start = trainer.load_checkpoint(ckpt, base_model_name)
        _truncate_metrics(metrics_path, start)
        log.info("resumed from %s at step %d", ckpt, start)
    elif metrics_path.exists():
        if resume:
            log.info("no checkpoint in %s; starting from step 0", out)
        metrics_path.unlink()
    atomic_write_json(out / "config.json", asdict(cfg))
    last: dict[str, Any] = {}
    if eval_prompts and eval_every and start == 0:
        baseline = {"step": 0, **evaluate(trainer, eval_prompts)}  # the base policy, before any update
        _append_jsonl(metrics_path, baseline)
        log.info("held-out before training: %s", baseline)
    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", disable=not progress)
    for i, batch in enumerate(prompt_batches(prompts, cfg.batch_size, cfg.seed, start, cfg.steps)):
        step = start + i + 1
        row = trainer.step(batch)
        if eval_prompts and eval_every and (step % eval_every == 0 or step == cfg.steps):
            row.update(evaluate(trainer, eval_prompts))
        _append_jsonl(metrics_path, row)
        last = row
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            trainer.save_checkpoint(ckpt, base_model_name)
    bar.close()
    trainer.save_checkpoint(ckpt, base_model_name)
    policy_dir = trainer.save_policy(out / ("adapter" if cfg.lora else "model"), base_model_name)
    if metrics_path.is_file():
        plot_curves(metrics_path, out / "curves.png", kl_bound)
    return {"last": last, "policy_dir": str(policy_dir), "steps": trainer.step_count}

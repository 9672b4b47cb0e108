"""Few-shot policy LoRA: KTO for thumbs, DPO for pairs, and its meta-trained init.

Adaptation (:func:`adapt_policy`)
    One user's LoRA (r=8 on ``q_proj, v_proj``) starts from an init (the shipped
    meta-trained one, a given directory, or peft's default: A random, B = 0) and is
    trained for a bounded number of Adam steps on that user's feedback:

    * unpaired thumbs use KTO (Ethayarajh et al. 2024) with
      ``r = log pi(y|x) - log pi_ref(y|x)`` (sums over completion tokens) and
      ``loss = w_y * (1 - sigmoid(beta * (r - z0)))`` for ups,
      ``w_y * (1 - sigmoid(beta * (z0 - r)))`` for downs;
    * pairs use DPO, ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``;
    * ``sft_weight`` adds the per-token NLL of thumbs-up (and chosen) completions
      (rejection-sampling fine-tuning; with DPO this is RPO, Pang et al. 2024);
    * ``pair_weight`` adds DPO on every (up, down) pair of thumbs on the same prompt,
      computed from the same forward pass as KTO (no extra model call);
    * the thumbs loss is ``kto_weight * KTO + sft_weight * SFT + pair_weight * DPO``;
      a mix of thumbs and pairs averages the two, weighted by their record counts.

    Speed (CPU): with ``train_layers = N`` only the LoRA of the top N decoder layers
    trains; the lower layers (their LoRA fixed at the init) are run once, without grad,
    and the residual stream entering layer ``L - N`` is cached (:func:`hidden_at`), so
    each step runs forward and backward through N layers only. Rows run in groups of
    similar length (:func:`length_groups`). On Llama-family models with a plain LM head
    (:func:`plain_head`), only the real completion positions go through the head, fused
    with the log-softmax (:func:`token_logprobs`: it keeps the ``[N, V]`` softmax, not
    autograd's logits and their copies), and rows that share a prompt run as one packed
    sequence, the prompt once (:func:`pack_prompts`; sdpa or eager attention). Other heads,
    and the reference's top-k for the KL anchor, use the full logits of the last ``C + 1``
    positions. bf16 autocast on CPUs that support it.

Exploration (:data:`STYLE_HINTS`, :func:`exploration_hints`)
    A base model rarely shows the style a user likes, so K thumbs on plain samples are
    mostly "not this". Samples for a new user can be drawn with a style hint appended
    to the prompt (a fixed, generic menu: short, numbered/bulleted list, enthusiastic,
    "you", formal, casual, an example, a question back, plain words, "we"). The user
    rates the answer to the *plain* prompt, and the adapter is trained on the plain
    prompt, so it learns to produce the liked style unprompted (context distillation).

    ``adaptive`` exploration (:func:`explore_adaptive`) collects the K thumbs in rounds:
    the first half spread over distinct hints of the menu, then, a few prompts at a time,
    each prompt's samples drawn with the arms (hints or plain) that Thompson sampling on
    the Beta(1 + ups, 1 + downs) posteriors picks. Simplification: an arm's "success" is a
    thumbs up, which is relative to the other sample shown with it.

Liked-style distillation (:func:`distill_records`, ``AdaptConfig.distill_samples``)
    The hints with positive net feedback (more ups than downs) are the styles the user
    liked. ``distill_samples`` extra samples are drawn with the best of them on the
    user's prompts and added, on the plain prompt, as thumbs up the user never gave
    (optionally ranked by the user's personalized reward model). Needs the hint of each
    record, which only exploration knows; the server path (no hints) draws none.

    The reference policy is the same base model with the adapter disabled
    (``peft_model.disable_adapter()``), never a second copy. Reference log-probs do not
    change during training, so they are computed once, before the first step.

    Simplifications: the KTO reference point ``z0`` is the batch mean of the log-ratios
    of the batch's own completions, clamped at 0 and detached (the paper uses mismatched
    prompt/completion pairs, which costs another forward pass); completions get an EOS
    appended (a rated answer is a finished answer); prompts keep their last
    ``max_prompt_tokens`` tokens and completions their first ``max_completion_tokens``.

Using a reward model to stretch a few labels
    :func:`adapt_policy` accepts ``scorer(prompts, completions) -> scores`` (e.g. a
    personalized ``RewardModel.score``) with ``augment_samples = n``: before training it
    samples ``n`` completions per support prompt from the init policy, ranks them with
    the scorer and adds the top half as thumbs up and the rest as thumbs down
    (on-policy augmentation). :func:`best_of_n` ranks N samples at inference time.

Meta-training (:func:`meta_train_policy`)
    First-order meta-learning over simulated users (``metarlhf.simusers``). A pool of
    base-model samples (several per prompt) is generated once and their reference
    log-probs computed once. Each meta-step takes a training user (drawn at random;
    ``subspace``: the users in turn) and two disjoint prompt sets; the user labels the
    samples (thumbs); the inner loop is exactly the adaptation procedure (Adam, same lr
    and loss mix, ``inner_steps`` steps) on the support set. ``explore="hints"`` draws
    the pool with the exploration hints.

    * ``reptile``: ``theta <- theta + eps * (phi - theta)`` (Nichol et al. 2018);
    * ``fomaml``:  ``theta <- Adam(theta, grad_phi L_query(phi))`` (first-order MAML);
    * ``subspace``: each task adapts a fresh LoRA (B = 0; A: peft's seeded draw, or its own
      draw per task with ``task_a="per-task"``); the init's A is the top-r right singular
      directions of the tasks' updates ``B A``, B = 0 (:func:`task_subspace`). The query
      set, ``reptile_eps`` and ``outer_lr`` are unused.

    Checkpoints (init tensors, outer optimizer state, step; ``subspace``: one file of LoRA
    factors per task under ``tasks/``) are written every ``checkpoint_every`` steps;
    ``resume=True`` continues from the last one. Metrics go to ``metrics.jsonl`` in the
    work directory.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metarlhf.adapters import Adapter, load_adapter, save_adapter
from metarlhf.data import Pair, Record, Thumbs, prompt_digests, text_digest
from metarlhf.errors import AdapterError, Cancelled, ConfigError, DataError, ModelError
from metarlhf.models import DEFAULT_POLICY_NAME, model_name, shipped_init_dir
from metarlhf.runtime import model_device, unwrap_model

log = logging.getLogger(__name__)

#: LoRA settings of every policy adapter.
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")

#: The shipped meta-trained init (``metarlhf meta-train policy``).
DEFAULT_INIT_DIR = shipped_init_dir("policy")

Scorer = Callable[[list[str], list[str]], Any]


# ----------------------------------------------------------------------------- pure losses
def kto_loss(
    policy_logps: Any,
    ref_logps: Any,
    labels: Any,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Any, Any]:
    """KTO loss on sequence log-prob sums. Returns ``(mean loss, z0)``.

    ``policy_logps``, ``ref_logps``: ``[n]`` summed log-probs of each completion;
    ``labels``: ``[n]`` 1 = desirable (thumbs up), 0 = undesirable. ``z0`` is the mean
    log-ratio clamped at 0, detached (it is a reference point, not a training signal).
    """
    import torch

    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    ratio = policy_logps - ref_logps  # [n]
    z0 = ratio.detach().mean().clamp(min=0)
    up = labels.to(torch.bool)
    v = torch.where(up, torch.sigmoid(beta * (ratio - z0)), torch.sigmoid(beta * (z0 - ratio)))  # [n]
    w = torch.where(up, torch.full_like(ratio, desirable_weight), torch.full_like(ratio, undesirable_weight))
    return (w * (1 - v)).mean(), z0


def dpo_loss(
    policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float = 0.1
) -> Any:
    """DPO loss ``mean(-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)))``; inputs ``[n]``."""
    import torch.nn.functional as F

    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # [n]
    return -F.logsigmoid(beta * margin).mean()


# ----------------------------------------------------------------------------- config
@dataclass
class AdaptConfig:
    """Hyper-parameters of one user's adaptation."""

    steps: int = 12  # optimizer steps (bounded)
    lr: float = 1e-2  # Adam learning rate. Chosen on training users (benchmarks/results/policy_lr_pilot.json):
    #                   win rate 0.60 / 0.64 / 0.72 / 0.74 at 2e-3 / 5e-3 / 1e-2 / 1e-2 x 12 steps (meta init);
    #                   8 steps at 2e-3 barely moved the sampled style. (2e-3 with KTO over all layers
    #                   wrecked fluency in session 1; this recipe is SFT + paired DPO on the top layers.)
    beta: float = 0.1  # KTO / DPO temperature
    batch_size: int = 16  # records per step (all of them when K <= batch_size)
    max_prompt_tokens: int = 96
    max_completion_tokens: int = 64
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with bf16 support, else fp32; "fp32"; "bf16"
    kto_weight: float = 0.0  # weight of the KTO term on thumbs
    sft_weight: float = 1.0  # weight of the NLL (per token) of thumbs-up / chosen completions
    pair_weight: float = 1.0  # weight of DPO on (up, down) thumbs of the same prompt
    train_layers: int = 15  # train the LoRA of the top N decoder layers only (0: all); lower ones stay at init
    distill_samples: int = 0  # extra self-generated thumbs up in the liked style (needs the records' hints)
    distill_hints: int = 1  # how many liked hints (positive net feedback) the extra samples use
    kl_weight: float = 0.0  # fluency anchor: per-token KL(reference || policy) on the feedback's completions
    kl_topk: int = 32  # the anchor's KL is over the reference's top-k tokens + one bucket for the rest
    contrast_weight: float = 0.0  # prompt contrast: a liked answer must gain more after its own prompt than after
    #                               another support prompt (DPO form), so it is learnt as a style, not a template

    def __post_init__(self) -> None:
        if not 1 <= self.kl_topk <= 4096:
            raise ConfigError(f"kl_topk must be in [1, 4096], got {self.kl_topk}")
        if not 0 <= self.distill_samples <= 256:
            raise ConfigError(f"distill_samples must be in [0, 256], got {self.distill_samples}")
        if self.distill_hints < 1:
            raise ConfigError(f"distill_hints must be >= 1, got {self.distill_hints}")
        for name in ("kto_weight", "sft_weight", "pair_weight", "kl_weight", "contrast_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.kto_weight + self.sft_weight + self.pair_weight <= 0:
            raise ConfigError("at least one of kto_weight, sft_weight, pair_weight must be > 0")
        if self.train_layers < 0:
            raise ConfigError(f"train_layers must be >= 0 (0 = all layers), got {self.train_layers}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not 1 <= self.steps <= 10_000:
            raise ConfigError(f"steps must be in [1, 10000], got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a positive number, got {self.beta}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens < 1 or self.max_completion_tokens < 1:
            raise ConfigError("max_prompt_tokens and max_completion_tokens must be >= 1")


def use_bf16(precision: str = "auto", device: str = "cpu") -> bool:
    """Whether to run under bf16 autocast: on request, or (``auto``) on CUDA devices and CPUs
    with native bf16 support. ``device`` is a device type: ``cpu`` or ``cuda``."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(precision: str = "auto", device: str = "cpu") -> Any:
    """bf16 autocast context for the ``device`` type (a no-op context when fp32)."""
    import torch

    return torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16(precision, device))


def lora_config_dict(base_name: str | None = None) -> dict[str, Any]:
    """The peft ``adapter_config.json`` of a policy adapter."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    return json.loads(json.dumps(cfg.to_dict(), default=sorted))


# ----------------------------------------------------------------------------- models
def resolve_base(base: Any = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, base_name)`` from None (embedded), a directory, or a pair."""
    from metarlhf.models import load_policy

    if base is None:
        model, tok = load_policy()
        return model, tok, DEFAULT_POLICY_NAME
    if isinstance(base, (str, os.PathLike)):
        model, tok = load_policy(base)
        return model, tok, model_name(base, DEFAULT_POLICY_NAME)
    if isinstance(base, tuple) and len(base) == 2:
        model, tok = base
        return model, tok, base_name_of(model)
    raise ConfigError(f"base must be None, a model directory or a (model, tokenizer) pair, got {type(base).__name__}")


def base_name_of(model: Any) -> str:
    """Name recorded for an already-loaded base model."""
    from metarlhf.models import cache_dir

    src = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not src:
        return "custom"
    try:
        if Path(src).resolve() == (cache_dir() / "smollm2-135m-instruct").resolve():
            return DEFAULT_POLICY_NAME
    except OSError:
        pass
    return model_name(src, DEFAULT_POLICY_NAME) if Path(src).is_dir() else src


def load_init(init: Any, base_name: str) -> Adapter | None:
    """Resolve ``init``: ``"meta"`` (shipped), ``None``/``"scratch"``, a path, or an Adapter."""
    if init is None or init == "scratch":
        return None
    if isinstance(init, Adapter):
        adapter = init
    else:
        path = DEFAULT_INIT_DIR if init == "meta" else Path(init)
        if init == "meta" and not (path / "metarlhf.json").is_file():
            raise AdapterError(
                f"no shipped policy init at {path}; run `metarlhf meta-train policy` or use init='scratch'"
            )
        adapter = load_adapter(path, expect_rank=LORA_R)
    kind = adapter.meta.get("kind")
    if kind not in ("policy_init", "policy"):
        raise AdapterError(f"init adapter is a {kind!r} adapter, expected 'policy_init' or 'policy'")
    if adapter.base_model is not None and adapter.base_model != base_name:
        raise AdapterError(
            f"init adapter was made for base model {adapter.base_model!r}, but the base is {base_name!r}"
        )
    return adapter


def check_init_shapes(init: Adapter, expected: dict[str, Any]) -> None:
    """Every tensor of ``init`` that the model has must have the model's shape (an
    ``AdapterError`` naming both shapes otherwise: the init was made for another base,
    e.g. one with another hidden size, even if its directory has the same name)."""
    for key, tensor in init.tensors.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterError(
                f"init adapter does not fit this base model: {key} has shape {tuple(tensor.shape)}, but the "
                f"model's is {tuple(expected[key].shape)} (the init was made for another base model)"
            )


@contextmanager
def lora_attached(model: Any, init: Adapter | None = None, seed: int = 0) -> Iterator[Any]:
    """Wrap ``model`` in a fresh peft LoRA (optionally loaded from ``init``); undo on exit.

    peft injects LoRA layers into ``model`` in place; on exit they are removed again
    (``unload()``, no merge) and every parameter's ``requires_grad`` and the train/eval
    mode are restored, so the caller's model is left as it was.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ModelError(f"cannot attach a LoRA to this model (needs {LORA_TARGETS} modules): {e}") from e
    try:
        if init is not None:
            check_init_shapes(init, get_peft_model_state_dict(peft_model))
            res = set_peft_model_state_dict(peft_model, init.tensors)
            unexpected = list(getattr(res, "unexpected_keys", []) or [])
            if unexpected:
                raise AdapterError(f"init adapter has tensors this model lacks: {unexpected[:3]} ...")
            lora_keys = {k for k in init.tensors if "lora_" in k}
            if not lora_keys:
                raise AdapterError("init adapter holds no LoRA tensors")
        yield peft_model
    finally:
        peft_model.unload()
        if hasattr(model, "peft_config"):
            try:
                del model.peft_config
            except AttributeError:
                pass
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        model.train(was_training)


def lora_state(peft_model: Any) -> dict[str, Any]:
    """The adapter's tensors under peft's saved key names (detached copies)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def trainable_params(peft_model: Any, start_layer: int = 0) -> list[Any]:
    """LoRA parameters that train: those of decoder layers ``>= start_layer``."""
    return [
        p for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" in n and layer_index(n) >= start_layer
    ]


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(name: str) -> int:
    """Decoder layer index in a parameter name (``...layers.12.self_attn...`` -> 12); -1 if none."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def decoder_of(model: Any) -> Any | None:
    """The module holding the decoder ``layers`` (Llama-style ``model.model``), or None."""
    import torch

    base = unwrap_model(model)
    dec = getattr(base, "model", None)
    if dec is not None and isinstance(getattr(dec, "layers", None), torch.nn.ModuleList) and hasattr(dec, "norm"):
        return dec
    return None


def start_layer_for(model: Any, train_layers: int) -> int:
    """First trained layer for ``train_layers`` (0 when all layers train or the model is not Llama-style)."""
    dec = decoder_of(model)
    if dec is None or train_layers <= 0 or train_layers >= len(dec.layers):
        return 0
    return len(dec.layers) - train_layers


@contextmanager
def layer_slice(model: Any, start: int, stop: int | None = None) -> Iterator[None]:
    """Run only decoder layers ``[start:stop]`` inside this context (the model is restored on exit)."""
    import torch

    dec = decoder_of(model)
    if dec is None:
        raise ModelError("this model has no Llama-style decoder layers to slice")
    full = dec.layers
    dec.layers = torch.nn.ModuleList(list(full)[start:stop])
    try:
        yield
    finally:
        dec.layers = full


def hidden_at(model: Any, batch: SeqBatch, layer: int, chunk: int = 16) -> Any:
    """Residual stream entering decoder layer ``layer`` (no grad): ``[n, T, d]``.

    Lower layers (with their LoRA at its current value) run once; training then starts
    from these states (:func:`sequence_logps` with ``hidden``).
    """
    import torch

    dec = decoder_of(model)
    got: list[Any] = []
    hook = dec.norm.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        with torch.no_grad(), layer_slice(model, 0, layer):
            for i in range(0, batch.input_ids.shape[0], chunk):
                sl = slice(i, i + chunk)
                model(input_ids=batch.input_ids[sl], attention_mask=batch.attention_mask[sl],
                      position_ids=batch.position_ids[sl], logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return torch.cat(got)


# ----------------------------------------------------------------------------- exploration
#: Style hints for exploration: a generic menu of common answer styles, one or two per
#: family of taste (length, format, tone, content, vocabulary). Chosen from the family
#: names only, not from any held-out user's reward function; no topic/theme hints.
STYLE_HINTS: tuple[str, ...] = (
    "Answer in one short sentence.",
    "Answer as a numbered list.",
    "Be enthusiastic and upbeat!",
    "Speak directly to the reader as \"you\".",
    "Answer as a bulleted list.",
    "Give a detailed, thorough answer.",
    "Use a formal tone.",
    "Be casual and friendly.",
    "Give a concrete example.",
    "End by asking me a question.",
    "Use simple, plain words.",
    "Say \"we\" and \"us\".",
)


#: Exploration protocols: ``plain`` (no hints), ``hints`` (a fixed seeded schedule over the
#: menu), ``adaptive`` (a Thompson-sampling bandit over the menu, :func:`explore_adaptive`).
EXPLORE_MODES: tuple[str, ...] = ("hints", "plain", "adaptive")

Arm = str | None  # a style hint, or None for the plain prompt


def hint_credit(hints: Sequence[Arm], labels: Sequence[int]) -> dict[Arm, tuple[int, int]]:
    """``{hint: (ups, downs)}`` over thumbs on samples drawn with each hint (None = plain)."""
    if len(hints) != len(labels):
        raise DataError(f"need one hint per label: {len(hints)} hints, {len(labels)} labels")
    out: dict[Arm, tuple[int, int]] = {}
    for h, y in zip(hints, labels, strict=True):
        u, d = out.get(h, (0, 0))
        out[h] = (u + int(y == 1), d + int(y != 1))
    return out


def posterior_up_rate(ups: int, downs: int) -> float:
    """Posterior mean up-rate of an arm under a Beta(1, 1) prior: ``(ups + 1) / (ups + downs + 2)``."""
    return (ups + 1) / (ups + downs + 2)


def thompson_arms(
    credit: dict[Arm, tuple[int, int]], arms: Sequence[Arm], n: int, rng: random.Random
) -> list[Arm]:
    """Thompson sampling: draw ``theta ~ Beta(1 + ups, 1 + downs)`` per arm, return the ``n`` best distinct arms."""
    if not 1 <= n <= len(arms):
        raise ConfigError(f"cannot pick {n} distinct arms out of {len(arms)}")
    draws = []
    for i, a in enumerate(arms):
        u, d = credit.get(a, (0, 0))
        draws.append((rng.betavariate(1 + u, 1 + d), -i, a))
    return [a for _, _, a in sorted(draws, key=lambda t: (t[0], t[1]), reverse=True)[:n]]


def liked_hints(credit: dict[Arm, tuple[int, int]], top: int = 1) -> list[str]:
    """Hints with positive net feedback (more ups than downs), best posterior up-rate first (at most ``top``)."""
    liked = [(posterior_up_rate(u, d), u, h) for h, (u, d) in credit.items() if h is not None and u > d]
    liked.sort(key=lambda t: (t[0], t[1], t[2]), reverse=True)
    return [h for _, _, h in liked[:top]]


def explore_adaptive(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    rate: Callable[[str, list[str]], list[Thumbs]],
    k: int,
    samples_per_prompt: int = 2,
    seed: int = 0,
    round_prompts: int = 2,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    precision: str = "auto",
) -> tuple[list[Thumbs], list[Arm]]:
    """Collect ``k`` thumbs in rounds, choosing the style hint of each sample by a bandit.

    Round 1 (``ceil(k / 2)`` samples) shows distinct hints of the menu in a seeded order
    (the spread). Every later round takes the next ``round_prompts`` prompts and, for each,
    ``samples_per_prompt`` distinct arms (the menu's hints and the plain prompt) by
    Thompson sampling on the up/down counts so far, so samples concentrate on the styles
    this user liked. ``rate(prompt, completions)`` is the user (real or simulated): thumbs
    on the plain prompt's answers, side by side. Prompts are used in order, each once.
    Returns the thumbs and the arm each was drawn with.
    """
    s = samples_per_prompt
    if k < 1 or s < 1 or round_prompts < 1:
        raise ConfigError("k, samples_per_prompt and round_prompts must be >= 1")
    n_prompts = math.ceil(k / s)
    if len(prompts) < n_prompts:
        raise DataError(f"adaptive exploration of K={k} needs {n_prompts} prompts, got {len(prompts)}")
    arms: list[Arm] = [*STYLE_HINTS, None]
    menu = list(STYLE_HINTS)
    random.Random(f"hints:{seed}").shuffle(menu)
    rng = random.Random(f"thompson:{seed}")
    first = min(n_prompts, max(1, math.ceil(k / 2 / s)))
    rounds = [list(range(first))] + [list(range(i, min(i + round_prompts, n_prompts)))
                                     for i in range(first, n_prompts, round_prompts)]
    thumbs: list[Thumbs] = []
    arms_used: list[Arm] = []
    for r, idx in enumerate(rounds):
        credit = hint_credit(arms_used, [t.label for t in thumbs])
        if r == 0:
            chosen = [menu[j % len(menu)] for j in range(len(idx) * s)]
        else:
            chosen = [a for _ in idx for a in thompson_arms(credit, arms, min(s, len(arms)), rng)]
        rep = [prompts[i] for i in idx for _ in range(s)]
        comps = generate(model, tok, rep, max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed * 7919 + r, precision=precision, hints=chosen)
        for j, i in enumerate(idx):
            got = rate(prompts[i], comps[j * s:(j + 1) * s])
            thumbs += got
            arms_used += chosen[j * s:(j + 1) * s]
    return thumbs[:k], arms_used[:k]


def distill_records(
    model: Any,
    tok: Any,
    records: Sequence[Record],
    hints: Sequence[Arm],
    n: int,
    top_hints: int = 1,
    seed: int = 0,
    scorer: Scorer | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
) -> tuple[list[Thumbs], list[str]]:
    """Stretch a few thumbs: ``n`` self-generated samples in the liked style, as extra thumbs up.

    The liked styles are the hints with positive net feedback among the user's thumbs
    (:func:`liked_hints` on :func:`hint_credit`). ``n`` samples are drawn from ``model``
    on the records' prompts with those hints appended, and returned as thumbs up on the
    *plain* prompt (the user never rated them: their label is the hint's credit). With
    ``scorer`` (the user's personalized reward model) ``2n`` are drawn and the ``n`` it
    ranks highest are kept. Returns ``(records, liked hints)``; no liked hint -> ``([], [])``.
    """
    if n < 0:
        raise ConfigError(f"distill samples must be >= 0, got {n}")
    thumbs = [r for r in records if isinstance(r, Thumbs)]
    tidx = [i for i, r in enumerate(records) if isinstance(r, Thumbs)]
    if len(hints) != len(records):
        raise DataError(f"need one hint (or None) per record: {len(hints)} hints, {len(records)} records")
    liked = liked_hints(hint_credit([hints[i] for i in tidx], [t.label for t in thumbs]), top_hints)
    if not n or not liked:
        return [], liked
    prompts = list(dict.fromkeys(t.prompt for t in thumbs))
    m = 2 * n if scorer is not None else n
    rep = [prompts[i % len(prompts)] for i in range(m)]
    hs = [liked[(i // len(prompts)) % len(liked)] for i in range(m)]
    comps = generate(model, tok, rep, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 104_729,
                     hints=hs)
    keep = [i for i in range(m) if comps[i]]
    if scorer is not None and keep:
        scores = [float(x) for x in scorer([rep[i] for i in keep], [comps[i] for i in keep])]
        keep = [i for _, i in sorted(zip(scores, keep, strict=True), key=lambda t: -t[0])[:n]]
    user = thumbs[0].user_id
    return [Thumbs(user, rep[i], comps[i], 1) for i in sorted(keep)], liked


def exploration_hints(n: int, explore: str = "hints", plain_every: int = 4, seed: int | None = 0) -> list[str | None]:
    """Hints for ``n`` exploration samples (None = plain prompt).

    ``"plain"``: all None. ``"hints"``: every ``plain_every``-th sample is plain (0: none
    is), the others cycle through :data:`STYLE_HINTS` in an order shuffled by ``seed``
    (None: the listed order), so K >= 12 hinted samples show every style once.
    """
    if explore not in ("hints", "plain"):
        raise ConfigError(f"explore must be 'hints' or 'plain', got {explore!r}")
    if plain_every < 0:
        raise ConfigError(f"plain_every must be >= 0, got {plain_every}")
    if explore == "plain":
        return [None] * n
    menu = list(STYLE_HINTS)
    if seed is not None:
        random.Random(f"hints:{seed}").shuffle(menu)
    out: list[str | None] = []
    k = 0
    for i in range(n):
        if plain_every and i % plain_every == plain_every - 1:
            out.append(None)
        else:
            out.append(menu[k % len(menu)])
            k += 1
    return out


# ----------------------------------------------------------------------------- tokens
def chat_prompt(tok: Any, prompt: str, hint: str | None = None) -> str:
    """The prompt in the model's chat format, ready for the assistant's answer.

    ``hint`` (exploration only, see :data:`STYLE_HINTS`) is appended to the user's
    message as ``"\n\n(<hint>)"``; training and serving always use the plain prompt.
    """
    if hint:
        prompt = f"{prompt}\n\n({hint})"
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return prompt + "\n"


@dataclass
class SeqBatch:
    """Left-padded prompt+completion sequences; completions end every row."""

    input_ids: Any  # [n, T]
    attention_mask: Any  # [n, T]
    position_ids: Any  # [n, T]
    comp_mask: Any  # [n, C] 1 where the last C positions are completion tokens
    comp_len: int  # C = longest completion (tokens)

    def to(self, device: Any) -> SeqBatch:
        """The same batch with its tensors on ``device``."""
        return SeqBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                        self.comp_mask.to(device), self.comp_len)


def encode_pairs(
    tok: Any, prompts: Sequence[str], completions: Sequence[str], max_prompt_tokens: int = 96,
    max_completion_tokens: int = 64, device: Any = None,
) -> SeqBatch:
    """Tokenize (prompt, completion) rows, left-padded, completion + EOS at the end
    (tensors on ``device``; default CPU)."""
    import torch

    if len(prompts) != len(completions) or not prompts:
        raise DataError("need one completion per prompt (and at least one row)")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows, clens = [], []
    for p, c in zip(prompts, completions, strict=True):
        p_ids = tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        c_ids = tok(c, add_special_tokens=False)["input_ids"][:max_completion_tokens] + [eos]
        rows.append(p_ids + c_ids)
        clens.append(len(c_ids))
    T = max(len(r) for r in rows)
    C = max(clens)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    comp = torch.zeros((len(rows), C), dtype=torch.float32)
    for i, (r, cl) in enumerate(zip(rows, clens, strict=True)):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
        comp[i, C - cl:] = 1.0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = SeqBatch(ids, mask, pos, comp, C)
    return batch if device is None else batch.to(device)


#: Rows per forward in :func:`_completion_logits`, :func:`_completion_logps` and
#: :func:`_packed_states`: the rows go by length, in groups of this many, each cut to its
#: own longest row (the batch is left-padded to the longest of all). On a 2-core CPU this
#: cut the padded tokens of a K=16 adaptation step by a third.
LENGTH_GROUP_ROWS = 4


def length_groups(mask: Any, min_len: int, size: int | None = None) -> list[tuple[Any, int]]:
    """Rows of a left-padded batch (``mask [n, T]``) by real length, in groups of up to
    ``size`` (default :data:`LENGTH_GROUP_ROWS`): ``[(row indices, columns)]``, ``columns``
    being the group's longest row (at least ``min_len``): its last ``columns`` columns hold
    every real token of the group."""
    import torch

    size = size or LENGTH_GROUP_ROWS
    lens = mask.sum(-1)
    order = torch.argsort(lens, stable=True)
    return [(order[i:i + size], max(int(lens[order[i:i + size]].max()), min_len))
            for i in range(0, len(order), size)]


#: Causal LMs whose logits are exactly ``lm_head(final hidden states)`` (no scaling or
#: soft-capping after the head; checked in transformers' modeling code): for these only the
#: completion tokens' log-probs are computed from the states (:func:`token_logprobs`).
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3"})


def plain_head(model: Any) -> Any | None:
    """The LM head weight ``[V, d]`` when the logits are ``hidden @ W.T`` (a bias-free
    ``nn.Linear`` head on a Llama-style decoder of :data:`PLAIN_HEAD_TYPES`), else None."""
    import torch

    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    plain = (getattr(getattr(base, "config", None), "model_type", None) in PLAIN_HEAD_TYPES
             and type(head) is torch.nn.Linear and head.bias is None and decoder_of(model) is not None)
    return head.weight if plain else None


def token_logprobs(h: Any, weight: Any, index: Any) -> Any:
    """``log softmax(h @ weight.T)`` at chosen vocabulary indices, with its own backward:
    ``h [N, d]``, ``weight [V, d]``, ``index [N, m]`` -> ``[N, m]`` (float32).

    Autograd over ``logsumexp`` and ``gather`` keeps the ``[N, V]`` logits and makes about
    ten vocab-sized passes (softmax, zero-filled scatters, the copies of slicing); here the
    forward keeps only the softmax, and the backward is one in-place pass and a matmul,
    ``dL/dz = g at index - softmax * sum(g)``. First order only (no double backward).
    """
    return _token_logprobs_fn().apply(h, weight, index)


@functools.cache
def _token_logprobs_fn() -> Any:
    """The ``torch.autograd.Function`` of :func:`token_logprobs` (built on first use, so
    that importing this module does not import torch)."""
    import torch
    import torch.nn.functional as F
    from torch.autograd.function import once_differentiable

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, h: Any, weight: Any, index: Any) -> Any:
            z = F.linear(h, weight)  # [N, V]; autocast may run the matmul in bf16
            ctx.mm_dtype, z = z.dtype, z.float()
            lse = torch.logsumexp(z, -1, keepdim=True)  # [N, 1]
            out = z.gather(-1, index) - lse  # [N, m]
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                ctx.save_for_backward(h, weight, index, z.sub_(lse).exp_())  # the softmax, in place
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad: Any) -> Any:
            h, weight, index, probs = ctx.saved_tensors
            dz = probs.mul_(-grad.sum(-1, keepdim=True)).scatter_add_(-1, index, grad)  # [N, V], in place
            dz = dz.to(ctx.mm_dtype)  # the backward matmuls in the forward's precision
            gh = (dz @ weight.to(ctx.mm_dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
            gw = (dz.T @ h.to(ctx.mm_dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
            return gh, gw, None

    return _Fn


def _select(batch: SeqBatch, rows: Any, hidden: Any, start: int) -> tuple[Any, Any, Any, Any, Any, str, bool]:
    """The rows' ``(ids, mask, positions, completion mask, model inputs, input kind, sliced)``."""
    ids, mask, pos, comp = batch.input_ids, batch.attention_mask, batch.position_ids, batch.comp_mask
    if rows is not None:
        ids, mask, pos, comp = ids[rows], mask[rows], pos[rows], comp[rows]
    sliced = hidden is not None and start > 0
    # from layer `start` on the states entering it, else from the token ids
    inputs, key = ((hidden if rows is None else hidden[rows]), "inputs_embeds") if sliced else (ids, "input_ids")
    return ids, mask, pos, comp, inputs, key, sliced


def _by_groups(run: Any, model: Any, ids: Any, mask: Any, pos: Any, inputs: Any, key: str, sliced: bool,
               start: int, C: int) -> Any:
    """``run(**model inputs)`` -> ``[g, C, ...]`` over the length groups (:func:`length_groups`),
    written into one ``[n, C, ...]`` tensor in the rows' order. A row attends only to its own
    tokens, so cutting a group's common padding changes no value beyond floating-point
    rounding, and saves its compute."""
    out = None
    with layer_slice(model, start) if sliced else nullcontext():
        for idx, cols in length_groups(mask, C + 1):
            g = slice(ids.shape[1] - cols, None)
            part = run(**{key: inputs[idx][:, g]}, attention_mask=mask[idx][:, g], position_ids=pos[idx][:, g],
                       use_cache=False)
            if out is None:
                out = part.new_empty((len(ids), *part.shape[1:]))
            out[idx] = part
    return out


def _completion_logits(
    model: Any, batch: SeqBatch, rows: Any = None, hidden: Any = None, start: int = 0,
) -> tuple[Any, Any, Any, Any]:
    """One forward pass over the completion positions of ``rows``: ``(logits [n, C, V],
    logsumexp [n, C], log-prob of each actual token [n, C], completion mask [n, C])``.
    See :func:`sequence_logps` for ``hidden`` / ``start``; the rows run in length groups
    (:func:`_by_groups`). For the full logits only (the reference's top-k, or a model
    without a :func:`plain_head`); log-probs alone come from :func:`_completion_logps`."""
    import torch

    ids, mask, pos, comp, inputs, key, sliced = _select(batch, rows, hidden, start)
    C = batch.comp_len

    def run(**kw: Any) -> Any:  # the logits predicting the last C tokens
        return model(**kw, logits_to_keep=C + 1).logits[:, :-1, :].float()

    logits = _by_groups(run, model, ids, mask, pos, inputs, key, sliced, start, C)
    targets = ids[:, -C:]  # [n, C]
    lse = torch.logsumexp(logits, -1)  # [n, C]
    logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - lse  # [n, C]
    return logits, lse, logp, comp


#: Rows of one batch with the same prompt run as one sequence (:func:`pack_prompts`) on the
#: :func:`plain_head` path. Exploration shows each prompt twice, so with K=16 thumbs this
#: cut the decoder's tokens per step by about a quarter.
PACK_PROMPTS = True
#: At most this many completions share one packed row (attention grows with its square).
PACK_MAX_COMPLETIONS = 4


@dataclass
class Packing:
    """Rows that share a prompt, packed into one left-padded sequence ``[prompt, completion
    1, completion 2, ...]``: each completion attends to the prompt and to itself only, and
    its positions continue from the prompt's end, so every state equals the unpacked row's
    (up to rounding) while the prompt runs once. ``m`` packed rows of ``L`` columns, from
    ``n`` rows of ``T``; pads attend to themselves only (no empty softmax)."""

    src: Any  # [m, L] flat index into the rows' [n * T] tokens: the token each column copies
    allowed: Any  # [m, L, L] bool: query column i may attend to key column j
    position_ids: Any  # [m, L]
    mask: Any  # [m, L] 1 on real tokens (for :func:`length_groups`)
    out: Any  # [n, C] flat index into the packed [m * L] states: the one predicting each position


def attn_implementation(model: Any) -> str | None:
    """The attention kernel transformers runs for ``model`` (``sdpa``, ``eager``, ...)."""
    base = unwrap_model(model)
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def packable(model: Any, length: int) -> bool:
    """Whether packed rows of ``length`` columns run as if unpacked: the model takes a custom
    4D attention mask (sdpa or eager attention; flash attention kernels ignore one) and has
    no sliding window shorter than ``length`` (a custom mask replaces the window's)."""
    base = unwrap_model(model)
    window = getattr(getattr(base, "config", None), "sliding_window", None)
    return attn_implementation(model) in ("sdpa", "eager") and (window is None or window >= length)


def pack_prompts(ids: Any, mask: Any, comp: Any) -> Packing | None:
    """:class:`Packing` of left-padded rows (``ids, mask [n, T]``, completion mask ``comp
    [n, C]``) by identical prompt tokens, up to :data:`PACK_MAX_COMPLETIONS` per packed row;
    None when no two rows share a prompt (or a row has no prompt tokens)."""
    import torch

    n, T = ids.shape
    C = comp.shape[1]
    lens, clens = mask.sum(-1).tolist(), comp.sum(-1).long().tolist()
    rows_of: dict[tuple[int, ...], list[int]] = {}
    id_rows = ids.tolist()
    for r in range(n):
        prompt = tuple(id_rows[r][T - lens[r]:T - clens[r]])
        if not prompt:
            return None
        rows_of.setdefault(prompt, []).append(r)
    if len(rows_of) == n:
        return None
    groups = [g[i:i + PACK_MAX_COMPLETIONS] for g in rows_of.values() for i in range(0, len(g), PACK_MAX_COMPLETIONS)]
    plens = [lens[g[0]] - clens[g[0]] for g in groups]
    L = max(p + sum(clens[r] for r in g) for p, g in zip(plens, groups, strict=True))
    m = len(groups)
    src = torch.zeros((m, L), dtype=torch.long)
    seg = torch.full((m, L), -1, dtype=torch.long)  # -1 pad, 0 prompt, s + 1 the s-th completion
    pos = torch.zeros((m, L), dtype=torch.long)
    out = torch.zeros((n, C), dtype=torch.long)
    for k, (p, g) in enumerate(zip(plens, groups, strict=True)):
        col = L - p - sum(clens[r] for r in g)  # first real column
        first = g[0] * T + T - lens[g[0]]  # the prompt, from the group's first row
        src[k, :col] = first
        src[k, col:col + p] = torch.arange(first, first + p)
        seg[k, col:col + p] = 0
        pos[k, col:col + p] = torch.arange(p)
        last = k * L + col + p - 1  # the prompt's last state predicts every first completion token
        col += p
        for s, r in enumerate(g):
            c = clens[r]
            src[k, col:col + c] = torch.arange(r * T + T - c, r * T + T)
            seg[k, col:col + c] = s + 1
            pos[k, col:col + c] = torch.arange(p, p + c)
            out[r, :] = last
            out[r, C - c + 1:] = torch.arange(k * L + col, k * L + col + c - 1)
            col += c
    query, key = seg.unsqueeze(2), seg.unsqueeze(1)  # [m, L, 1], [m, 1, L]: the segment of each column
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(L, dtype=torch.bool)  # pads see themselves
    dev = ids.device
    return Packing(src.to(dev), allowed.to(dev), pos.to(dev), (seg >= 0).long().to(dev), out.to(dev))


def _packed_states(model: Any, packing: Packing, inputs: Any, key: str, sliced: bool, start: int) -> Any:
    """The decoder's final states that predict each completion position of the rows, from
    their packed rows: ``[n, C, d]`` (the packed rows run in length groups too)."""
    import torch

    dec = decoder_of(model)
    x = inputs.flatten(0, 1)[packing.src]  # [m, L] ids or [m, L, d] states
    m, L = packing.src.shape
    allowed = packing.allowed.unsqueeze(1)  # [m, 1, L, L]; sdpa takes it as it is
    if attn_implementation(model) == "eager":  # eager adds its mask: 0, or the dtype's minimum
        dtype = next(dec.parameters()).dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    states = None
    with layer_slice(model, start) if sliced else nullcontext():
        for idx, cols in length_groups(packing.mask, 1):
            g = slice(L - cols, None)
            part = dec(**{key: x[idx][:, g]}, attention_mask=allowed[idx][:, :, g, g],
                       position_ids=packing.position_ids[idx][:, g], use_cache=False).last_hidden_state  # [b, cols, d]
            if states is None:
                states = part.new_zeros((m, L, part.shape[-1]))
            states[idx, g] = part
    return states.flatten(0, 1)[packing.out]


def _completion_logps(
    model: Any, batch: SeqBatch, rows: Any = None, hidden: Any = None, start: int = 0, extra: Any = None,
) -> tuple[Any, Any, Any]:
    """The log-prob of each completion token of ``rows`` ``[n, C]``, their completion mask
    ``[n, C]`` and, with ``extra`` (vocabulary indices ``[n, C, k]``), the log-probs at those
    indices ``[n, C, k]`` (else None), from one forward pass.

    With a :func:`plain_head` the decoder's final states go through :func:`token_logprobs`
    at the real completion positions only; otherwise from :func:`_completion_logits`."""
    import torch

    weight = plain_head(model)
    if weight is None:
        logits, lse, logp, comp = _completion_logits(model, batch, rows, hidden, start)
        return logp, comp, (None if extra is None else torch.gather(logits, -1, extra) - lse.unsqueeze(-1))
    ids, mask, pos, comp, inputs, key, sliced = _select(batch, rows, hidden, start)
    C = batch.comp_len
    dec = decoder_of(model)

    def run(**kw: Any) -> Any:  # the final states predicting the last C tokens
        return dec(**kw).last_hidden_state[:, -C - 1:-1]

    packing = pack_prompts(ids, mask, comp) if PACK_PROMPTS else None
    if packing is not None and not packable(model, packing.src.shape[1]):
        packing = None
    if packing is None:
        states = _by_groups(run, model, ids, mask, pos, inputs, key, sliced, start, C)  # [n, C, d]
    else:
        states = _packed_states(model, packing, inputs, key, sliced, start)  # [n, C, d]
    real = comp.bool()  # [n, C]
    index = ids[:, -C:].unsqueeze(-1)  # [n, C, 1]: each position's actual token
    if extra is not None:
        index = torch.cat([index, extra], -1)  # [n, C, 1 + k]
    lp = token_logprobs(states[real], weight, index[real])  # [N, 1 + k]
    full = lp.new_zeros((*real.shape, index.shape[-1])).index_put((real,), lp)  # [n, C, 1 + k]
    return full[..., 0], comp, (full[..., 1:] if extra is not None else None)


def token_logps(model: Any, batch: SeqBatch, chunk: int) -> Any:
    """Log-prob of every completion position's token, ``chunk`` rows per pass: ``[n, C]``
    (positions outside ``batch.comp_mask`` hold no meaningful value)."""
    import torch

    n = batch.input_ids.shape[0]
    return torch.cat([_completion_logps(model, batch, torch.arange(i, min(i + chunk, n)))[0]
                      for i in range(0, n, chunk)])


def sequence_logps(
    model: Any, batch: SeqBatch, rows: Any = None, hidden: Any = None, start: int = 0, ref_top: Any = None,
) -> Any:
    """Summed log-prob of each row's completion tokens: ``[n]``.

    Only the completion positions go through the LM head (:func:`_completion_logps`).
    With ``hidden`` (``[n, T, d]`` from :func:`hidden_at` at layer ``start``) only the
    layers from ``start`` up run. With ``ref_top`` (the selected rows' ``(indices,
    logprobs)`` from :func:`reference_topk`) it returns ``(logps [n], kl [n])``, ``kl``
    being :func:`topk_kl` averaged over each row's completion tokens, from the same pass.
    """
    idx, ref_lp = ref_top if ref_top is not None else (None, None)  # [n, C, k] each
    logp, comp, pol_lp = _completion_logps(model, batch, rows, hidden, start, idx)
    seq = (logp * comp).sum(-1)  # [n]
    if ref_top is None:
        return seq
    kl = topk_kl(ref_lp, pol_lp)  # [n, C]
    return seq, (kl * comp).sum(-1) / comp.sum(-1).clamp(min=1)


def topk_kl(ref_lp: Any, pol_lp: Any) -> Any:
    """KL(reference || policy) per position over the reference's top-k tokens plus one
    bucket holding the rest of the vocabulary (a true KL of the coarsened distributions:
    >= 0, and 0 when the policy matches the reference on them; exact when k = vocab).
    ``ref_lp``, ``pol_lp``: ``[..., k]`` log-probs of the same tokens. -> ``[...]``."""
    import torch

    def with_rest(lp: Any) -> Any:
        x = torch.logsumexp(lp, -1).clamp(max=-1e-7)  # log of the top-k mass (< 0)
        # log(1 - e^x), stable at both ends ("log1mexp"): expm1 near 0, log1p further out
        rest = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
        return torch.cat([lp, rest.unsqueeze(-1)], -1)

    r, p = with_rest(ref_lp), with_rest(pol_lp)
    return (r.exp() * (r - p)).sum(-1)


# ----------------------------------------------------------------------------- training
@dataclass
class Prepared:
    """A user's feedback as tensors: KTO rows and DPO rows (chosen, rejected)."""

    kto: SeqBatch | None
    kto_labels: Any  # [n_kto]
    kto_ref: Any  # [n_kto]
    dpo_c: SeqBatch | None
    dpo_r: SeqBatch | None
    dpo_ref_c: Any
    dpo_ref_r: Any
    kto_pairs: Any = None  # [m, 2] (up row, down row) of thumbs on the same prompt
    start: int = 0  # first trained decoder layer; > 0: the *_h fields hold the states entering it
    kto_h: Any = None  # [n_kto, T, d]
    dpo_c_h: Any = None
    dpo_r_h: Any = None
    kto_top: Any = None  # (indices, logprobs) [n_kto, C, k] of the reference (kl_weight > 0)
    dpo_c_top: Any = None
    dpo_r_top: Any = None
    ctx: SeqBatch | None = None  # prompt contrast: each thumbs-up answer after another support prompt
    ctx_ref: Any = None  # [n_ctx] reference log-probs of ctx
    ctx_h: Any = None  # [n_ctx, T, d]
    ctx_of: Any = None  # [n_kto] thumbs row -> ctx row (-1: not an up row)

    @property
    def n_kto(self) -> int:
        return 0 if self.kto is None else int(self.kto.input_ids.shape[0])

    @property
    def n_dpo(self) -> int:
        return 0 if self.dpo_c is None else int(self.dpo_c.input_ids.shape[0])


def check_records(records: Sequence[Record]) -> None:
    if not records:
        raise DataError("no feedback records to adapt on")
    for r in records:
        if not isinstance(r, (Thumbs, Pair)):
            raise DataError(f"expected Thumbs or Pair records, got {type(r).__name__}")
        if isinstance(r, Thumbs) and r.label not in (0, 1):
            raise DataError(f"thumbs label must be 0 or 1, got {r.label!r}")




def reference_pass(peft_model: Any, batch: SeqBatch, chunk: int = 16, precision: str = "auto",
                   topk: int = 0) -> tuple[Any, Any]:
    """The reference policy (the same model with the adapter disabled), one pass per chunk:
    the completions' summed log-probs ``[n]`` and, with ``topk > 0``, the top-``topk``
    next-token ``(indices, logprobs)`` ``[n, C, k]`` at every completion position (for
    :func:`topk_kl`; else None)."""
    import torch

    n = batch.input_ids.shape[0]
    seqs, idx, lps = [], [], []
    with torch.no_grad(), peft_model.disable_adapter(), autocast(precision, model_device(peft_model).type):
        for i in range(0, n, chunk):
            rows = torch.arange(i, min(i + chunk, n))
            if topk:  # the top-k needs every logit
                logits, lse, logp, comp = _completion_logits(peft_model, batch, rows)
                top = torch.topk(logits, min(topk, logits.shape[-1]), dim=-1)
                idx.append(top.indices)
                lps.append(top.values - lse.unsqueeze(-1))
            else:
                logp, comp, _ = _completion_logps(peft_model, batch, rows)
            seqs.append((logp * comp).sum(-1))
    return torch.cat(seqs), ((torch.cat(idx), torch.cat(lps)) if topk else None)


def reference_logps(peft_model: Any, batch: SeqBatch, chunk: int = 16, precision: str = "auto") -> Any:
    """Log-probs under the reference policy: the same model with the adapter disabled."""
    return reference_pass(peft_model, batch, chunk, precision)[0]


def reference_topk(peft_model: Any, batch: SeqBatch, k: int, chunk: int = 16,
                   precision: str = "auto") -> tuple[Any, Any]:
    """The reference policy's top-``k`` next-token log-probs at every completion position:
    ``(indices [n, C, k], logprobs [n, C, k])`` (adapter disabled; for :func:`topk_kl`)."""
    return reference_pass(peft_model, batch, chunk, precision, k)[1]


def prepare(
    peft_model: Any,
    tok: Any,
    records: Sequence[Record],
    cfg: AdaptConfig,
    ref_cache: dict[tuple[str, str], float] | None = None,
) -> Prepared:
    """Tokenize a user's records and compute their reference log-probs once.

    ``ref_cache`` maps ``(prompt, completion)`` to a known reference log-prob (meta-training
    computes the whole pool once); missing entries are computed and added.
    """
    import torch

    check_records(records)
    dev = model_device(peft_model)
    enc = {"max_prompt_tokens": cfg.max_prompt_tokens, "max_completion_tokens": cfg.max_completion_tokens,
           "device": dev}

    topk = cfg.kl_topk if cfg.kl_weight else 0  # the KL anchor's reference top-k, from the same pass

    def refs(batch: SeqBatch, prompts: list[str], comps: list[str]) -> tuple[Any, Any]:
        keys = list(zip(prompts, comps, strict=True))
        cached = ref_cache is not None and all(key in ref_cache for key in keys)
        if cached and not topk:
            return torch.tensor([ref_cache[key] for key in keys], device=dev), None
        out, top = reference_pass(peft_model, batch, cfg.batch_size, cfg.precision, topk)
        if cached:  # keep the cached values (computed in other batches: padding may differ)
            out = torch.tensor([ref_cache[key] for key in keys], device=dev)
        elif ref_cache is not None:
            ref_cache.update(zip(keys, out.tolist(), strict=True))  # one device-to-host copy
        return out, top

    thumbs = [r for r in records if isinstance(r, Thumbs)]
    pairs = [r for r in records if isinstance(r, Pair)]
    kto = labels = kto_ref = dpo_c = dpo_r = ref_c = ref_r = kto_top = dpo_c_top = dpo_r_top = None
    if thumbs:
        ps, cs = [r.prompt for r in thumbs], [r.completion for r in thumbs]
        kto = encode_pairs(tok, ps, cs, **enc)
        labels = torch.tensor([r.label for r in thumbs], dtype=torch.long, device=dev)
        kto_ref, kto_top = refs(kto, ps, cs)
    if pairs:
        ps = [r.prompt for r in pairs]
        dpo_c = encode_pairs(tok, ps, [r.chosen for r in pairs], **enc)
        dpo_r = encode_pairs(tok, ps, [r.rejected for r in pairs], **enc)
        ref_c, dpo_c_top = refs(dpo_c, ps, [r.chosen for r in pairs])
        ref_r, dpo_r_top = refs(dpo_r, ps, [r.rejected for r in pairs])
    data = Prepared(kto, labels, kto_ref, dpo_c, dpo_r, ref_c, ref_r,
                    kto_top=kto_top, dpo_c_top=dpo_c_top, dpo_r_top=dpo_r_top)
    if thumbs:
        data.kto_pairs = thumb_pairs([r.prompt for r in thumbs], [r.label for r in thumbs])
        other = contrast_prompts([r.prompt for r in thumbs]) if cfg.contrast_weight else {}
        ups = [i for i, r in enumerate(thumbs) if r.label == 1 and r.prompt in other]
        if ups:
            ps, cs = [other[thumbs[i].prompt] for i in ups], [thumbs[i].completion for i in ups]
            data.ctx = encode_pairs(tok, ps, cs, **enc)
            data.ctx_ref = reference_logps(peft_model, data.ctx, cfg.batch_size, cfg.precision)
            data.ctx_of = torch.full((len(thumbs),), -1, dtype=torch.long, device=dev)
            data.ctx_of[ups] = torch.arange(len(ups), device=dev)
    data.start = start_layer_for(peft_model, cfg.train_layers)
    if data.start:
        with autocast(cfg.precision, dev.type):
            if kto is not None:
                data.kto_h = hidden_at(peft_model, kto, data.start, cfg.batch_size)
            if data.ctx is not None:
                data.ctx_h = hidden_at(peft_model, data.ctx, data.start, cfg.batch_size)
            if dpo_c is not None:
                data.dpo_c_h = hidden_at(peft_model, dpo_c, data.start, cfg.batch_size)
                data.dpo_r_h = hidden_at(peft_model, dpo_r, data.start, cfg.batch_size)
    return data


def thumb_pairs(prompts: Sequence[str], labels: Sequence[int]) -> Any:
    """``[m, 2]`` row indices (up, down) of every up/down combination on the same prompt."""
    import torch

    out = [
        (i, j) for i in range(len(prompts)) for j in range(len(prompts))
        if labels[i] == 1 and labels[j] == 0 and prompts[i] == prompts[j]
    ]
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def contrast_prompts(prompts: Sequence[str]) -> dict[str, str]:
    """For the prompt contrast: each distinct prompt -> the next distinct one (cyclically, in
    order of first appearance); empty when there is only one."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        return {}
    return {p: distinct[(i + 1) % len(distinct)] for i, p in enumerate(distinct)}


def sft_loss(logps: Any, n_tokens: Any) -> Any:
    """Mean per-token negative log-likelihood ``mean(-logps / n_tokens)``; inputs ``[n]``."""
    return (-logps / n_tokens.clamp(min=1)).mean()


def feedback_loss(
    model: Any, data: Prepared, cfg: AdaptConfig, kto_rows: Any = None, dpo_rows: Any = None
) -> Any:
    """KTO on thumbs + DPO on pairs (+ the SFT and KL-anchor terms), averaged weighted by
    the number of rows used."""
    import torch

    def logps(batch: SeqBatch, rows: Any, hidden: Any, top: Any) -> tuple[Any, Any]:
        if not cfg.kl_weight or top is None:
            return sequence_logps(model, batch, rows, hidden, data.start), 0.0
        lp, kl = sequence_logps(model, batch, rows, hidden, data.start, ref_top=(top[0][rows], top[1][rows]))
        return lp, cfg.kl_weight * kl.mean()

    if kto_rows is None and data.n_kto:
        kto_rows = torch.arange(data.n_kto)
    if dpo_rows is None and data.n_dpo:
        dpo_rows = torch.arange(data.n_dpo)
    total, n, feedback_terms = 0.0, 0, 0
    if data.n_kto and len(kto_rows):
        pol, loss = logps(data.kto, kto_rows, data.kto_h, data.kto_top)  # [b]; the KL anchor term
        labels = data.kto_labels[kto_rows]  # [b]
        if cfg.kto_weight:
            feedback_terms += 1
            kto, _ = kto_loss(pol, data.kto_ref[kto_rows], labels, cfg.beta, cfg.desirable_weight,
                              cfg.undesirable_weight)
            loss = loss + cfg.kto_weight * kto
        up = labels == 1
        if cfg.sft_weight and bool(up.any()):
            feedback_terms += 1
            ntok = data.kto.comp_mask[kto_rows].sum(-1)  # [b]
            loss = loss + cfg.sft_weight * sft_loss(pol[up], ntok[up])
        if cfg.pair_weight and data.kto_pairs is not None and len(data.kto_pairs):
            where = {int(r): i for i, r in enumerate(kto_rows)}  # row -> position in this batch
            pairs = [(where[int(a)], where[int(b)]) for a, b in data.kto_pairs if int(a) in where and int(b) in where]
            if pairs:
                feedback_terms += 1
                ia, ib = torch.tensor(pairs, device=pol.device).T
                ref = data.kto_ref[kto_rows]
                loss = loss + cfg.pair_weight * dpo_loss(pol[ia], pol[ib], ref[ia], ref[ib], cfg.beta)
        if cfg.contrast_weight and data.ctx is not None:
            ctx_rows = data.ctx_of[kto_rows]  # [b]; -1 where the row is not a thumbs up
            has = ctx_rows >= 0
            if bool(has.any()):
                feedback_terms += 1
                other = sequence_logps(model, data.ctx, ctx_rows[has], data.ctx_h, data.start)
                loss = loss + cfg.contrast_weight * dpo_loss(pol[has], other, data.kto_ref[kto_rows][has],
                                                             data.ctx_ref[ctx_rows[has]], cfg.beta)
        total, n = total + loss * len(kto_rows), n + len(kto_rows)
    if data.n_dpo and len(dpo_rows):
        pc, kl_c = logps(data.dpo_c, dpo_rows, data.dpo_c_h, data.dpo_c_top)
        pr, kl_r = logps(data.dpo_r, dpo_rows, data.dpo_r_h, data.dpo_r_top)
        loss = dpo_loss(pc, pr, data.dpo_ref_c[dpo_rows], data.dpo_ref_r[dpo_rows], cfg.beta) + (kl_c + kl_r) / 2
        feedback_terms += 1
        if cfg.sft_weight:
            loss = loss + cfg.sft_weight * sft_loss(pc, data.dpo_c.comp_mask[dpo_rows].sum(-1))
        total, n = total + loss * len(dpo_rows), n + len(dpo_rows)
    if n == 0:
        raise DataError("empty training batch")
    if not feedback_terms:  # only the anchor applies (e.g. all thumbs down, no pairs): no step, as without it
        return 0.0
    return total / n


def _sample_rows(data: Prepared, batch_size: int, rng: random.Random) -> tuple[Any, Any]:
    import torch

    n_k, n_d = data.n_kto, data.n_dpo
    if n_k + n_d <= batch_size:
        return torch.arange(n_k), torch.arange(n_d)
    picked = rng.sample(range(n_k + n_d), batch_size)
    return (
        torch.tensor(sorted(i for i in picked if i < n_k), dtype=torch.long),
        torch.tensor(sorted(i - n_k for i in picked if i >= n_k), dtype=torch.long),
    )


def train_steps(peft_model: Any, data: Prepared, cfg: AdaptConfig, steps: int, rng: random.Random,
                should_stop: Callable[[], bool] | None = None) -> list[float]:
    """``steps`` Adam steps on the LoRA parameters; returns the loss of each step.
    ``should_stop`` is asked before every step: when it says so, :class:`Cancelled`."""
    import torch

    params = trainable_params(peft_model, data.start)
    if not params:
        raise ModelError("the model has no trainable LoRA parameters")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    device = model_device(peft_model).type
    losses = []
    for i in range(steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"adaptation cancelled after {i} of {steps} steps")
        kto_rows, dpo_rows = _sample_rows(data, cfg.batch_size, rng)
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.precision, device):
            loss = feedback_loss(peft_model, data, cfg, kto_rows, dpo_rows)
        if not (torch.is_tensor(loss) and loss.requires_grad):  # no term applies (e.g. SFT only, no ups)
            losses.append(float(loss))
            continue
        if not torch.isfinite(loss):
            raise ModelError(f"non-finite loss {float(loss)} during adaptation; lower the lr")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------- generation
def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_tokens: int = 96,
    precision: str = "auto",
    hints: Sequence[str | None] | None = None,
) -> list[str]:
    """One sampled completion per prompt (``temperature=0`` is greedy), left-padded batches.

    Each batch reseeds torch from ``seed`` and its index, so the same model and prompts
    always give the same completions. ``hints`` (one per prompt, None = plain) are style
    hints added to the user's message (:func:`chat_prompt`), for exploration.
    """
    import torch

    if hints is not None and len(hints) != len(prompts):
        raise ConfigError(f"need one hint (or None) per prompt: {len(hints)} hints, {len(prompts)} prompts")
    hints = list(hints) if hints is not None else [None] * len(prompts)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = model_device(model)
    outs: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        rows = [
            tok(chat_prompt(tok, p, h), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
            for p, h in zip(prompts[start:start + batch_size], hints[start:start + batch_size], strict=True)
        ]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        torch.manual_seed(seed * 1_000_003 + b)
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        with torch.no_grad(), autocast(precision, dev.type):
            gen = model.generate(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens, pad_token_id=pad,
                eos_token_id=tok.eos_token_id, **kwargs,
            )
        outs += tok.batch_decode(gen[:, T:].cpu(), skip_special_tokens=True)
    return [o.strip() for o in outs]


def best_of_n(
    model: Any, tok: Any, prompts: Sequence[str], scorer: Scorer, n: int = 4, **gen_kwargs: Any
) -> list[str]:
    """Sample ``n`` completions per prompt and keep the one ``scorer`` ranks highest."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    rep = [p for p in prompts for _ in range(n)]
    comps = generate(model, tok, rep, **gen_kwargs)
    scores = [float(s) for s in scorer(rep, comps)]
    return [
        comps[i * n + max(range(n), key=lambda j, i=i: scores[i * n + j])] for i in range(len(prompts))
    ]


def answer_logps(peft_model: Any, tok: Any, prompts: Sequence[str], completions: Sequence[str],
                 chunk: int = 8) -> tuple[Any, Any, Any]:
    """``(log pi(y|x), log pi_base(y|x), tokens)`` per answer, summed over its tokens (EOS
    included): ``peft_model`` with its adapter, then with the adapter disabled (the reference of
    training). ``[n]`` float tensors."""
    import torch

    from metarlhf.runtime import model_device

    batch = encode_pairs(tok, list(prompts), list(completions), device=model_device(peft_model))
    mask = batch.comp_mask.float()
    with torch.no_grad():
        personal = (token_logps(peft_model, batch, chunk).float() * mask).sum(-1)
        with peft_model.disable_adapter():
            base = (token_logps(peft_model, batch, chunk).float() * mask).sum(-1)
    return personal, base, mask.sum(-1)


def implicit_scorer(peft_model: Any, tok: Any, chunk: int = 8) -> Scorer:
    """The attached user adapter as its own reward model: ``scorer(prompts, completions)`` gives
    ``log pi(y|x) - log pi_base(y|x)`` for each answer (:func:`answer_logps`).

    That log-ratio is what the KTO and DPO losses train (DPO's implicit reward, up to ``beta``),
    so it ranks answers by how far the user's adapter moved towards them; no reward model is
    needed. ``peft_model`` is the adapter-attached model (:func:`adapter_attached`). Two forward
    passes per answer.
    """
    def scorer(prompts: list[str], completions: list[str]) -> list[float]:
        personal, base, _ = answer_logps(peft_model, tok, prompts, completions, chunk)
        return (personal - base).tolist()

    return scorer


def augment_with_scorer(
    model: Any, tok: Any, records: Sequence[Record], scorer: Scorer, n: int, seed: int = 0,
    max_new_tokens: int = 48, explore: str = "plain",
) -> list[Thumbs]:
    """On-policy augmentation: ``n`` samples per support prompt, top half up by ``scorer``.

    ``explore="hints"`` draws the samples with style hints (:func:`exploration_hints`);
    the records keep the plain prompt either way.
    """
    if n < 2:
        raise ConfigError(f"augment_samples must be >= 2, got {n}")
    prompts = sorted({r.prompt for r in records})
    user = records[0].user_id
    rep = [p for p in prompts for _ in range(n)]
    comps = generate(model, tok, rep, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + 7919,
                     hints=exploration_hints(len(rep), explore, seed=seed + 1))
    scores = [float(s) for s in scorer(rep, comps)]
    out = []
    for i, p in enumerate(prompts):
        group = list(range(i * n, (i + 1) * n))
        ranked = sorted(group, key=lambda j: scores[j], reverse=True)
        for rank, j in enumerate(ranked):
            out.append(Thumbs(user, p, comps[j], int(rank < n // 2)))
    return out


# ----------------------------------------------------------------------------- adaptation
def adapt_policy(
    records: Sequence[Record],
    base: Any = None,
    init: Any = "meta",
    steps: int | None = None,
    seed: int = 0,
    config: AdaptConfig | None = None,
    scorer: Scorer | None = None,
    augment_samples: int = 0,
    augment_explore: str = "plain",
    hints: Sequence[str | None] | None = None,
    distill_scorer: Scorer | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Adapter:
    """Fit one user's policy LoRA on their thumbs (KTO) and/or pairs (DPO).

    ``base``: None (embedded SmolLM2), a model directory, or a loaded ``(model, tokenizer)``
    pair, which is left unmodified. ``init``: ``"meta"`` (the shipped init), ``None`` or
    ``"scratch"`` (peft's default LoRA init), an adapter directory, or an :class:`Adapter`.
    ``hints``: the style hint each record's sample was drawn with (None = plain), from
    exploration; with ``config.distill_samples > 0`` they select the liked style for
    :func:`distill_records` (ranked by ``distill_scorer`` when given). Without hints no
    extra samples are drawn. ``should_stop``: asked before every step; when it says so, the
    adaptation stops with :class:`~metarlhf.errors.Cancelled` (a server shutting down).
    Returns a ``kind="policy"`` adapter (not yet saved).
    """
    import torch

    check_records(records)
    cfg = config or AdaptConfig()
    if steps is not None:
        cfg = AdaptConfig(**{**asdict(cfg), "steps": steps})
    users = {r.user_id for r in records}
    if len(users) > 1:
        raise DataError(f"records of one user expected, got {len(users)} users")
    t0 = time.perf_counter()
    model, tok, base_name = resolve_base(base)
    init_adapter = load_init(init, base_name)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with lora_attached(model, init_adapter, seed) as pm:
        recs = list(records)
        if scorer is not None and augment_samples:
            recs += augment_with_scorer(pm, tok, recs, scorer, augment_samples, seed, explore=augment_explore)
        liked: list[str] = []
        distill_s, n_distilled = 0.0, 0
        if cfg.distill_samples and hints is not None:
            td = time.perf_counter()
            extra, liked = distill_records(pm, tok, records, hints, cfg.distill_samples, cfg.distill_hints, seed,
                                           distill_scorer, max_new_tokens=cfg.max_completion_tokens)
            recs += extra
            n_distilled = len(extra)
            distill_s = time.perf_counter() - td
        data = prepare(pm, tok, recs, cfg)
        losses = train_steps(pm, data, cfg, cfg.steps, rng, should_stop)
        tensors = lora_state(pm)
    init_name = (
        "scratch" if init_adapter is None else ("meta" if init == "meta" else str(init_adapter.meta.get("sha256")))
    )
    meta = {
        "kind": "policy",
        "base_model": base_name,
        "init": init_name,
        "init_sha256": None if init_adapter is None else init_adapter.meta.get("sha256"),
        **init_lineage(None if init_adapter is None else init_adapter.meta),
        "user_id": next(iter(users)),
        # the prompts it was fitted on: an adapter used as an init (a neighbour's) passes them
        # on through init_lineage, so an evaluation can tell they are not held out
        "prompt_digests": prompt_digests(r.prompt for r in records),
        "k": len(records),
        "n_thumbs": sum(isinstance(r, Thumbs) for r in records),
        "n_pairs": sum(isinstance(r, Pair) for r in records),
        "n_augmented": len(recs) - len(records),
        "n_distilled": n_distilled,
        "distill_hints": liked,
        "distill_ranked": distill_scorer is not None and bool(liked),
        "distill_s": round(distill_s, 3),
        "steps": cfg.steps,
        "losses": losses,
        "seed": seed,
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    return Adapter(tensors=tensors, config=lora_config_dict(base_name), meta=meta)


def init_lineage(init_meta: dict[str, Any] | None) -> dict[str, Any]:
    """What an adapter inherits from its init's training, for held-out checks
    (:func:`metarlhf.evaluate_policy.init_overlap`): ``init_train_users``, every user the
    init (and the inits before it) was trained on, and ``init_prompt_digests``, their
    meta-training prompts (None where no init in the chain records them)."""
    if init_meta is None:
        return {"init_train_users": [], "init_prompt_digests": None}
    def lists(*keys: str) -> list[list[Any]]:  # the fields that are lists (metadata is not trusted)
        return [v for v in (init_meta.get(k) for k in keys) if isinstance(v, list)]

    users = {str(u) for v in lists("train_users", "init_train_users") for u in v}
    if init_meta.get("kind") == "policy" and init_meta.get("user_id"):
        users.add(str(init_meta["user_id"]))
    digests = lists("prompt_digests", "init_prompt_digests")
    return {"init_train_users": sorted(users),
            "init_prompt_digests": sorted({str(x) for v in digests for x in v}) if digests else None}


@contextmanager
def adapter_attached(model: Any, adapter: Adapter | None) -> Iterator[Any]:
    """``model`` with ``adapter``'s LoRA attached (or ``model`` itself for None), for generation."""
    if adapter is None:
        yield model
        return
    with lora_attached(model, adapter) as pm:
        pm.eval()
        yield pm


# ----------------------------------------------------------------------------- meta-training
#: First-order policy meta-learners (see :class:`MetaConfig`).
META_ALGOS: tuple[str, ...] = ("reptile", "fomaml", "subspace")


@dataclass
class MetaConfig:
    """Hyper-parameters of first-order meta-training of the policy LoRA init.

    ``algo``: ``reptile`` and ``fomaml`` move the whole LoRA (A and B) by first-order
    meta-gradients. ``subspace`` adapts a *fresh* LoRA to one task per meta-step (the
    users in turn) and, at the end, sets each module's A to the top-r right singular
    vectors of the tasks' stacked updates ``B A`` (the input directions users' styles
    moved) with B = 0, so the init is the base model exactly and a new user's first
    steps move along those directions (:func:`task_subspace`).
    """

    algo: str = "reptile"  # reptile | fomaml | subspace
    meta_steps: int = 40
    inner_steps: int = 4  # Adam steps per task (the adaptation procedure, shortened)
    support_prompts: int = 4  # prompts per support set (x samples_per_prompt thumbs)
    query_prompts: int = 4  # prompts per query set (fomaml)
    samples_per_prompt: int = 2  # base samples per prompt in the pool
    pool_prompts: int = 64  # prompts whose base samples form the pool
    max_new_tokens: int = 48
    sample_temperature: float = 1.0
    reptile_eps: float = 0.1  # reptile: theta += eps * (phi - theta)
    outer_lr: float = 1e-3  # fomaml: outer Adam lr
    label_noise: float = 0.0
    checkpoint_every: int = 5
    seed: int = 0
    explore: str = "plain"  # pool samples: "plain" or "hints" (style hints, as in evaluation)
    # subspace: the A each task starts from. "shared": peft's seeded draw, the same for every
    # task (the shipped init); the SVD then leans towards that draw's row space. "per-task":
    # a fresh draw per task, so only directions the tasks share stand out.
    task_a: str = "shared"

    def __post_init__(self) -> None:
        if self.algo not in META_ALGOS:
            raise ConfigError(f"algo must be one of {', '.join(map(repr, META_ALGOS))}, got {self.algo!r}")
        for name in ("meta_steps", "inner_steps", "support_prompts", "query_prompts", "pool_prompts",
                     "max_new_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 (thumbs are relative), got {self.samples_per_prompt}")
        if self.support_prompts + self.query_prompts > self.pool_prompts:
            raise ConfigError("support_prompts + query_prompts must not exceed pool_prompts")
        if not 0 < self.reptile_eps <= 1:
            raise ConfigError(f"reptile_eps must be in (0, 1], got {self.reptile_eps}")
        for name in ("outer_lr", "sample_temperature"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if not 0 <= self.label_noise <= 0.5:
            raise ConfigError(f"label_noise must be in [0, 0.5], got {self.label_noise}")
        if self.task_a not in ("shared", "per-task"):
            raise ConfigError(f"task_a must be 'shared' or 'per-task', got {self.task_a!r}")
        if self.task_a != "shared" and self.algo != "subspace":
            raise ConfigError(f"task_a={self.task_a!r} applies to algo 'subspace' only, not {self.algo!r}")
        if self.explore not in ("hints", "plain"):
            raise ConfigError(f"explore must be 'hints' or 'plain', got {self.explore!r}")


#: Settings a resumed run must share with its checkpoint (``meta_steps`` and
#: ``checkpoint_every`` may change).
RESUME_FIXED: tuple[str, ...] = ("task_a", "seed", "inner_steps", "support_prompts", "query_prompts",
                                 "samples_per_prompt", "pool_prompts", "explore", "max_new_tokens", "label_noise")


def reptile_update(theta: Sequence[Any], phi: Sequence[Any], eps: float) -> list[Any]:
    """Reptile meta-update ``theta + eps * (phi - theta)`` (pure)."""
    return [t + eps * (p - t) for t, p in zip(theta, phi, strict=True)]


def task_subspace(deltas: Sequence[Any], rank: int, row_norm: float, seed: int = 0) -> tuple[Any, float]:
    """LoRA A from task updates: the top-``rank`` right singular vectors of the stacked
    ``deltas`` (each a module's ``B A`` [out, in] after one task), each row
    scaled to ``row_norm``. Returns ``(A [rank, in], energy)``, ``energy`` being the share
    of the stack's squared Frobenius norm that the rank-``rank`` subspace holds. Tasks are
    not re-weighted: a task that moved the module further counts more. Pure (``seed``
    completes the basis when the stack has fewer rows than ``rank``).
    """
    import torch

    if not deltas:
        raise DataError("no task updates to take a subspace of")
    stack = torch.cat([d.float() for d in deltas])  # [n_tasks * out, in]
    if rank > stack.shape[1]:
        raise ConfigError(f"rank {rank} exceeds the input size {stack.shape[1]}")
    _, s, vt = torch.linalg.svd(stack, full_matrices=False)
    total = float((s ** 2).sum())
    energy = float((s[:rank] ** 2).sum()) / total if total > 0 else 0.0
    basis = vt[:rank]
    if basis.shape[0] < rank:  # fewer stacked rows than the rank: complete with an orthonormal basis
        extra = torch.randn(rank - basis.shape[0], stack.shape[1], generator=torch.Generator().manual_seed(seed))
        q, _ = torch.linalg.qr(torch.cat([basis, extra]).T)
        basis = q.T[:rank]
    return basis * row_norm, energy


def _subspace_init(names: Sequence[str], fresh: Sequence[Any], task_files: Sequence[Path]) -> tuple[list[Any], dict]:
    """The ``subspace`` init: per module, A from :func:`task_subspace` over the tasks' saved
    factors (modules no task moved keep their fresh A), B = 0."""
    import torch

    from metarlhf.io import load_tensors

    tasks = [load_tensors(f) for f in task_files]
    index = {n: i for i, n in enumerate(names)}
    out = [torch.zeros_like(f) if ".lora_B." in n else f.clone() for n, f in zip(names, fresh, strict=True)]
    energies = []
    moved_tasks: set[int] = set()
    for n in names:
        if ".lora_A." not in n:
            continue
        nb = n.replace(".lora_A.", ".lora_B.")
        deltas = []
        for i, t in enumerate(tasks):
            if n in t and nb in t:
                d = t[nb].float() @ t[n].float()
                if float(d.abs().sum()) > 0:  # a task with no loss term (e.g. no thumbs up) moved nothing
                    deltas.append(d)
                    moved_tasks.add(i)
        if not deltas:
            continue
        f = fresh[index[n]]
        a, energy = task_subspace(deltas, f.shape[0], float(f.float().norm(dim=1).mean()))
        out[index[n]] = a.to(f.dtype)
        energies.append(energy)
    if not energies:
        raise DataError("no task moved the LoRA (no thumbs up in any support set?): no subspace to take")
    info = {"tasks": len(tasks), "tasks_used": len(moved_tasks), "modules": len(energies),
            "energy_mean": round(sum(energies) / len(energies), 4)}
    return out, info


def _fresh_lora_(names: Sequence[str], params: Sequence[Any], seed: str) -> None:
    """Re-initialise LoRA factors in place as peft does (A: Kaiming-uniform, a=sqrt(5); B: 0),
    from a generator seeded by ``seed``."""
    import torch

    g = torch.Generator().manual_seed(random.Random(seed).getrandbits(32))  # the CPU generator keeps 32 bits
    with torch.no_grad():
        for n, p in zip(names, params, strict=True):
            if ".lora_A." in n:
                a = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
                p.copy_(a)
            else:
                p.zero_()


def _pool_path(work: Path) -> Path:
    return work / "pool.jsonl"


#: What :func:`meta_train_policy` writes into its work directory: top-level names, and the
#: files of ``checkpoint/`` and ``tasks/`` (as patterns). Interrupted atomic writes may also
#: leave ``.<name>.<random>.tmp`` files of these names.
WORK_FILES = re.compile(r"(pool\.jsonl|metrics\.jsonl)")
WORK_CHECKPOINT_FILES = re.compile(r"(params\.safetensors|outer\.safetensors|state\.json)")
WORK_TASK_FILES = re.compile(r"task_\d{5,}\.safetensors")


def _written_by_us(entry: Path, names: re.Pattern[str]) -> bool:
    """Whether ``entry`` is a regular file named by ``names`` or an interrupted atomic write of one."""
    from metarlhf.io import temp_target_name

    return bool(names.fullmatch(temp_target_name(entry.name))) and entry.is_file() and not entry.is_symlink()


def _is_work_dir(path: Path) -> bool:
    """Whether directory ``path`` holds nothing but what :func:`meta_train_policy` writes."""
    for entry in path.iterdir():
        if entry.name in ("checkpoint", "tasks"):
            names = WORK_CHECKPOINT_FILES if entry.name == "checkpoint" else WORK_TASK_FILES
            if entry.is_symlink() or not entry.is_dir() or not all(_written_by_us(f, names) for f in entry.iterdir()):
                return False
        elif not _written_by_us(entry, WORK_FILES):
            return False
    return True


def work_dir(out: str | os.PathLike, work: str | os.PathLike | None = None) -> Path:
    """The work directory of :func:`meta_train_policy`: ``work``, or ``<out>.work``."""
    out = Path(out)
    return Path(work) if work is not None else out.with_name(out.name + ".work")


def check_work_dir(out: str | os.PathLike, work: str | os.PathLike | None = None) -> Path:
    """Raise :class:`ConfigError` unless :func:`meta_train_policy` may use its work directory.

    It must be missing, empty, or hold only what an earlier run wrote (``pool.jsonl``,
    ``metrics.jsonl``, ``checkpoint/``, ``tasks/``): a run deletes ``metrics.jsonl`` and
    ``tasks/`` and replaces the others, so a directory with other files is never used. It
    must not be ``out``, inside it, or hold it. Returns the work directory.
    """
    from metarlhf.io import check_apart, check_output_dir

    work_p = work_dir(out, work)
    check_apart(out, work_p, "work directory", "--work")
    check_output_dir(work_p, _is_work_dir, what="a `meta-train policy` work directory (pool.jsonl, metrics.jsonl, "
                                                "checkpoint/, tasks/)")
    return work_p


def _read_pool(path: Path) -> list[dict[str, Any]]:
    """The entries of ``pool.jsonl``; DataError naming the file and line if one is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable: {e}; remove it to sample a new pool") from e
    pool = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e}); remove the file to sample a new pool") from e
        if not (isinstance(p, dict) and isinstance(p.get("prompt"), str) and isinstance(p.get("completions"), list)
                and all(isinstance(c, str) for c in p["completions"])):
            raise DataError(f"{path}:{lineno}: not a pool entry (an object with a 'prompt' and a list of "
                            "'completions'); remove the file to sample a new pool")
        pool.append(p)
    return pool


def _read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None] | None:
    """``(state, params, outer)`` of the checkpoint in ``ckpt`` (``outer`` None if absent), None if
    it has no ``state.json``. ModelError naming the file if one is unreadable or malformed."""
    from metarlhf.io import load_tensors

    state_file = ckpt / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"checkpoint {state_file} is unreadable: {e}") from e
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and not isinstance(state["step"], bool)
            and state["step"] >= 0 and isinstance(state.get("config", {}), dict)
            and isinstance(state.get("adapt_config", {}), dict)
            and isinstance(state.get("wall_s", 0.0), (int, float))):
        raise ModelError(f"checkpoint {state_file} is malformed: expected an object with a step count, as "
                         "`meta-train policy` writes")
    tensors = {}
    for name in ("params.safetensors", "outer.safetensors"):
        path = ckpt / name
        if name == "outer.safetensors" and not path.is_file():
            continue
        try:
            tensors[name] = load_tensors(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
            raise ModelError(f"checkpoint {path} is unreadable: {e}") from e
    return state, tensors["params.safetensors"], tensors.get("outer.safetensors")


def _check_resume(ckpt: Path, state: dict[str, Any], cfg: MetaConfig, acfg: AdaptConfig,
                  prompts_sha256: str | None = None, users: Sequence[str] | None = None) -> None:
    """ConfigError unless the checkpoint's settings allow resuming with ``cfg`` and ``acfg``,
    on the same pool prompts (``prompts_sha256``, :func:`metarlhf.data.text_digest`) and the
    same users, in order (checkpoints written before either was recorded are not checked on it)."""
    if state.get("algo") != cfg.algo:
        raise ConfigError(f"checkpoint in {ckpt} is for algo {state.get('algo')!r}, not {cfg.algo!r}")
    if prompts_sha256 is not None and state.get("prompts_sha256") not in (None, prompts_sha256):
        raise ConfigError(f"checkpoint in {ckpt} was trained on other prompts (another --prompts file or --offset); "
                          "resume with the same ones, or rerun without --resume")
    if users is not None and state.get("users") not in (None, list(users)):
        raise ConfigError(f"checkpoint in {ckpt} was trained on users {', '.join(map(str, state['users']))}, "
                          f"not {', '.join(users)}; resume with the same --users, or rerun without --resume")

    def recipe(d: dict[str, Any]) -> dict[str, Any]:
        return {f"adapt_config.{k}": v for k, v in d.items()}

    # checkpoints before task_a were "shared"; before adapt_config, the recipe is unchecked
    # settings added since a checkpoint was written held their defaults then (e.g. contrast_weight = 0)
    saved_recipe = {**asdict(AdaptConfig()), **state["adapt_config"]} if "adapt_config" in state else {}
    old = {"task_a": "shared", **state.get("config", {}), **recipe(saved_recipe)}
    now = {**asdict(cfg), **recipe(asdict(acfg))}
    changed = [k for k in (*RESUME_FIXED, *recipe(asdict(acfg))) if k in old and old[k] != now[k]]
    if changed:
        raise ConfigError(f"checkpoint in {ckpt} was made with other settings: "
                          + ", ".join(f"{k}={old[k]!r} (now {now[k]!r})" for k in changed))


def check_meta_train(
    prompts: Sequence[str],
    users: Sequence[Any],
    out: str | os.PathLike,
    work: str | os.PathLike | None = None,
    config: MetaConfig | None = None,
    adapt_config: AdaptConfig | None = None,
    resume: bool = False,
) -> tuple[Path, tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None] | None]:
    """The checks of :func:`meta_train_policy` that need no model, for a command to run
    before it loads one: users and prompts, the work directory (:func:`check_work_dir`),
    and the files an earlier run left there (``pool.jsonl``; with ``resume``, the
    checkpoint, its settings and ``metrics.jsonl``). Reads, never writes.

    Returns the work directory and, with ``resume``, the checkpoint read
    (``(state, params, outer)``, or None where there is none).
    """
    cfg = config or MetaConfig()
    acfg = adapt_config or AdaptConfig()
    if not users:
        raise ConfigError("meta-training needs at least one simulated user")
    if len(prompts) < cfg.pool_prompts:
        raise DataError(f"need at least {cfg.pool_prompts} prompts (pool_prompts), got {len(prompts)}")
    work_p = check_work_dir(out, work)
    pool = _read_pool(_pool_path(work_p)) if _pool_path(work_p).is_file() else None
    checkpoint = _read_checkpoint(work_p / "checkpoint") if resume else None
    if checkpoint is not None:
        _check_resume(work_p / "checkpoint", checkpoint[0], cfg, acfg, text_digest(prompts[: cfg.pool_prompts]),
                      [u.name for u in users])
        # a checkpoint from before session 15 records no prompts_sha256: its pool.jsonl tells instead
        if ("prompts_sha256" not in checkpoint[0] and pool is not None
                and [p["prompt"] for p in pool] != list(prompts[: cfg.pool_prompts])):
            raise ConfigError(f"checkpoint in {work_p / 'checkpoint'} was trained on other prompts than this run's "
                              "(its pool.jsonl differs: another --prompts file or --offset); resume with the same "
                              "ones, or rerun without --resume")
        _read_losses(work_p / "metrics.jsonl")
    return work_p, checkpoint


def sample_pool(
    model: Any, tok: Any, prompts: Sequence[str], cfg: MetaConfig, work: Path, precision: str = "auto"
) -> list[tuple[str, list[str]]]:
    """Base-model samples, ``samples_per_prompt`` per prompt; cached in ``work/pool.jsonl``."""
    from metarlhf.io import atomic_write_bytes

    path = _pool_path(work)
    if path.is_file():
        pool = _read_pool(path)
        if [p["prompt"] for p in pool] == list(prompts) and all(
            len(p["completions"]) == cfg.samples_per_prompt and p.get("explore", "plain") == cfg.explore
            for p in pool
        ):
            return [(p["prompt"], p["completions"]) for p in pool]
        log.info("%s does not match this run's prompts; regenerating", path)
    rep = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    hints = exploration_hints(len(rep), cfg.explore, seed=cfg.seed)
    comps = generate(
        model, tok, rep, max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
        seed=cfg.seed, precision=precision, hints=hints,
    )
    s = cfg.samples_per_prompt
    pool = [(p, comps[i * s:(i + 1) * s]) for i, p in enumerate(prompts)]
    atomic_write_bytes(path, "".join(
        json.dumps({"prompt": p, "completions": c, "explore": cfg.explore, "hints": hints[i * s:(i + 1) * s]}) + "\n"
        for i, (p, c) in enumerate(pool)).encode())
    return pool


def meta_train_policy(
    prompts: Sequence[str],
    users: Sequence[Any],
    out: str | os.PathLike,
    work: str | os.PathLike | None = None,
    config: MetaConfig | None = None,
    adapt_config: AdaptConfig | None = None,
    base: Any = None,
    resume: bool = False,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> Adapter:
    """Meta-train a policy LoRA init over simulated ``users`` and save it to ``out``.

    The init records what it was trained on: the users, the pool prompts' digest and a
    short digest per prompt (``prompt_digests``, for :func:`metarlhf.evaluate_policy.evaluate_policy`
    to find held-out prompts among them) and ``source`` (e.g. the prompts file and offset).

    ``work`` (default ``<out>.work``) holds ``pool.jsonl``, ``metrics.jsonl``,
    ``checkpoint/`` and (``subspace``) ``tasks/``. With ``resume`` the run continues from
    the checkpoint; without it, earlier metrics and task files are discarded. A work
    directory holding anything else is refused (:func:`check_work_dir`), and so are
    unreadable files of an earlier run, before the model is loaded (:func:`check_meta_train`).
    """
    import torch
    from tqdm import tqdm

    from metarlhf.io import atomic_write_json, check_tensors, save_tensors

    cfg = config or MetaConfig()
    acfg = adapt_config or AdaptConfig()
    out = Path(out)
    # before anything is loaded or written: a work dir with files of others, or unreadable files, is refused
    work, checkpoint = check_meta_train(prompts, users, out, work, cfg, acfg, resume)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint"
    t0 = time.perf_counter()
    model, tok, base_name = resolve_base(base)
    pool = sample_pool(model, tok, list(prompts[: cfg.pool_prompts]), cfg, work, acfg.precision)
    prompts_sha256 = text_digest(p for p, _ in pool)
    ref_cache: dict[tuple[str, str], float] = {}
    start, wall_before = 0, 0.0
    with lora_attached(model, None, cfg.seed) as pm:
        names = [n for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n]
        params = trainable_params(pm)
        fresh = [p.detach().clone() for p in params]  # peft's default init (subspace: every task starts here)
        tasks_dir = work / "tasks"
        outer = torch.optim.Adam(params, lr=cfg.outer_lr) if cfg.algo == "fomaml" else None
        if checkpoint is not None:
            state, saved, ost = checkpoint
            check_tensors(saved, {n: p.shape for n, p in zip(names, params, strict=True)},
                          ckpt / "params.safetensors", "made on another base model?")
            with torch.no_grad():
                for n, p in zip(names, params, strict=True):
                    p.copy_(saved[n])
            if outer is not None and ost is not None:
                for n, p in zip(names, params, strict=True):
                    if f"m.{n}" not in ost:  # never stepped (a layer below train_layers): no Adam state
                        continue
                    if f"step.{n}" not in ost or f"v.{n}" not in ost:
                        raise ModelError(f"checkpoint {ckpt / 'outer.safetensors'} lacks the Adam state of {n}")
                    outer.state[p] = {"step": ost[f"step.{n}"], "exp_avg": ost[f"m.{n}"].to(p.device),
                                      "exp_avg_sq": ost[f"v.{n}"].to(p.device)}  # Adam's step count stays on the CPU
            start, wall_before = int(state["step"]), float(state.get("wall_s", 0.0))
            log.info("resuming meta-training at step %d from %s", start, ckpt)
        elif (work / "metrics.jsonl").exists():
            (work / "metrics.jsonl").unlink()
        if start == 0 and tasks_dir.is_dir():
            shutil.rmtree(tasks_dir)
        # Reference log-probs of the whole pool, once.
        flat_p = [p for p, cs in pool for _ in cs]
        flat_c = [c for _, cs in pool for c in cs]
        for i in range(0, len(flat_p), acfg.batch_size):
            batch = encode_pairs(tok, flat_p[i:i + acfg.batch_size], flat_c[i:i + acfg.batch_size],
                                 acfg.max_prompt_tokens, acfg.max_completion_tokens, model_device(pm))
            refs = reference_logps(pm, batch, acfg.batch_size, acfg.precision)
            ref_cache.update({(p, c): v for p, c, v in zip(flat_p[i:i + acfg.batch_size],
                                                           flat_c[i:i + acfg.batch_size], refs.tolist(), strict=True)})
        bar = tqdm(range(start, cfg.meta_steps), desc=f"meta-train policy ({cfg.algo})", disable=not progress,
                   initial=start, total=cfg.meta_steps)
        for step in bar:
            ts = time.perf_counter()
            rng = random.Random(f"{cfg.seed}:{step}")
            # subspace: the users in turn, so every user's updates shape the subspace
            user = users[step % len(users)] if cfg.algo == "subspace" else users[rng.randrange(len(users))]
            idx = rng.sample(range(len(pool)), cfg.support_prompts + cfg.query_prompts)

            def label(ids: list[int], rng: random.Random = rng, user: Any = user) -> list[Thumbs]:
                recs: list[Thumbs] = []
                for i in ids:
                    recs += user.thumbs(pool[i][0], pool[i][1], noise=cfg.label_noise, rng=rng)
                return recs

            theta = [p.detach().clone() for p in params]
            if cfg.algo == "subspace" and cfg.task_a == "per-task":  # before prepare: its caches see this LoRA
                _fresh_lora_(names, params, f"{cfg.seed}:task:{step}")
            support = prepare(pm, tok, label(idx[: cfg.support_prompts]), acfg, ref_cache)
            inner = train_steps(pm, support, acfg, cfg.inner_steps, rng)
            row: dict[str, Any] = {"step": step + 1, "user": user.name, "support_loss_first": inner[0],
                                   "support_loss_last": inner[-1]}
            if cfg.algo == "subspace":
                tasks_dir.mkdir(parents=True, exist_ok=True)
                save_tensors(tasks_dir / f"task_{step + 1:05d}.safetensors",
                             {n: p.detach() for n, p in zip(names, params, strict=True)})
                with torch.no_grad():
                    for p, t in zip(params, theta, strict=True):
                        p.copy_(t)
            elif cfg.algo == "reptile":
                with torch.no_grad():
                    for p, new in zip(params, reptile_update(theta, [p.detach() for p in params], cfg.reptile_eps),
                                      strict=True):
                        p.copy_(new)
            else:
                query = prepare(pm, tok, label(idx[cfg.support_prompts:]), acfg, ref_cache)
                for p in params:
                    p.grad = None
                with autocast(acfg.precision, model_device(pm).type):
                    q_loss = feedback_loss(pm, query, acfg)
                if torch.is_tensor(q_loss) and q_loss.requires_grad:  # else no term applies: no outer step
                    q_loss.backward()
                # lower (untrained) layers get no gradient: None, which Adam skips
                grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
                with torch.no_grad():
                    for p, t in zip(params, theta, strict=True):
                        p.copy_(t)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                if any(g is not None for g in grads):
                    outer.step()
                outer.zero_grad(set_to_none=True)
                row["query_loss"] = float(q_loss)
            row["step_s"] = round(time.perf_counter() - ts, 3)
            row["wall_s"] = round(wall_before + time.perf_counter() - t0, 3)
            with open(work / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(user=user.name[:12], loss=f"{inner[-1]:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.meta_steps:
                ckpt.mkdir(parents=True, exist_ok=True)
                save_tensors(ckpt / "params.safetensors", {n: p.detach() for n, p in zip(names, params, strict=True)})
                if outer is not None:
                    ost = {}
                    for n, p in zip(names, params, strict=True):
                        st = outer.state.get(p)
                        if st:
                            ost.update({f"step.{n}": torch.as_tensor(st["step"]).reshape(()),
                                        f"m.{n}": st["exp_avg"], f"v.{n}": st["exp_avg_sq"]})
                    if ost:
                        save_tensors(ckpt / "outer.safetensors", ost)
                atomic_write_json(ckpt / "state.json", {"step": step + 1, "algo": cfg.algo, "wall_s": row["wall_s"],
                                                        "config": asdict(cfg), "adapt_config": asdict(acfg),
                                                        "prompts_sha256": prompts_sha256,
                                                        "users": [u.name for u in users]})
        subspace_info = None
        if cfg.algo == "subspace":
            files = [tasks_dir / f"task_{i:05d}.safetensors" for i in range(1, cfg.meta_steps + 1)]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise DataError(f"{tasks_dir}: {len(missing)} of {cfg.meta_steps} task files missing "
                                f"(e.g. {missing[0]}); rerun without --resume")
            init_params, subspace_info = _subspace_init(names, fresh, files)
            with torch.no_grad():
                for p, v in zip(params, init_params, strict=True):
                    p.copy_(v)
        tensors = lora_state(pm)
    meta = {
        "kind": "policy_init",
        "base_model": base_name,
        "init": f"meta-trained ({cfg.algo})",
        "algo": cfg.algo,
        "k": cfg.support_prompts * cfg.samples_per_prompt,
        "steps": cfg.meta_steps,
        "inner_steps": cfg.inner_steps,
        "train_users": [u.name for u in users],
        "n_prompts": len(pool),
        "prompts_sha256": prompts_sha256,
        "prompt_digests": prompt_digests(p for p, _ in pool),
        **({"source": source} if source is not None else {}),
        "losses": _read_losses(work / "metrics.jsonl"),
        "meta_config": asdict(cfg),
        "adapt_config": asdict(acfg),
        "wall_s": round(wall_before + time.perf_counter() - t0, 1),
        **({"subspace": subspace_info} if subspace_info is not None else {}),
    }
    adapter = Adapter(tensors=tensors, config=lora_config_dict(base_name), meta=meta)
    save_adapter(out, adapter)
    return adapter


def _read_losses(path: Path) -> list[float]:
    """The loss per meta-step in ``metrics.jsonl``; DataError naming the file and line if malformed."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable: {e}") from e
    losses = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            loss = r.get("query_loss", r["support_loss_last"])
            losses.append(round(float(loss), 5))
        except (ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
            raise DataError(f"{path}:{lineno}: not a metrics row of `meta-train policy` ({e!r}); rerun "
                            "without --resume to start afresh") from e
    return losses

"""Personalised reward model: a text encoder with LoRA plus a scalar head.

    score(prompt, completion) = head( normalize( meanpool( encoder_LoRA([CLS] prompt [SEP] completion [SEP]) ) ) )

* Encoder: any local Hugging Face encoder (default: the embedded all-MiniLM-L6-v2).
  LoRA (peft, r=8 on ``query``/``value``, no dropout) adapts it; the base weights
  stay frozen and are shared by every user.
* Head: ``Linear(hidden, 1)``. It belongs to the user's adapter and is stored next to
  the LoRA tensors as the extra keys ``head.weight`` / ``head.bias``.
* Losses: logistic (binary cross-entropy on the score as a logit) for thumbs records,
  Bradley-Terry ``-log sigmoid(s_chosen - s_rejected)`` for pairs; mixed sets average
  over records.
* Few-shot adaptation (:func:`adapt_reward`) runs the *same* inner loop that
  meta-training (:mod:`metarlhf.meta`) optimised: ``steps`` plain gradient steps with
  per-parameter learning rates (Meta-SGD) on the parameters the init says to adapt
  (``head`` = ANIL-style, head only with the meta-learned LoRA kept; ``all`` = LoRA +
  head; ``subspace`` = only r coordinates ``z`` of the head in a meta-learned basis,
  see below). From ``init="scratch"`` it fits a fresh LoRA + zero head with Adam instead.
* Head subspace (CAVIA / subspace-MAML style): an init may carry a basis
  ``head.basis`` [r, hidden]; then the head is ``w = head.weight + z @ head.basis``
  with ``z`` [r] (key ``head.z``, start 0) and the bias adapted in the inner loop.
  K labels then determine r + 1 numbers instead of hidden + 1. The adapted *user*
  adapter stores the materialised ``head.weight`` (no basis), so scoring and serving
  are the same for every kind of init.
* Subspace + residual (a "low-rank + isotropic" Gaussian prior on the head): if the
  init also has an inner learning rate for ``head.r`` [hidden], the head is
  ``w = head.weight + z @ head.basis + r`` and the inner loop moves ``r`` (from 0) as
  well, at its own (smaller per unit of gradient, Meta-SGD) rate, with an optional L2 pull
  ``0.5 * inner_resid_l2 * |r|^2`` added to the support loss (the init's metadata
  ``inner_resid_l2``, default 0). ``z`` captures what the training users share; ``r``
  lets a user whose direction lies outside the subspace still be fitted when the data
  asks for it.

* Deeper encoders (e.g. a causal LM such as SmolLM2): ``RewardConfig.encoder_layers``
  keeps only the encoder's first N layers, ``lora_layers`` puts the LoRA on some layers
  only, and ``standardise`` centres and scales each pooled dimension with label-free
  statistics stored in the adapter (``encoder.feature_mean`` / ``encoder.feature_std``,
  fitted by :meth:`RewardModel.fit_feature_stats`) before the L2 norm: a causal LM's
  hidden states have a few very large dimensions that would otherwise dominate.

Simplifications: the prompt is truncated to its first ``prompt_max_tokens`` tokens
(the completion carries most of the signal), the pooled embedding is L2-normalised,
and all records of one user are encoded in one padded batch per ``batch_size``.
Tokenisations are cached per (prompt, completion) pair.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metarlhf.adapters import Adapter, load_adapter
from metarlhf.data import Pair, Record, Thumbs
from metarlhf.errors import AdapterError, ConfigError, DataError, ModelError
from metarlhf.models import shipped_init_dir

#: The shipped meta-trained init (``adapters/meta/reward`` next to the package).
SHIPPED_INIT_DIR = shipped_init_dir("reward")
INIT_KIND = "reward_init"
USER_KIND = "reward"
LR_PREFIX = "meta_sgd.log_lr."  # extra keys of an init: log inner learning rates
HEAD_KEYS = ("head.weight", "head.bias")
BASIS_KEY = "head.basis"  # [r, hidden] head subspace of an init (extra tensor)
Z_KEY = "head.z"  # [r] coordinates in that subspace (inner-loop only, never stored)
R_KEY = "head.r"  # [hidden] residual of the head outside the subspace (inner-loop only, never stored)
STATS_KEYS = ("encoder.feature_mean", "encoder.feature_std")  # [hidden] each, with RewardConfig.standardise
SUBSPACE_INNER_KEYS = (Z_KEY, "head.bias")
INNER_MODES = ("head", "all", "subspace")  # what an init's inner loop adapts


# --------------------------------------------------------------------------- losses


def logistic_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of ``sigmoid(scores)`` against 0/1 ``labels``. [n], [n] -> []."""
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(chosen - rejected)``. [n], [n] -> []."""
    return F.softplus(-(chosen_scores - rejected_scores)).mean()


# --------------------------------------------------------------------------- config


@dataclass
class RewardConfig:
    """Shape of the reward adapter. Stored in every adapter's metadata."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    max_length: int = field(default=128, metadata={"help": "max tokens of prompt + completion"})
    prompt_max_tokens: int = field(default=16, metadata={"help": "prompt tokens kept (from its start)"})
    encoder_layers: int | None = field(default=None, metadata={"help": "use only the encoder's first N layers"})
    lora_layers: list[int] | None = field(default=None, metadata={"help": "LoRA only on these layer indices"})
    standardise: bool = field(default=False, metadata={"help": "standardise pooled features with stored statistics"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r must be >= 1, got {self.r}")
        if self.encoder_layers is not None and self.encoder_layers < 1:
            raise ConfigError(f"encoder_layers must be >= 1, got {self.encoder_layers}")
        if self.lora_layers is not None:
            self.lora_layers = sorted(set(self.lora_layers))
            top = self.encoder_layers if self.encoder_layers is not None else math.inf
            if not self.lora_layers or self.lora_layers[0] < 0 or self.lora_layers[-1] >= top:
                raise ConfigError(f"lora_layers must be layer indices in [0, {top}), got {self.lora_layers}")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length}")
        if not 0 <= self.prompt_max_tokens < self.max_length - 3:
            raise ConfigError("prompt_max_tokens must be in [0, max_length - 3)")

    def lora_config(self) -> Any:
        from peft import LoraConfig

        layers = {"layers_to_transform": list(self.lora_layers), "layers_pattern": list(LAYER_PATTERNS)} \
            if self.lora_layers is not None else {}
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, target_modules=list(self.target_modules), lora_dropout=0.0,
            bias="none", **layers,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardConfig:
        """From an adapter's ``reward_config`` (older adapters lack the newer keys: defaults)."""
        return cls(**{k: d[k] for k in (f.name for f in fields(cls)) if k in d})

    def encoder_mismatch(self, other: RewardConfig) -> str | None:
        """Why an adapter made with ``other`` cannot run on an encoder set up with ``self`` (or None)."""
        for name in ("r", "lora_alpha", "encoder_layers", "lora_layers", "standardise", "max_length",
                     "prompt_max_tokens"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} is {getattr(other, name)!r} there, {getattr(self, name)!r} here"
        return None


#: Names of the numbered layer lists in HF models (``model.layers.N``, ``encoder.layer.N``, ...),
#: for peft's ``layers_to_transform``.
LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block")


#: LoRA targets (the attention query / value projections) by module naming family:
#: BERT-style encoders (MiniLM), Llama / Qwen / Mistral-style decoders, DistilBERT.
TARGET_FAMILIES: tuple[tuple[str, ...], ...] = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"))


def resolve_targets(config: RewardConfig, encoder: nn.Module) -> RewardConfig:
    """``config`` with LoRA targets this encoder has.

    The default targets (``query``/``value``, MiniLM's) are swapped for the first family of
    :data:`TARGET_FAMILIES` the encoder has, so any local encoder or decoder works without
    flags; explicitly different targets that the encoder lacks are an error.
    """
    linears = {n.rsplit(".", 1)[-1] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    if set(config.target_modules) <= linears:
        return config
    if set(config.target_modules) != set(TARGET_FAMILIES[0]):  # explicit targets: no silent swap
        raise ModelError(f"the encoder has no Linear modules named {list(config.target_modules)}; "
                         "cannot put the reward LoRA on it")
    for family in TARGET_FAMILIES[1:]:
        if set(family) <= linears:
            return replace(config, target_modules=list(family))
    raise ModelError(
        f"the encoder has none of the known query/value Linear pairs {[list(f) for f in TARGET_FAMILIES]}; "
        "cannot put the reward LoRA on it"
    )


# --------------------------------------------------------------------------- encoded records


@dataclass
class EncodedRecords:
    """Records turned into unique token sequences plus index tensors for the losses."""

    ids: list[list[int]]  # one token list per unique (prompt, completion)
    thumb_idx: torch.Tensor  # [t] rows of thumbs records
    thumb_labels: torch.Tensor  # [t] 0/1 float
    chosen_idx: torch.Tensor  # [p]
    rejected_idx: torch.Tensor  # [p]

    @property
    def n_records(self) -> int:
        return len(self.thumb_idx) + len(self.chosen_idx)

    def subset(self, thumbs: torch.Tensor | None = None, pairs: torch.Tensor | None = None) -> EncodedRecords:
        """Same sequences, only some records (indices into thumbs / pairs)."""
        ti = self.thumb_idx if thumbs is None else self.thumb_idx[thumbs]
        tl = self.thumb_labels if thumbs is None else self.thumb_labels[thumbs]
        ci = self.chosen_idx if pairs is None else self.chosen_idx[pairs]
        ri = self.rejected_idx if pairs is None else self.rejected_idx[pairs]
        return EncodedRecords(self.ids, ti, tl, ci, ri)


def records_loss(scores: torch.Tensor, enc: EncodedRecords) -> torch.Tensor:
    """Logistic loss on thumbs + Bradley-Terry on pairs, averaged over records. scores: [n_seqs]."""
    t, p = len(enc.thumb_idx), len(enc.chosen_idx)
    if t + p == 0:
        raise DataError("no records to compute a loss on")
    total = scores.new_zeros(())
    if t:
        total = total + logistic_loss(scores[enc.thumb_idx], enc.thumb_labels.to(scores.device)) * t
    if p:
        total = total + bradley_terry_loss(scores[enc.chosen_idx], scores[enc.rejected_idx]) * p
    return total / (t + p)


def records_accuracy(scores: torch.Tensor, enc: EncodedRecords) -> float:
    """Thumbs: (score > 0) == label; pairs: chosen scored above rejected."""
    correct = 0.0
    if len(enc.thumb_idx):
        correct += ((scores[enc.thumb_idx] > 0).float() == enc.thumb_labels.to(scores.device)).float().sum().item()
    if len(enc.chosen_idx):
        correct += (scores[enc.chosen_idx] > scores[enc.rejected_idx]).float().sum().item()
    return correct / max(1, enc.n_records)


def records_auc(scores: torch.Tensor, enc: EncodedRecords) -> float | None:
    """How well ``scores`` *order* the records, whatever their threshold: for thumbs the AUC
    over the pooled records (the share of (up, down) record pairs, any prompts, with the up one
    scored higher; Mann-Whitney with average ranks, n log n), for pairs the share with chosen
    above rejected; ties count 1/2, and the two parts are weighted by their record counts.

    None when there are no pairs and the thumbs hold one label only. Unlike
    :func:`records_accuracy` it ignores a score's offset, so a model that only learnt a user's
    base rate gets 1/2. (Best-of-N needs the order *within* a prompt, which this pooled AUC
    only approximates.)"""
    s = scores.detach().double()
    parts: list[tuple[float, int]] = []
    if len(enc.thumb_idx):
        t = s[enc.thumb_idx]
        up = enc.thumb_labels.to(t.device) > 0.5
        n_up, n_down = int(up.sum()), int((~up).sum())
        if n_up and n_down:
            _, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
            mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties averaged
            rank_sum = mean_rank[inverse][up].sum().item()
            parts.append(((rank_sum - n_up * (n_up + 1) / 2) / (n_up * n_down), len(enc.thumb_idx)))
    if len(enc.chosen_idx):
        d = s[enc.chosen_idx] - s[enc.rejected_idx]
        parts.append((((d > 0).double() + 0.5 * (d == 0).double()).mean().item(), len(enc.chosen_idx)))
    if not parts:
        return None
    return sum(v * n for v, n in parts) / sum(n for _, n in parts)


# --------------------------------------------------------------------------- model


class RewardModel(nn.Module):
    """Encoder + LoRA + scalar head. One instance can serve many users functionally:
    :meth:`scores_with` / :meth:`embed_with` take an explicit parameter dict, so the
    loaded weights are never mutated by adaptation."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, base_model: str, config: RewardConfig | None = None):
        super().__init__()
        from peft import get_peft_model

        self.config = resolve_targets(config or RewardConfig(), encoder)
        depth = getattr(encoder.config, "num_hidden_layers", None)
        if self.config.encoder_layers is not None and depth != self.config.encoder_layers:
            raise ModelError(f"the encoder has {depth} layers but the reward set-up says encoder_layers="
                             f"{self.config.encoder_layers} (load it with load_encoder(..., num_layers=N))")
        if self.config.lora_layers is not None and (depth is None or self.config.lora_layers[-1] >= depth):
            raise ModelError(f"lora_layers {self.config.lora_layers} outside the encoder's {depth} layers")
        for p in encoder.parameters():
            p.requires_grad_(False)
        try:
            self.peft = get_peft_model(encoder, self.config.lora_config())
        except ValueError as e:
            raise ModelError(f"cannot put LoRA on {self.config.target_modules} of this encoder: {e}") from e
        hidden = int(encoder.config.hidden_size)
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.hidden_size = hidden
        self.inner_log_lrs: dict[str, torch.Tensor] = {}
        self.init_meta: dict[str, Any] = {}
        self.head_basis: torch.Tensor | None = None  # [r, hidden] when the loaded init has a head subspace
        self._tok_cache: dict[tuple[str, str], list[int]] = {}
        if self.config.standardise:  # identity until fitted or loaded with an adapter
            self.register_buffer("feature_mean", torch.zeros(hidden))
            self.register_buffer("feature_std", torch.ones(hidden))
        self.eval()

    # ---------------------------------------------------------------- parameters

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _module_params(self) -> dict[str, torch.Tensor]:
        """LoRA A/B + head as they sit in the module (no basis), detached copies."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if "lora_" in n or n.startswith("head.")}

    def adapter_params(self) -> dict[str, torch.Tensor]:
        """The loaded adapter's parameters (LoRA A/B + head, + ``head.basis`` if the init has one), copies."""
        out = self._module_params()
        if self.head_basis is not None:
            out[BASIS_KEY] = self.head_basis.detach().clone()
        return out

    def fresh_params(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """A from-scratch adapter: peft's LoRA init (A random, B zero) and a zero head (no basis)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for n, p in self._module_params().items():
            if "lora_A" in n:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)) bound, as peft
                out[n] = ((torch.rand(p.shape, generator=g) * 2 - 1) * bound).to(p)
            else:
                out[n] = torch.zeros_like(p)
        return out

    def set_params(self, params: dict[str, torch.Tensor]) -> None:
        """Copy ``params`` into the module; ``head.basis`` (or its absence) sets :attr:`head_basis`."""
        own = dict(self.named_parameters())
        with torch.no_grad():
            for n, v in params.items():
                if n != BASIS_KEY:
                    own[n].copy_(v)
        self.head_basis = params[BASIS_KEY].detach().clone().to(self.device) if BASIS_KEY in params else None

    @staticmethod
    def to_peft_key(name: str) -> str:
        return name.removeprefix("peft.").replace(".default.", ".")

    def from_peft_key(self, key: str) -> str:
        if key.startswith("head."):
            return key
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part.startswith("lora_"):
                return "peft." + ".".join(parts[: i + 1] + ["default"] + parts[i + 1 :])
        return "peft." + key

    def feature_stats(self) -> dict[str, torch.Tensor]:
        """The standardisation statistics as adapter tensors (empty without ``standardise``)."""
        if not self.config.standardise:
            return {}
        return {STATS_KEYS[0]: self.feature_mean.detach().cpu(), STATS_KEYS[1]: self.feature_std.detach().cpu()}

    def check_feature_stats(self, tensors: dict[str, torch.Tensor], where: str, load: bool = False) -> None:
        """An adapter's statistics must be there with ``standardise`` (absent without); with
        ``load`` they are copied into the model, else they must equal the model's."""
        have = [k for k in STATS_KEYS if k in tensors]
        if not self.config.standardise:
            if have:
                raise AdapterError(f"{where}: has feature statistics but this reward model does not standardise")
            return
        if len(have) != 2:
            raise AdapterError(f"{where}: standardised reward model without {STATS_KEYS[0]!r} / {STATS_KEYS[1]!r}")
        for key in STATS_KEYS:  # both checked before either is copied
            if tuple(tensors[key].shape) != (self.hidden_size,):
                raise AdapterError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)}, "
                                   f"expected [{self.hidden_size}]")
        if not bool((tensors[STATS_KEYS[1]] > 0).all()):
            raise AdapterError(f"{where}: {STATS_KEYS[1]!r} has entries <= 0")
        for key, buf in zip(STATS_KEYS, (self.feature_mean, self.feature_std), strict=True):
            if load:
                buf.copy_(tensors[key])
            elif not torch.allclose(tensors[key].to(buf), buf):
                raise AdapterError(f"{where}: made with other feature statistics than this reward model's")

    def fit_feature_stats(self, ids: Sequence[list[int]], batch_size: int = 64) -> None:
        """Per-dimension mean / std of the base encoder's pooled features (no LoRA, no labels)."""
        if not self.config.standardise:
            raise ConfigError("fit_feature_stats needs RewardConfig(standardise=True)")
        if len(ids) < 2:
            raise DataError(f"feature statistics need >= 2 sequences, got {len(ids)}")
        chunks = []
        with torch.no_grad(), self.peft.disable_adapter():
            for i in range(0, len(ids), batch_size):
                chunks.append(self.pooled(*self.collate(ids[i : i + batch_size])))
        x = torch.cat(chunks)  # [n, hidden]
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0).clamp_min(1e-6))

    def params_from_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Adapter tensors (peft key names) -> parameter dict; checks names and shapes.

        An optional ``head.basis`` [r, hidden] (head subspace of an init) is passed through."""
        own = self._module_params()
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if key.startswith(LR_PREFIX) or key in STATS_KEYS:
                continue
            if key == BASIS_KEY:
                if value.dim() != 2 or value.shape[1] != self.hidden_size or value.shape[0] < 1:
                    raise AdapterError(f"{where}: {BASIS_KEY!r} has shape {tuple(value.shape)}, "
                                       f"expected [r, {self.hidden_size}]")
                out[key] = value.to(self.device, torch.float32)
                continue
            name = self.from_peft_key(key)
            if name not in own:
                raise AdapterError(f"{where}: tensor {key!r} does not fit this encoder")
            if tuple(value.shape) != tuple(own[name].shape):
                raise AdapterError(
                    f"{where}: tensor {key!r} has shape {tuple(value.shape)}, encoder expects {tuple(own[name].shape)}"
                )
            out[name] = value.to(own[name])
        missing = sorted(set(own) - set(out))
        if missing:
            raise AdapterError(f"{where}: missing tensors, e.g. {self.to_peft_key(missing[0])!r}")
        return out

    def read_adapter(self, path: str | os.PathLike, kinds: Sequence[str] = (INIT_KIND, USER_KIND),
                     load_stats: bool = False) -> tuple[Adapter, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Read and check an init or user adapter for this model without setting its weights:
        ``(adapter, params, inner log-lrs on this device)``. Its feature statistics are copied
        into the model with ``load_stats``; otherwise they must equal the model's."""
        adapter = load_adapter(path, expect_base=self.base_model, expect_rank=self.config.r)
        if adapter.meta.get("kind") not in kinds:
            raise AdapterError(f"{path}: a {adapter.meta.get('kind')!r} adapter, expected one of {list(kinds)}")
        self.check_config(adapter.meta, str(path))
        params = self.params_from_tensors(adapter.tensors, str(path))
        self.check_feature_stats(adapter.tensors, str(path), load=load_stats)
        log_lrs = {self.from_peft_key(k[len(LR_PREFIX):]): v.to(self.device) for k, v in adapter.tensors.items()
                   if k.startswith(LR_PREFIX)}
        return adapter, params, log_lrs

    def load_adapter_dir(self, path: str | os.PathLike, kinds: Sequence[str] = (INIT_KIND, USER_KIND)) -> Adapter:
        """Load an init or user adapter into this model (weights, inner learning rates, statistics)."""
        adapter, params, self.inner_log_lrs = self.read_adapter(path, kinds, load_stats=True)
        self.set_params(params)
        self.init_meta = dict(adapter.meta)
        return adapter

    def check_config(self, meta: dict[str, Any], where: str) -> None:
        """An adapter's ``reward_config`` must fit how this model's encoder is set up."""
        why = self.config.encoder_mismatch(RewardConfig.from_dict(meta.get("reward_config", {})))
        if why is not None:
            raise AdapterError(f"{where}: made for another reward encoder set-up ({why})")

    def make_adapter(self, params: dict[str, torch.Tensor], meta: dict[str, Any],
                     log_lrs: dict[str, torch.Tensor] | None = None) -> Adapter:
        """An :class:`Adapter` in peft format (+ head, + optional Meta-SGD log-lrs, + feature statistics)."""
        tensors = {self.to_peft_key(n): v.detach().float().cpu() for n, v in params.items()}
        tensors |= self.feature_stats()
        for n, v in (log_lrs or {}).items():
            tensors[LR_PREFIX + self.to_peft_key(n)] = v.detach().float().cpu()
        lc = self.config.lora_config()
        config = {
            "peft_type": "LORA", "r": lc.r, "lora_alpha": lc.lora_alpha, "target_modules": sorted(lc.target_modules),
            "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": self.base_model, "task_type": None,
            "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        }
        if lc.layers_to_transform is not None:  # LoRA on some layers only: peft must know which
            config |= {"layers_to_transform": list(lc.layers_to_transform), "layers_pattern": list(lc.layers_pattern)}
        m = {"base_model": self.base_model, "reward_config": asdict(self.config), "head_keys": list(HEAD_KEYS)}
        m.update(meta)
        return Adapter(tensors=tensors, config=config, meta=m)

    # ---------------------------------------------------------------- tokenisation

    def _encode_one(self, prompt: str, completion: str) -> list[int]:
        key = (prompt, completion)
        hit = self._tok_cache.get(key)
        if hit is not None:
            return hit
        tok, cfg = self.tokenizer, self.config
        p = tok(prompt, add_special_tokens=False)["input_ids"][: cfg.prompt_max_tokens]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        cls = [tok.cls_token_id] if tok.cls_token_id is not None else []
        sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id  # decoders: EOS separates
        sep = [sep_id] if sep_id is not None else []
        room = cfg.max_length - len(cls) - 2 * len(sep)
        c = c[: max(1, room - len(p))]
        p = p[: room - len(c)]
        ids = cls + p + sep + c + sep
        if len(self._tok_cache) > 200_000:
            self._tok_cache.clear()
        self._tok_cache[key] = ids
        return ids

    def encode_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(completions):
            raise DataError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [self._encode_one(p, c) for p, c in zip(prompts, completions, strict=True)]

    def encode_records(self, records: Sequence[Record]) -> EncodedRecords:
        """Tokenise records once; pairs share their prompt's sequences by index."""
        ids: list[list[int]] = []
        index: dict[tuple[str, str], int] = {}

        def row(p: str, c: str) -> int:
            if (p, c) not in index:
                index[(p, c)] = len(ids)
                ids.append(self._encode_one(p, c))
            return index[(p, c)]

        ti, tl, ci, ri = [], [], [], []
        for r in records:
            if isinstance(r, Thumbs):
                ti.append(row(r.prompt, r.completion))
                tl.append(float(r.label))
            elif isinstance(r, Pair):
                ci.append(row(r.prompt, r.chosen))
                ri.append(row(r.prompt, r.rejected))
            else:
                raise DataError(f"not a Thumbs or Pair record: {type(r).__name__}")
        long = torch.long
        return EncodedRecords(ids, torch.tensor(ti, dtype=long), torch.tensor(tl), torch.tensor(ci, dtype=long),
                              torch.tensor(ri, dtype=long))

    def collate(self, ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence. -> input_ids [n, L], attention_mask [n, L]."""
        pad = self.tokenizer.pad_token_id or 0
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------- forward

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states over the real tokens. [n, L] -> [n, hidden]."""
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state  # [n, L, hidden]
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # [n, L, 1]
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (standardised with ``standardise``), L2-normalised embeddings. [n, L] -> [n, hidden]."""
        x = self.pooled(input_ids, attention_mask)
        if self.config.standardise:
            x = (x - self.feature_mean) / self.feature_std
        return F.normalize(x, dim=-1)

    def embed_ids(self, ids: Sequence[list[int]], params: dict[str, torch.Tensor] | None = None,
                  batch_size: int = 32) -> torch.Tensor:
        """Embeddings of token lists, with explicit adapter params (differentiable). -> [n, hidden]."""
        from torch.func import functional_call

        if params is not None:  # the encoder's forward reads only the LoRA tensors
            params = {k: v for k, v in params.items() if not k.startswith("head.")}
        chunks = []
        for i in range(0, len(ids), batch_size):
            input_ids, mask = self.collate(ids[i : i + batch_size])
            if params is None:
                chunks.append(self(input_ids, mask))
            else:
                chunks.append(functional_call(self, params, (input_ids, mask), strict=False))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.hidden_size, device=self.device)

    @staticmethod
    def head_scores(params: dict[str, torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n]. With ``head.z`` in ``params`` the weight is ``head.weight + z @ head.basis``."""
        return emb @ head_weight(params) + params["head.bias"][0]

    def embed_with(self, params: dict[str, torch.Tensor] | None, prompts: Sequence[str],
                   completions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        with torch.no_grad():
            return self.embed_ids(self.encode_texts(prompts, completions), params, batch_size)

    def scores_with(self, params: dict[str, torch.Tensor] | None, prompts: Sequence[str],
                    completions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        p = params if params is not None else dict(self.named_parameters())
        emb = self.embed_with(params, prompts, completions, batch_size)
        with torch.no_grad():
            return self.head_scores(p, emb)

    def embed(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Pooled encoder embeddings with the loaded adapter, no grad. -> [n, hidden]."""
        return self.embed_with(None, prompts, completions, batch_size)

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Scalar rewards with the loaded adapter, no grad, batched. -> [n]."""
        return self.scores_with(None, prompts, completions, batch_size)


def load_reward_model(
    encoder_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    config: RewardConfig | None = None,
) -> RewardModel:
    """Load encoder + LoRA + head.

    ``encoder_dir=None`` is the embedded MiniLM. ``adapter_dir`` may be a user adapter
    (kind ``reward``) or an init (kind ``reward_init``). With ``adapter_dir=None`` the
    shipped init (``adapters/meta/reward``) is loaded if it exists *and* was made for
    this encoder; otherwise the model has a fresh LoRA and a zero head (scores 0).
    """
    from metarlhf.adapters import read_meta
    from metarlhf.models import DEFAULT_ENCODER_NAME, load_encoder, model_name, resolve_encoder_dir

    src = Path(adapter_dir) if adapter_dir is not None else SHIPPED_INIT_DIR
    src_meta = read_meta(src) if (src / "metarlhf.json").is_file() else {}
    if config is None:
        config = RewardConfig.from_dict(src_meta.get("reward_config", {}))
    base = model_name(resolve_encoder_dir(encoder_dir) if encoder_dir is not None else None, DEFAULT_ENCODER_NAME)
    made_for = src_meta.get("base_model")
    if adapter_dir is not None and made_for not in (None, base):
        raise AdapterError(f"{adapter_dir}: made for the reward encoder {made_for!r}, not {base!r} "
                           "(pass the encoder it was made for)")
    enc, tok = load_encoder(encoder_dir, device=device, num_layers=config.encoder_layers)
    model = RewardModel(enc, tok, base, config).to(device)
    if adapter_dir is not None:
        model.load_adapter_dir(adapter_dir)
    elif src_meta and made_for == base:  # the shipped init, made for this encoder (else: the fresh head)
        model.load_adapter_dir(SHIPPED_INIT_DIR)
    return model


def require_init_dir(path: str | os.PathLike) -> None:
    """``path`` must be a reward init directory (a ConfigError otherwise)."""
    from metarlhf.adapters import read_meta

    if not (Path(path) / "metarlhf.json").is_file():
        raise ConfigError(f"reward_init {str(path)!r}: no reward init there (metarlhf.json missing); "
                          "pass an init directory or 'scratch'")
    kind = read_meta(path).get("kind")
    if kind != INIT_KIND:
        raise ConfigError(f"reward_init {str(path)!r}: a {kind!r} adapter, not a reward init")


# --------------------------------------------------------------------------- adaptation


def head_weight(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's weight vector [hidden]: ``head.weight[0] (+ head.z @ head.basis) (+ head.r)``. Pure."""
    w = params["head.weight"][0]  # [hidden]
    if Z_KEY in params:
        w = w + params[Z_KEY] @ params[BASIS_KEY]  # [r] @ [r, hidden] -> [hidden]
    if R_KEY in params:
        w = w + params[R_KEY]  # [hidden]
    return w


def materialise_head(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold ``head.z`` (and ``head.r``) into ``head.weight``; drop them and ``head.basis``. Pure."""
    out = {k: v for k, v in params.items() if k not in (Z_KEY, R_KEY, BASIS_KEY)}
    out["head.weight"] = head_weight(params).unsqueeze(0)  # [1, hidden]
    return out


def fold_z(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold ``head.z`` (and ``head.r``) into ``head.weight`` but keep ``head.basis`` (an init's form). Pure."""
    if Z_KEY not in params and R_KEY not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k not in (Z_KEY, R_KEY)}
    out["head.weight"] = head_weight(params).unsqueeze(0)  # [1, hidden]
    return out


def inner_keys(params: dict[str, torch.Tensor], log_lrs: dict[str, torch.Tensor] | None = None) -> tuple[str, ...]:
    """What the head-only inner loop adapts: ``(head.z, head.bias)`` with a basis, plus ``head.r``
    when ``log_lrs`` has a rate for it (subspace + residual); without a basis, the head."""
    if BASIS_KEY not in params:
        return HEAD_KEYS
    return (*SUBSPACE_INNER_KEYS, R_KEY) if log_lrs is not None and R_KEY in log_lrs else SUBSPACE_INNER_KEYS


def residual_penalty(params: dict[str, torch.Tensor], l2: float) -> torch.Tensor | float:
    """The residual's Gaussian prior term ``0.5 * l2 * |head.r|^2`` (0 without ``head.r`` or l2). Pure."""
    if l2 == 0.0 or R_KEY not in params:
        return 0.0
    return 0.5 * l2 * (params[R_KEY] ** 2).sum()


def sgd_inner_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                   log_lrs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One Meta-SGD step: ``p - exp(log_lr) * g`` for every key in ``grads``. Pure."""
    out = dict(params)
    for k, g in grads.items():
        out[k] = params[k] - torch.exp(log_lrs[k]) * g
    return out


def with_inner_start(params: dict[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``params`` plus the head loop's starting points it lacks: ``head.z`` = 0 (with a basis)
    and ``head.r`` = 0 (when ``keys`` adapt it). Pure."""
    out = dict(params)
    if BASIS_KEY in out and Z_KEY not in out:
        out[Z_KEY] = out[BASIS_KEY].new_zeros(out[BASIS_KEY].shape[0])
    if R_KEY in keys and R_KEY not in out:
        out[R_KEY] = torch.zeros_like(out["head.weight"][0])  # [hidden]
    return out


def adapt_head(emb: torch.Tensor, enc: EncodedRecords, params: dict[str, torch.Tensor],
               log_lrs: dict[str, torch.Tensor], steps: int,
               resid_l2: float = 0.0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """ANIL inner loop on fixed embeddings: ``steps`` Meta-SGD steps on the head only.

    With ``head.basis`` in ``params`` (a subspace init) the steps move ``z`` (from 0) and
    the bias, and the residual ``head.r`` (from 0, penalised by ``resid_l2``) if
    ``log_lrs`` has a rate for it; the returned params carry the materialised
    ``head.weight`` (no basis). ``losses`` are the support losses (penalty included).
    """
    from torch.func import grad_and_value

    keys = inner_keys(params, log_lrs)
    missing = [k for k in keys if k not in log_lrs]
    if missing:
        raise AdapterError(f"the init has no inner learning rate for {missing[0]!r}")
    params = with_inner_start(params, keys)
    head = {k: params[k].detach() for k in keys}
    fixed = {k: params[k].detach() for k in (*HEAD_KEYS, Z_KEY, R_KEY, BASIS_KEY) if k in params and k not in keys}

    def loss_fn(h: dict[str, torch.Tensor]) -> torch.Tensor:
        return records_loss(RewardModel.head_scores({**fixed, **h}, emb), enc) + residual_penalty(h, resid_l2)

    losses = []
    for _ in range(steps):
        g, loss = grad_and_value(loss_fn)(head)
        losses.append(loss.item())
        head = sgd_inner_step(head, g, log_lrs)
    losses.append(float(loss_fn(head)))
    return materialise_head({**params, **head}), losses


def adapt_params(model: RewardModel, enc: EncodedRecords, params: dict[str, torch.Tensor],
                 log_lrs: dict[str, torch.Tensor], steps: int, inner: str = "head", seed: int = 0,
                 adam_lr: float | None = None, resid_l2: float = 0.0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fit ``params`` to ``enc``. Returns ``(adapted params, losses)`` (losses[-1] = final).

    ``adam_lr`` set: Adam on LoRA + head (the from-scratch baseline). Otherwise the
    meta-learned inner loop: Meta-SGD steps on the head (``inner="head"``), on the
    head's subspace coordinates + bias, and the residual ``head.r`` when ``log_lrs``
    has its rate (``inner="subspace"``; ``params`` carry ``head.basis``) or on all adapter parameters (``inner="all"``), with the init's
    learning rates.
    """
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if inner not in INNER_MODES:
        raise ConfigError(f"inner must be one of {', '.join(INNER_MODES)}, got {inner!r}")
    if adam_lr is None and inner == "subspace" and BASIS_KEY not in params:
        raise AdapterError(f"inner='subspace' but the init has no {BASIS_KEY!r}")
    if adam_lr is None and inner in ("head", "subspace"):
        with torch.no_grad():
            emb = model.embed_ids(enc.ids, params)  # [n, hidden]
        return adapt_head(emb, enc, params, log_lrs, steps, resid_l2)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=adam_lr) if adam_lr is not None else None
    losses: list[float] = []
    for _ in range(steps):
        loss = records_loss(model.head_scores(p, model.embed_ids(enc.ids, p)), enc)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(p.values()))
        if opt is not None:
            for v, g in zip(p.values(), grads, strict=True):
                v.grad = g
            opt.step()
        else:
            with torch.no_grad():
                for (k, v), g in zip(p.items(), grads, strict=True):
                    if k in log_lrs:
                        v -= torch.exp(log_lrs[k]) * g
    with torch.no_grad():
        losses.append(float(records_loss(model.head_scores(p, model.embed_ids(enc.ids, p)), enc)))
    return materialise_head({k: v.detach() for k, v in p.items()}), losses


SCRATCH_ADAM_LR = 1e-2


def adapt_reward(
    records: Sequence[Record],
    init: str | os.PathLike | None = None,
    encoder: str | os.PathLike | RewardModel | None = None,
    steps: int | None = None,
    seed: int = 0,
    scratch_lr: float = SCRATCH_ADAM_LR,
    device: str = "cpu",
) -> Adapter:
    """Fit one user's reward adapter on their records; returns an :class:`Adapter` (kind ``reward``).

    ``init``: an init directory, ``None`` for the shipped meta-init, or ``"scratch"``
    (fresh LoRA + zero head trained with Adam). ``encoder``: a local encoder directory,
    ``None`` for embedded MiniLM, or an already-loaded :class:`RewardModel` (not
    modified; its tokenisation cache is reused) so a server need not reload it.
    ``steps=None`` uses the init's inner-step count (scratch: the same default).
    ``device`` places a model loaded here (a passed :class:`RewardModel` stays where it is).
    """
    t0 = time.perf_counter()
    if not records:
        raise DataError("no records to adapt on")
    users = {r.user_id for r in records}
    scratch = init is not None and str(init) == "scratch"
    init_dir = None if scratch else Path(init) if init is not None else SHIPPED_INIT_DIR
    if init_dir is not None and not (init_dir / "metarlhf.json").is_file():
        raise AdapterError(f"{init_dir}: no reward init there (expected metarlhf.json); pass init='scratch' or a dir")
    model = encoder if isinstance(encoder, RewardModel) else load_reward_model(
        encoder, adapter_dir=init_dir if init_dir is not None else None,
        config=None if init_dir is not None else RewardConfig(), device=device)
    if init_dir is not None:
        if isinstance(encoder, RewardModel):  # shared model: read the init without touching the model
            adapter, params, log_lrs = model.read_adapter(init_dir)  # statistics must equal the model's
            meta = adapter.meta
        else:
            params, log_lrs, meta = model.adapter_params(), model.inner_log_lrs, model.init_meta
        inner = meta.get("inner", "head")
        n_steps = int(meta.get("inner_steps", 5)) if steps is None else steps
        if not log_lrs:
            raise AdapterError(f"{init_dir}: init has no inner learning rates ({LR_PREFIX}*)")
        if meta.get("inner_residual") and R_KEY not in log_lrs:
            raise AdapterError(f"{init_dir}: metadata says inner_residual but there is no {LR_PREFIX}{R_KEY}")
        adapted, losses = adapt_params(model, model.encode_records(records), params, log_lrs, n_steps, inner, seed,
                                       resid_l2=float(meta.get("inner_resid_l2", 0.0)))
        init_name = str(meta.get("name", init_dir))
    else:
        n_steps = 5 if steps is None else steps
        adapted, losses = adapt_params(model, model.encode_records(records), model.fresh_params(seed), {},
                                       n_steps, seed=seed, adam_lr=scratch_lr)
        init_name = "scratch"
    return model.make_adapter(adapted, {
        "kind": USER_KIND, "init": init_name, "k": len(records), "steps": n_steps, "losses": losses,
        "final_loss": losses[-1], "users": sorted(users), "seed": seed,
        "adapt_seconds": round(time.perf_counter() - t0, 4),
    })

"""The MAML family on ``torch.func``, and meta-training of the reward init.

Vocabulary from learn2learn: a :class:`MetaLearner` holds the meta-parameters θ;
``clone()`` gives a functional learner whose parameters start at θ (still attached to
the autograd graph), and ``adapt(loss_fn)`` takes one inner step

    φ ← φ - α ⊙ ∇_φ L_support(φ)          (gradient by ``torch.func.grad``)

The meta-loop is explicit: adapt on the support set, evaluate the query loss at φ,
and back-propagate to θ (and α).

* ``maml``     second order: the inner gradient stays in the graph, so the meta-gradient
               is (I - α H_support) ∇L_query(φ) for one step.
* ``fomaml``   first order: the inner gradient is detached; meta-gradient ∇L_query(φ).
* ``reptile``  no query loss: the meta-gradient is θ - φ after k steps on the task's data
               (support ∪ query), applied by the outer optimiser.
* ``metasgd``  MAML with learned per-parameter inner learning rates α = exp(log_lr);
               second order unless ``first_order=True``, in which case the inner
               gradient is detached but α still gets its gradient -g ⊙ ∇L_query(φ).

Models are called with ``torch.func.functional_call`` on a dict of parameters, so one
loaded encoder serves every task. Tasks in a meta-batch are processed in a loop, not
with ``vmap``: a transformer over padded text batches of different lengths is not a
good fit for ``vmap`` and the CPU gains nothing from it.

Meta-training of the reward model (:func:`meta_train_reward`) adapts, per the config,
either the head only (``inner="head"``, ANIL: LoRA is meta-learned in the outer loop
and shared; cheap, and second order costs no extra encoder passes), LoRA + head
(``inner="all"``), or r coordinates of the head in a meta-learned subspace
(``inner="subspace"``, CAVIA / subspace-MAML style):

    w_user = w0 + z @ B,   z ← z - α_z ⊙ ∇_z L_support   (z starts at 0; the bias is adapted too)

The outer loop learns the LoRA, w0, b0, the basis B [r, hidden] and (Meta-SGD) α_z.
With ``inner_lr_r > 0`` the inner loop also moves a full residual r [hidden] (from 0):

    w_user = w0 + z @ B + r,   r ← r - α_r ⊙ (∇_r L_support + λ r)

(a "low-rank + isotropic" Gaussian prior; λ = ``resid_l2``), α_r Meta-SGD learned.
``keep_basis`` with ``init_from`` a subspace init of the same rank starts from that
init's w0, b0, basis and inner rates instead of a fresh PCA.
B starts as the top-r principal directions of per-user logistic heads fitted on the
*train* users' base-encoder embeddings (:func:`pca_head_basis`), each row scaled by
the standard deviation of the heads along it, so ``z ~ N(0, I)`` over train users.
Simplification: those heads are fitted on ``basis_records`` records per train user
(not all of them), to keep the start-up cost small. Users are split deterministically into train / validation / test;
validation accuracy on held-out users is logged every ``val_every`` steps and the
best-validation parameters are shipped.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarlhf.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

ALGOS = ("maml", "fomaml", "reptile", "metasgd")
Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- pure updates


def inner_update(params: Params, grads: Params, lrs: Params) -> Params:
    """φ = θ - α ⊙ g for the keys in ``grads``; other keys pass through. Pure."""
    out = dict(params)
    for k, g in grads.items():
        out[k] = params[k] - lrs[k] * g
    return out


def reptile_meta_grad(theta: Params, phis: list[Params]) -> Params:
    """Reptile's meta-gradient: mean over tasks of θ - φ_task (descending it moves θ toward φ). Pure.

    Only what the inner loop adapts moves: a parameter outside it has φ = θ and gets exactly
    0, so with ``inner`` head or subspace a Reptile init is the base encoder with a learned
    head (MAML / Meta-SGD also train the shared parameters through the query loss)."""
    return {k: torch.stack([theta[k].detach() - phi[k].detach() for phi in phis]).mean(0) for k in theta}


# --------------------------------------------------------------------------- learners


class Clone:
    """A task-specific learner: parameters φ (functions of θ) and an ``adapt`` verb."""

    def __init__(self, params: Params, lrs: Params, adapt_keys: list[str], first_order: bool):
        self.params = params
        self.lrs = lrs
        self.adapt_keys = adapt_keys
        self.first_order = first_order

    def adapt(self, loss_fn: Callable[[Params], torch.Tensor]) -> torch.Tensor:
        """One inner step on ``loss_fn(params) -> scalar``. Returns the pre-step loss (detached)."""
        from torch.func import grad_and_value

        sub = {k: self.params[k] for k in self.adapt_keys}
        rest = {k: v for k, v in self.params.items() if k not in sub}
        grads, loss = grad_and_value(lambda s: loss_fn({**rest, **s}))(sub)
        if self.first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        self.params = inner_update(self.params, grads, self.lrs)
        return loss.detach()


class MetaLearner:
    """Meta-parameters θ (leaf tensors) and inner learning rates, MAML-family style.

    ``log_lrs`` are meta-learned only for ``metasgd``; the others use a fixed α.
    """

    def __init__(self, params: Params, algo: str, inner_lr: float | Params, adapt_keys: list[str] | None = None,
                 first_order: bool | None = None):
        if algo not in ALGOS:
            raise ConfigError(f"unknown meta-learning algorithm {algo!r}; choose from {', '.join(ALGOS)}")
        self.algo = algo
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.adapt_keys = list(adapt_keys) if adapt_keys is not None else list(params)
        unknown = set(self.adapt_keys) - set(params)
        if unknown:
            raise ConfigError(f"adapt_keys not among the parameters: {sorted(unknown)[:3]}")
        if first_order is None:
            first_order = algo in ("fomaml", "reptile")
        if algo == "maml" and first_order:
            raise ConfigError("maml is second order; use algo='fomaml' for first order")
        self.first_order = first_order
        self.log_lrs: Params = {}
        for k in self.adapt_keys:
            lr = inner_lr[k] if isinstance(inner_lr, dict) else inner_lr
            t = (torch.log(lr.detach().clone()) if isinstance(lr, torch.Tensor)
                 else torch.full_like(self.params[k], math.log(lr)))
            self.log_lrs[k] = t.detach().clone().requires_grad_(algo == "metasgd")

    def meta_parameters(self) -> list[torch.Tensor]:
        out = list(self.params.values())
        if self.algo == "metasgd":
            out += list(self.log_lrs.values())
        return out

    def clone(self) -> Clone:
        lrs = {k: torch.exp(v) for k, v in self.log_lrs.items()}
        return Clone(dict(self.params), lrs, self.adapt_keys, self.first_order)


def meta_gradients(learner: MetaLearner, tasks: list[Any], inner_steps: int,
                   support_loss: Callable[[Params, Any], torch.Tensor],
                   query_loss: Callable[[Params, Any], torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Meta-gradients for one meta-batch (mean over tasks), in ``learner.meta_parameters()`` order.

    For ``reptile`` the inner loop runs on ``support_loss`` and the returned "gradient"
    is θ - φ; the float returned is the mean query loss at φ (for logging).
    """
    params = learner.meta_parameters()
    total: list[torch.Tensor] | None = None
    qsum = 0.0
    for task in tasks:
        clone = learner.clone()
        for _ in range(inner_steps):
            clone.adapt(lambda p, task=task: support_loss(p, task))
        if learner.algo == "reptile":
            q = query_loss({k: v.detach() for k, v in clone.params.items()}, task).detach()
            g = [learner.params[k].detach() - clone.params[k].detach() for k in learner.params]
        else:
            q = query_loss(clone.params, task)
            g = torch.autograd.grad(q, params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True)]
        qsum += float(q.detach())
        total = g if total is None else [a + b for a, b in zip(total, g, strict=True)]
    n = len(tasks)
    return [t / n for t in total], qsum / n


# --------------------------------------------------------------------------- reward meta-training


@dataclass
class MetaTrainConfig:
    """Meta-training options for the reward init (stored in the init's metadata)."""

    algo: str = field(default="metasgd", metadata={"help": "maml | fomaml | reptile | metasgd"})
    first_order: bool = field(default=False, metadata={"help": "metasgd only: detach inner gradients"})
    inner: str = field(default="head", metadata={"help": "head (ANIL) | all (LoRA + head) | subspace (z of the head)"})
    inner_steps: int = 3
    inner_lr_head: float = 3.0  # weight; the bias starts at inner_lr_bias
    inner_lr_bias: float = 1.0
    inner_lr_lora: float = 1e-3
    inner_lr_z: float = 1.0  # subspace: initial inner lr of the coordinates z
    inner_lr_r: float = field(default=0.0, metadata={"help": "subspace: initial inner lr of the residual r (0: none)"})
    resid_l2: float = field(default=0.0, metadata={"help": "subspace + residual: L2 pull of r to 0 in the inner loss"})
    keep_basis: bool = field(default=False, metadata={"help": "init_from a subspace init: keep its w0, b0, basis, rates"})
    basis_rank: int = field(default=16, metadata={"help": "subspace: rank r of the head basis"})
    basis_records: int = field(default=128, metadata={"help": "subspace: records per train user for the PCA init"})
    meta_lr: float = 2e-3
    lr_meta_lr: float = 1e-2  # outer lr of the Meta-SGD log learning rates
    meta_batch: int = 4
    k_choices: list[int] = field(default_factory=lambda: [4, 8, 16])
    n_query: int = 24
    steps: int = 300
    val_every: int = 30
    val_k: int = 8
    val_query: int = 48
    ckpt_every: int = 25
    seed: int = 0
    holdout_test: int = 20
    holdout_val: int = 10
    split_seed: int = 0
    max_seconds: float | None = None
    init_from: str | None = field(default=None, metadata={"help": "start LoRA + head from this reward init dir"})
    encoder_layers: int | None = field(default=None, metadata={"help": "use only the encoder's first N layers"})
    lora_layers: list[int] | None = field(default=None, metadata={"help": "LoRA only on these layer indices"})
    standardise: bool = field(default=False, metadata={"help": "standardise pooled features (statistics of the "
                                                               "train users' basis_records records, label-free)"})

    def reward_config(self) -> Any:
        """The reward model's set-up these options ask for."""
        from metarlhf.reward import RewardConfig

        return RewardConfig(encoder_layers=self.encoder_layers, lora_layers=self.lora_layers,
                            standardise=self.standardise)

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown meta-learning algorithm {self.algo!r}; choose from {', '.join(ALGOS)}")
        if self.inner not in ("head", "all", "subspace"):
            raise ConfigError(f"inner must be 'head', 'all' or 'subspace', got {self.inner!r}")
        if self.first_order and self.algo == "maml":
            raise ConfigError("--first-order with maml is fomaml; pass --algo fomaml")
        for name in ("inner_steps", "meta_batch", "n_query", "steps", "val_every", "ckpt_every", "val_k",
                     "basis_rank", "basis_records"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_lr_head", "inner_lr_bias", "inner_lr_lora", "inner_lr_z", "meta_lr", "lr_meta_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # the inner rates are stored as logs
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        for name in ("inner_lr_r", "resid_l2"):  # inner_lr_r = 0: no residual
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.max_seconds is not None and not (self.max_seconds >= 0 and math.isfinite(self.max_seconds)):
            raise ConfigError(f"max_seconds must be a finite number >= 0 (0: checkpoint before the first step; "
                              f"leave it out for no limit), got {self.max_seconds}")
        for name in ("holdout_test", "holdout_val"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.inner_lr_r > 0 and self.inner != "subspace":
            raise ConfigError("inner_lr_r (a residual outside the head subspace) needs inner='subspace'")
        if self.keep_basis and (self.inner != "subspace" or self.init_from is None):
            raise ConfigError("keep_basis needs inner='subspace' and init_from")
        if not self.k_choices or min(self.k_choices) < 1:
            raise ConfigError(f"k_choices must be positive, got {self.k_choices}")
        self.reward_config()  # checks encoder_layers / lora_layers


def pca_head_basis(heads: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean head and scaled principal directions of per-user heads. Pure.

    heads: [n, d + 1] (weights, then bias). Returns ``w0`` [1, d] (mean weight),
    ``b0`` [1] (mean bias) and ``basis`` [r, d] whose row i is ``s_i / sqrt(n - 1) * v_i``
    (v_i the i-th right singular vector of the centred weights, sign fixed so its largest
    entry is positive), i.e. the heads' standard deviation along v_i.
    """
    n, d1 = heads.shape
    if n < 2:
        raise DataError(f"need >= 2 user heads for a basis, got {n}")
    if not 1 <= rank <= min(n - 1, d1 - 1):
        raise ConfigError(f"basis rank must be in [1, {min(n - 1, d1 - 1)}] for {n} users, got {rank}")
    w, b = heads[:, :-1], heads[:, -1]
    w0 = w.mean(0)  # [d]
    _, s, vt = torch.linalg.svd(w - w0, full_matrices=False)  # vt: [min(n, d), d]
    v = vt[:rank]
    sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))  # [r, 1]
    basis = v * sign * (s[:rank] / math.sqrt(n - 1)).unsqueeze(1)  # [r, d]
    return w0.unsqueeze(0), b.mean().reshape(1), basis


def fit_user_heads(model: Any, users: dict[str, list], ids: list[str], n_records: int, seed: int = 0,
                   progress: bool = False, params: Params | None = None) -> torch.Tensor:
    """L2 logistic heads (C=1) of each user on ``n_records`` of their records. -> [n, d + 1].

    Features: the encoder with the LoRA of ``params`` (default: the plain base encoder).
    """
    from tqdm import tqdm

    from metarlhf.evaluate_reward import fit_logistic_regression, pair_features

    base = params if params is not None else model.fresh_params(seed)  # fresh: lora_B = 0, the plain encoder
    rng = random.Random(f"basis:{seed}")
    heads = []
    for u in tqdm(ids, disable=not progress, desc="user heads for the basis"):
        recs = list(users[u])
        rng.shuffle(recs)
        enc = model.encode_records(recs[:n_records])
        with torch.no_grad():
            emb = model.embed_ids(enc.ids, base, batch_size=64)  # [n, d]
        x, y = pair_features(emb, enc)
        heads.append(fit_logistic_regression(x, y))
    return torch.stack(heads)


def split_persona_users(user_ids: list[str], holdout_test: int, holdout_val: int, seed: int = 0) -> dict[str, list[str]]:
    """Deterministic disjoint train / val / test user split (test first, so it is stable)."""
    from metarlhf.data import split_users

    if holdout_test + holdout_val >= len(user_ids):
        raise DataError(f"cannot hold out {holdout_test} test + {holdout_val} validation of {len(user_ids)} users")
    rest, test = split_users(user_ids, holdout_test, seed=seed) if holdout_test else (sorted(user_ids), [])
    train, val = split_users(rest, holdout_val, seed=seed + 1) if holdout_val else (rest, [])
    return {"train": train, "val": val, "test": test, "seed": seed}


def _task_loss_fns(model: Any, cfg: MetaTrainConfig) -> tuple[Callable, Callable, Callable]:
    """support_loss, query_loss and a per-task preparation for the reward model."""
    from metarlhf.reward import RewardModel, records_loss, residual_penalty

    def prepare(params: Params, support: Any, query: Any) -> dict[str, Any]:
        task: dict[str, Any] = {"support": support, "query": query}
        if cfg.inner in ("head", "subspace"):  # one encoder pass for support + query, in the graph of LoRA
            emb = model.embed_ids(support.ids + query.ids, params)  # [ns + nq, hidden]
            task["emb_s"], task["emb_q"] = emb[: len(support.ids)], emb[len(support.ids):]
        return task

    def support_loss(p: Params, task: dict[str, Any]) -> torch.Tensor:
        if cfg.inner in ("head", "subspace"):
            return (records_loss(RewardModel.head_scores(p, task["emb_s"]), task["support"])
                    + residual_penalty(p, cfg.resid_l2))
        return records_loss(RewardModel.head_scores(p, model.embed_ids(task["support"].ids, p)), task["support"])

    def query_loss(p: Params, task: dict[str, Any]) -> torch.Tensor:
        if cfg.inner in ("head", "subspace"):
            return records_loss(RewardModel.head_scores(p, task["emb_q"]), task["query"])
        return records_loss(RewardModel.head_scores(p, model.embed_ids(task["query"].ids, p)), task["query"])

    return prepare, support_loss, query_loss


def _sample_tasks(model: Any, users: dict[str, list], ids: list[str], cfg: MetaTrainConfig, step: int) -> list:
    from metarlhf.data import make_task

    rng = random.Random(f"{cfg.seed}:{step}")  # per-step RNG: resuming replays the same tasks
    out = []
    for _ in range(cfg.meta_batch):
        u = rng.choice(ids)
        k = rng.choice(cfg.k_choices)
        t = make_task(u, users[u], k, seed=rng.randrange(1 << 30), max_query=cfg.n_query)
        out.append((model.encode_records(t.support), model.encode_records(t.query)))
    return out


def evaluate_users(model: Any, params: Params, log_lrs: Params, users: dict[str, list], ids: list[str],
                   k: int, n_query: int, steps: int, inner: str, seed: int = 0, resid_l2: float = 0.0) -> float:
    """Mean query accuracy after adapting from ``params`` on K support records per user."""
    from metarlhf.data import make_task
    from metarlhf.reward import adapt_params, records_accuracy

    accs = []
    for u in ids:
        t = make_task(u, users[u], k, seed=seed, max_query=n_query)
        adapted, _ = adapt_params(model, model.encode_records(t.support), params, log_lrs, steps, inner, seed,
                                  resid_l2=resid_l2)
        q = model.encode_records(t.query)
        with torch.no_grad():
            scores = model.head_scores(adapted, model.embed_ids(q.ids, adapted))
        accs.append(records_accuracy(scores, q))
    return sum(accs) / max(1, len(accs))


def _adam_state_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params, strict=True):
        st = opt.state.get(p)
        if st:
            out[f"opt.exp_avg.{name}"] = st["exp_avg"]
            out[f"opt.exp_avg_sq.{name}"] = st["exp_avg_sq"]
            out[f"opt.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    return out


def _load_adam_state(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params, strict=True):
        if f"opt.exp_avg.{name}" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(tensors[f"opt.step.{name}"][0])),
                "exp_avg": tensors[f"opt.exp_avg.{name}"].clone(),
                "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"].clone(),
            }


#: What :func:`meta_train_reward` writes into its checkpoint directory.
CHECKPOINT_FILES = frozenset({"state.json", "state.safetensors", "metrics.jsonl"})


def _is_checkpoint_dir(path: Path) -> bool:
    """Whether directory ``path`` holds nothing but :data:`CHECKPOINT_FILES` (or interrupted
    atomic writes of them, ``.<name>.<random>.tmp``)."""
    from metarlhf.io import temp_target_name

    return all(temp_target_name(e.name) in CHECKPOINT_FILES and e.is_file() and not e.is_symlink()
               for e in path.iterdir())


def checkpoint_dir(out: str | Path, ckpt_dir: str | Path | None = None) -> Path:
    """The checkpoint directory of :func:`meta_train_reward`: ``ckpt_dir``, or ``<out>.ckpt``."""
    out = Path(out)
    return Path(ckpt_dir) if ckpt_dir is not None else out.with_name(out.name + ".ckpt")


def check_checkpoint_dir(out: str | Path, ckpt_dir: str | Path | None = None) -> Path:
    """Raise :class:`ConfigError` unless :func:`meta_train_reward` may write its checkpoints to
    ``ckpt_dir`` (default ``<out>.ckpt``): missing, empty, or holding only an earlier run's
    ``state.json``, ``state.safetensors`` and ``metrics.jsonl``; not ``out``, inside it, or
    holding it. Returns the checkpoint directory."""
    from metarlhf.io import check_apart, check_output_dir

    ckpt = checkpoint_dir(out, ckpt_dir)
    check_apart(out, ckpt, "checkpoint directory", "--checkpoint-dir")
    check_output_dir(ckpt, _is_checkpoint_dir, what="a `meta-train reward` checkpoint directory (state.json, "
                                                   "state.safetensors, metrics.jsonl)")
    return ckpt


def _read_state(ckpt: Path) -> dict[str, Any]:
    """The ``state.json`` of checkpoint ``ckpt``; DataError if missing, ModelError if unreadable or malformed."""
    state_file = ckpt / "state.json"
    if not state_file.is_file():
        raise DataError(f"--resume: no checkpoint at {state_file}")
    try:
        state = json.loads(state_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"checkpoint {state_file} is unreadable: {e}") from e

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)
            and all(number(state.get(k)) for k in ("step", "best_val", "best_step"))
            and number(state.get("elapsed", 0.0)) and float(state["step"]).is_integer() and state["step"] >= 0):
        raise ModelError(f"checkpoint {state_file} is malformed: expected an object with step, best_val, best_step "
                         "and config, as `meta-train reward` writes")
    return state


def meta_train_reward(data: str | Path, out: str | Path, cfg: MetaTrainConfig, encoder_dir: str | Path | None = None,
                      resume: bool = False, ckpt_dir: str | Path | None = None, progress: bool = True,
                      device: str = "cpu", model: Any = None, skip_invalid: bool = False) -> dict[str, Any]:
    """Meta-train a reward init on the users in ``data``; writes an init adapter to ``out``.

    ``skip_invalid``: skip malformed lines of ``data`` (counted, with a warning) instead of
    stopping at the first (see :func:`metarlhf.data.load_records`).

    The encoder, the meta-parameters and the optimiser state live on ``device`` (a
    ``torch.device`` string; the CLI resolves ``auto``); files are written from the CPU.
    ``model``: an already-built :class:`~metarlhf.reward.RewardModel` (e.g. a subclass
    that caches a frozen part of the encoder) used instead of loading ``encoder_dir``;
    its adapter is reset to a fresh one, and ``device`` is ignored.

    Checkpoints (safetensors: meta-params, log-lrs, Adam state, best params; JSON: step,
    best validation, config) and ``metrics.jsonl`` go to ``ckpt_dir`` (default
    ``<out>.ckpt``). ``resume`` continues from there with the same task sequence.
    The output directory is written atomically at the end, with ``split.json`` and
    ``metrics.jsonl`` next to the adapter files.
    """
    from tqdm import tqdm

    from metarlhf.adapters import save_adapter
    from metarlhf.data import group_by_user, load_records, records_digest
    from metarlhf.io import atomic_write_json, check_tensors, load_tensors, save_tensors
    from metarlhf.reward import (
        BASIS_KEY,
        HEAD_KEYS,
        INIT_KIND,
        R_KEY,
        STATS_KEYS,
        SUBSPACE_INNER_KEYS,
        Z_KEY,
        EncodedRecords,
        fold_z,
        load_reward_model,
    )

    t_start = time.perf_counter()
    out = Path(out)
    ckpt = check_checkpoint_dir(out, ckpt_dir)  # before anything is read or written: never another's files
    state = None
    if resume:  # its state.json before the data and the model (the tensors need the model's parameters)
        state = _read_state(ckpt)
        volatile = ("steps", "max_seconds", "val_every", "ckpt_every")
        saved = asdict(MetaTrainConfig()) | state["config"]  # options added since the checkpoint: defaults
        if {k: v for k, v in saved.items() if k not in volatile} != {
            k: v for k, v in asdict(cfg).items() if k not in volatile
        }:
            raise ConfigError(f"--resume: checkpoint {ckpt} was made with a different configuration")
    records, _ = load_records(data, skip_invalid=skip_invalid)
    users = group_by_user(records)
    split = split_persona_users(sorted(users), cfg.holdout_test, cfg.holdout_val, cfg.split_seed)
    # what the run learns from and validates on: every user's records but the test users'
    data_sha256 = records_digest(r for u in sorted(users) if u not in split["test"] for r in users[u])
    if state is not None:  # a checkpoint written before these were recorded is not checked on them
        if state.get("split") not in (None, split):
            raise ConfigError(f"--resume: checkpoint {ckpt} was made with another user split (other users in --data)")
        if state.get("data_sha256") not in (None, data_sha256):
            raise ConfigError(f"--resume: checkpoint {ckpt} was trained on other records (--data changed); resume "
                              "with the same data, or rerun without --resume")
    need = max(cfg.k_choices) + 1
    small = [u for u in split["train"] if len(users[u]) < need]
    if small:
        raise DataError(f"user {small[0]!r} has {len(users[small[0]])} records; meta-training needs >= {need} per user")
    if model is None:
        model = load_reward_model(encoder_dir, adapter_dir=None, config=cfg.reward_config(), device=device)
    elif (why := model.config.encoder_mismatch(cfg.reward_config())) is not None:
        raise ConfigError(f"the model passed is set up differently from the configuration: {why}")
    second_order = cfg.algo == "maml" or (cfg.algo == "metasgd" and not cfg.first_order)
    if cfg.inner == "all" and second_order:
        # the gradient goes through the encoder's backward, which SDPA's fused CPU kernel
        # cannot differentiate again ("derivative ... not implemented"): plain attention can
        model.peft.get_base_model().set_attn_implementation("eager")
    dev = model.device
    model.set_params(model.fresh_params(cfg.seed))  # never start from a shipped init
    torch.manual_seed(cfg.seed)
    init = model.fresh_params(cfg.seed)
    if cfg.init_from is not None:  # warm start: LoRA + head of an earlier init (its basis is not reused)
        # standardise: the warm init's feature statistics are taken too
        prev, warm, warm_lrs = model.read_adapter(cfg.init_from, kinds=(INIT_KIND,), load_stats=True)
        if prev.meta.get("split") not in (None, split):  # its train users must not include our val/test users
            raise ConfigError(f"--init-from {cfg.init_from} was meta-trained on another user split")
        init = {k: v for k, v in warm.items() if k != BASIS_KEY}
        if cfg.keep_basis and (BASIS_KEY not in warm or warm[BASIS_KEY].shape[0] != cfg.basis_rank):
            raise ConfigError(f"--keep-basis: {cfg.init_from} has no head basis of rank {cfg.basis_rank}")
    elif cfg.standardise and not resume:  # label-free statistics of the train users' records
        rng = random.Random(f"stats:{cfg.seed}")
        sample = [r for u in split["train"] for r in rng.sample(users[u], min(cfg.basis_records, len(users[u])))]
        t0 = time.perf_counter()
        model.fit_feature_stats(model.encode_records(sample).ids)
        log.info("feature statistics from %d records in %.1fs", len(sample), time.perf_counter() - t0)
    keys = list(init)
    head_keys = list(HEAD_KEYS)
    if cfg.inner == "subspace":
        if cfg.keep_basis:  # the warm init's own subspace (head.weight / head.bias are its w0 / b0)
            w0, b0, basis = init["head.weight"], init["head.bias"], warm[BASIS_KEY]
        elif not resume:  # the PCA start (a resumed run reads its parameters from the checkpoint)
            t0 = time.perf_counter()
            heads = fit_user_heads(model, users, split["train"], cfg.basis_records, cfg.seed, progress, params=init)
            w0, b0, basis = pca_head_basis(heads, cfg.basis_rank)
            log.info("head basis from %d train users in %.1fs", len(heads), time.perf_counter() - t0)
        else:
            w0, b0 = init["head.weight"], init["head.bias"]
            basis = torch.zeros(cfg.basis_rank, model.hidden_size, device=dev)
        init |= {"head.weight": w0, "head.bias": b0, BASIS_KEY: basis, Z_KEY: torch.zeros(cfg.basis_rank, device=dev)}
        adapt_keys = list(SUBSPACE_INNER_KEYS)
        lrs = {Z_KEY: cfg.inner_lr_z, "head.bias": cfg.inner_lr_bias}
        if cfg.inner_lr_r > 0:  # subspace + residual: r [hidden] starts at 0
            init[R_KEY] = torch.zeros(model.hidden_size, device=dev)
            adapt_keys.append(R_KEY)
            lrs[R_KEY] = cfg.inner_lr_r
        if cfg.keep_basis:  # the warm init's learned rates where it has them (tensors: MetaLearner takes logs)
            lrs = {k: (torch.exp(warm_lrs[k]) if k in warm_lrs else v) for k, v in lrs.items()}
    else:
        adapt_keys = head_keys if cfg.inner == "head" else keys
        lrs = ({k: cfg.inner_lr_lora for k in adapt_keys}
               | {"head.weight": cfg.inner_lr_head, "head.bias": cfg.inner_lr_bias})
    learner = MetaLearner(init, cfg.algo, lrs, adapt_keys, first_order=cfg.first_order or None)
    names = list(learner.params) + ([f"log_lr.{k}" for k in learner.log_lrs] if cfg.algo == "metasgd" else [])
    groups = [{"params": list(learner.params.values()), "lr": cfg.meta_lr}]
    if cfg.algo == "metasgd":
        groups.append({"params": list(learner.log_lrs.values()), "lr": cfg.lr_meta_lr})
    opt = torch.optim.Adam(groups)
    step, best_val, best_step = 0, -1.0, 0
    best: Params = {k: v.detach().clone() for k, v in learner.params.items()}
    best_lrs: Params = {k: v.detach().clone() for k, v in learner.log_lrs.items()}
    if state is not None:
        tensors_file = ckpt / "state.safetensors"
        try:
            tensors = load_tensors(tensors_file, device=str(dev))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
            raise ModelError(f"checkpoint {tensors_file} is unreadable: {e}") from e
        want = {f"{prefix}.{k}": v.shape for k, v in learner.params.items() for prefix in ("param", "best")}
        want |= {f"{prefix}.{k}": v.shape for k, v in learner.log_lrs.items() for prefix in ("log_lr", "best_log_lr")}
        check_tensors(tensors, want, tensors_file, "made with another encoder?")
        with torch.no_grad():
            for k in learner.params:
                learner.params[k].copy_(tensors[f"param.{k}"])
                best[k] = tensors[f"best.{k}"]
            for k in learner.log_lrs:
                learner.log_lrs[k].copy_(tensors[f"log_lr.{k}"])
                best_lrs[k] = tensors[f"best_log_lr.{k}"]
        for name, p in zip(names, [p for g in opt.param_groups for p in g["params"]], strict=True):
            if f"opt.exp_avg.{name}" in tensors and not (
                    f"opt.step.{name}" in tensors and f"opt.exp_avg_sq.{name}" in tensors
                    and tuple(tensors[f"opt.exp_avg.{name}"].shape) == tuple(p.shape)
                    and tuple(tensors[f"opt.exp_avg_sq.{name}"].shape) == tuple(p.shape)):
                raise ModelError(f"checkpoint {tensors_file}: the optimiser state of {name} is incomplete or of "
                                 "another shape")
        _load_adam_state(opt, names, tensors)
        if cfg.standardise and cfg.init_from is None:
            if missing := [k for k in STATS_KEYS if f"stats.{k}" not in tensors]:
                raise ModelError(f"checkpoint {tensors_file} lacks the feature statistics stats.{missing[0]}")
            model.check_feature_stats({k: tensors[f"stats.{k}"] for k in STATS_KEYS}, str(ckpt), load=True)
        step, best_val, best_step = int(state["step"]), float(state["best_val"]), int(state["best_step"])
        t_start -= state.get("elapsed", 0.0)
        log.info("resumed from %s at step %d", ckpt, step)
    ckpt.mkdir(parents=True, exist_ok=True)
    metrics_path = ckpt / "metrics.jsonl"
    prepare, support_loss, query_loss = _task_loss_fns(model, cfg)

    def save_ckpt() -> None:
        t = {f"param.{k}": v for k, v in learner.params.items()}
        t |= {f"log_lr.{k}": v for k, v in learner.log_lrs.items()}
        t |= {f"best.{k}": v for k, v in best.items()} | {f"best_log_lr.{k}": v for k, v in best_lrs.items()}
        t |= _adam_state_tensors(opt, names)
        t |= {f"stats.{k}": v for k, v in model.feature_stats().items()}
        save_tensors(ckpt / "state.safetensors", t)
        atomic_write_json(ckpt / "state.json", {"step": step, "best_val": best_val, "best_step": best_step,
                                                 "config": asdict(cfg), "elapsed": time.perf_counter() - t_start,
                                                 "split": split, "data_sha256": data_sha256})

    def validate() -> float:
        if not split["val"]:
            return float("nan")
        return evaluate_users(model, fold_z({k: v.detach() for k, v in learner.params.items()}),
                              {k: v.detach() for k, v in learner.log_lrs.items()}, users, split["val"],
                              cfg.val_k, cfg.val_query, cfg.inner_steps, cfg.inner, seed=12345, resid_l2=cfg.resid_l2)

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"meta-train {cfg.algo}")
    # a fresh run starts its own metrics (it replaces an earlier run's checkpoint there too);
    # a resumed one carries on the file
    with open(metrics_path, "a" if state is not None else "w") as mf:
        if step == 0:  # the starting point, for reference
            mf.write(json.dumps({"step": 0, "val_acc": round(validate(), 4)}) + "\n")
        while step < cfg.steps:
            if cfg.max_seconds is not None and time.perf_counter() - t_start > cfg.max_seconds:
                log.info("stopping at step %d: --max-seconds reached", step)
                break
            t0 = time.perf_counter()
            tasks = _sample_tasks(model, users, split["train"], cfg, step)
            prepared = []
            for s, q in tasks:
                if cfg.algo == "reptile":  # Reptile adapts on all of the task's data
                    both = EncodedRecords(s.ids + q.ids, torch.cat([s.thumb_idx, q.thumb_idx + len(s.ids)]),
                                          torch.cat([s.thumb_labels, q.thumb_labels]),
                                          torch.cat([s.chosen_idx, q.chosen_idx + len(s.ids)]),
                                          torch.cat([s.rejected_idx, q.rejected_idx + len(s.ids)]))
                    s = both
                prepared.append(prepare(learner.params, s, q))
            grads, qloss_val = meta_gradients(learner, prepared, cfg.inner_steps, support_loss, query_loss)
            opt.zero_grad()
            for p, g in zip(learner.meta_parameters(), grads, strict=True):
                p.grad = g
            opt.step()
            step += 1
            rec: dict[str, Any] = {"step": step, "query_loss": round(qloss_val, 5),
                                   "seconds": round(time.perf_counter() - t0, 3)}
            if step % cfg.val_every == 0 or step == cfg.steps:
                val = validate()
                rec["val_acc"] = round(val, 4)
                if val > best_val:
                    best_val, best_step = val, step
                    best = {k: v.detach().clone() for k, v in learner.params.items()}
                    best_lrs = {k: v.detach().clone() for k, v in learner.log_lrs.items()}
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            bar.update(1)
            bar.set_postfix(q=f"{qloss_val:.3f}", val=f"{best_val:.3f}")
            if step % cfg.ckpt_every == 0:
                save_ckpt()
    bar.close()
    if best_val < 0:  # never validated (e.g. stopped early): validate now
        val = validate()
        best_val, best_step = val, step
        best = {k: v.detach().clone() for k, v in learner.params.items()}
        best_lrs = {k: v.detach().clone() for k, v in learner.log_lrs.items()}
    save_ckpt()
    wall = time.perf_counter() - t_start
    final_lrs = best_lrs  # fixed (maml, fomaml, reptile) or learned (metasgd) inner lrs
    meta = {"kind": INIT_KIND, "name": f"meta-{cfg.algo}", "init": "meta", "algo": cfg.algo, "inner": cfg.inner,
            "inner_steps": cfg.inner_steps, "steps": step, "best_step": best_step, "val_acc": best_val,
            "meta_config": asdict(cfg), "split": split, "data": str(data), "data_sha256": data_sha256,
            "wall_seconds": round(wall, 1)}
    if cfg.init_from is not None:  # the warm start's own provenance, so the total cost stays visible
        from metarlhf.adapters import read_meta

        prev_meta = read_meta(cfg.init_from)
        meta["warm_start"] = {k: prev_meta.get(k) for k in ("name", "algo", "inner", "steps", "best_step",
                                                            "val_acc", "wall_seconds", "split")}
    meta |= {"basis_rank": cfg.basis_rank} if cfg.inner == "subspace" else {}
    if cfg.inner_lr_r > 0:
        meta |= {"inner_residual": True, "inner_resid_l2": cfg.resid_l2}
    adapter = model.make_adapter(fold_z(best), meta, log_lrs=final_lrs)
    extra = {"split.json": (json.dumps(split, indent=2) + "\n").encode(), "metrics.jsonl": metrics_path.read_bytes()}
    save_adapter(out, adapter, extra_files=extra)
    return {"out": str(out), "steps": step, "best_val": best_val, "best_step": best_step, "wall_seconds": wall}

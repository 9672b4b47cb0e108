"""Few-shot evaluation of the personalised reward model.

For every evaluated user and seed, a fixed query set of up to ``max_query`` of the
user's records is drawn; for each K a balanced support set of K records is drawn from
the *other* records. Each method adapts on the support set and is scored on the query
set (thumbs: sign of the score; pairs: chosen above rejected):

* ``base``    the init's reward model with no personalisation (what a new user gets);
* ``linear``  L2-regularised logistic regression (C=1, L-BFGS to convergence) on the
              frozen base encoder's pooled embeddings (no LoRA);
* ``scratch`` a fresh LoRA + zero head, ``steps`` Adam steps (lr 1e-2);
* ``meta``    the meta-init, ``steps`` inner steps with its meta-learned learning rates
              (and, for a subspace + residual init, its residual rate and L2 pull).

``scratch`` and ``meta`` get the same step budget (default: the init's inner steps).
Encoder embeddings that do not depend on the support set (base encoder, and the
meta-init's LoRA when its inner loop adapts the head or its subspace only) are computed once per
record and reused across K and seeds; that changes nothing in the numbers.

Output: ``out`` is ``{"methods": {m: {K: acc}}, "users": n, "query_per_user": q,
"constant": c, "software": {...}}``:

* ``constant``: the accuracy of the best score that ignores the text, on the same query sets
  (:func:`constant_accuracy`: each query set's own majority thumbs label, so an upper bound
  for any constant). With unbalanced thumbs a method is only as good as its margin over it.
* ``auc``: ``{m: {K: ...}}``, how well each method *orders* the pooled query records whatever
  its threshold (:func:`metarlhf.reward.records_auc`; 1/2 for a constant; means over the draws
  where it is defined, per draw in the detail file's ``auc_per_user``).
* ``software`` (:func:`metarlhf.runtime.software_versions`): what decided the numbers.

``<out>.png`` (accuracy vs K) and ``<out stem>.detail.json`` (per-user numbers, timings, the
split) are written next to it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metarlhf.data import Record
from metarlhf.errors import AdapterError, ConfigError, DataError

log = logging.getLogger(__name__)

METHODS = ("base", "linear", "scratch", "meta")


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 100) -> torch.Tensor:
    """L2-regularised logistic regression, sklearn's objective: ``0.5|w|^2 + C * sum BCE``.

    x: [n, d], y: [n] in {0, 1}. Returns ``[d + 1]`` (weights, then the unpenalised bias).
    """
    x = x.detach().double()
    y = y.detach().to(x.device, torch.float64)
    wb = torch.zeros(x.shape[1] + 1, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([wb], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ wb[:-1] + wb[-1]
        loss = 0.5 * (wb[:-1] ** 2).sum() + c * torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return wb.detach().float()


class EmbeddingCache:
    """Embeddings of token sequences under one fixed parameter set."""

    def __init__(self, model: Any, params: dict[str, torch.Tensor]):
        self.model, self.params, self.cache = model, params, {}

    def __call__(self, ids: list[list[int]]) -> torch.Tensor:
        todo = [x for x in {tuple(x) for x in ids} if x not in self.cache]
        if todo:
            with torch.no_grad():
                emb = self.model.embed_ids([list(x) for x in todo], self.params, batch_size=64)
            self.cache.update(zip(todo, emb, strict=True))
        return torch.stack([self.cache[tuple(x)] for x in ids])


def constant_accuracy(records: Sequence[Record]) -> float:
    """Accuracy of the best score that ignores the text (``records_accuracy``'s rules): every
    thumbs record given the majority label of ``records``; a constant never ranks a pair chosen
    above rejected. A reward model that only learnt a user's base rate scores about this much."""
    from metarlhf.data import Thumbs

    ups = sum(r.label for r in records if isinstance(r, Thumbs))
    n_thumbs = sum(isinstance(r, Thumbs) for r in records)
    return max(ups, n_thumbs - ups) / max(1, len(records))


def pair_features(emb: torch.Tensor, enc: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Thumbs rows as (e, label); pairs as (e_chosen - e_rejected, 1) and the reverse as 0."""
    xs, ys = [emb[enc.thumb_idx]], [enc.thumb_labels.to(emb.device)]
    if len(enc.chosen_idx):
        d = emb[enc.chosen_idx] - emb[enc.rejected_idx]
        xs += [d, -d]
        ys += [torch.ones(len(d), device=emb.device), torch.zeros(len(d), device=emb.device)]
    return torch.cat(xs), torch.cat(ys)


def user_splits(user: str, recs: list, ks: list[int], seed: int, max_query: int) -> tuple[list, dict[int, list]]:
    """``eval reward``'s draws for one user and seed: ``(query records, {K: support task})``.

    Seeded by (user, seed) only, so benchmarks that call it score the same records.
    """
    from metarlhf.data import make_task

    rng = random.Random(f"eval:{user}:{seed}")
    order = list(range(len(recs)))
    rng.shuffle(order)
    n_query = min(max_query, len(recs) - max(ks) - 1)
    query = [recs[i] for i in order[:n_query]]
    pool = [recs[i] for i in order[n_query:]]
    return query, {k: make_task(user, pool, k, seed=seed).support for k in ks}


def evaluate_reward(
    data: str | Path,
    out: str | Path,
    users: list[str] | None = None,
    holdout: int | None = None,
    ks: list[int] | None = None,
    init: str | Path | None = None,
    encoder_dir: str | Path | None = None,
    seeds: int = 2,
    max_query: int = 200,
    steps: int | None = None,
    methods: list[str] | None = None,
    progress: bool = True,
    device: str = "cpu",
    model: Any = None,
    skip_invalid: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write ``out`` (+ PNG + detail JSON). Returns the summary dict.

    ``out`` must not end in ``.png`` (the plot is ``out`` with that suffix). ``skip_invalid``:
    malformed lines of ``data`` are skipped and counted (a warning) instead of an error.

    The reward model runs on ``device`` (a ``torch.device`` string). ``model``: an
    already-built :class:`~metarlhf.reward.RewardModel` to load the init into instead of
    loading ``encoder_dir`` (``device`` is then ignored)."""
    from tqdm import tqdm

    from metarlhf.data import group_by_user, load_records
    from metarlhf.io import atomic_write_json, check_results_out
    from metarlhf.meta import split_persona_users
    from metarlhf.reward import (
        R_KEY,
        SCRATCH_ADAM_LR,
        SHIPPED_INIT_DIR,
        RewardModel,
        adapt_head,
        adapt_params,
        load_reward_model,
        records_accuracy,
        records_auc,
    )
    from metarlhf.runtime import describe_device, software_versions

    ks = sorted(set(ks or [4, 8, 16, 32]))
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if min(ks) < 1 or seeds < 1 or max_query < 1:
        raise ConfigError("K, --seeds and --query must be >= 1")
    if holdout is not None and holdout < 1:
        raise ConfigError(f"--holdout must be >= 1 (the number of held-out test users), got {holdout}")
    if users is not None and not users:
        raise ConfigError("no users to evaluate")
    if steps is not None and steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {steps}")
    check_results_out(out, ("methods", "users"), "an earlier `eval reward` result",
                      {_detail_path(out): ("per_user",)})
    init_dir = Path(init) if init is not None else SHIPPED_INIT_DIR
    if not (init_dir / "metarlhf.json").is_file():
        raise AdapterError(f"{init_dir}: no reward init (metarlhf.json missing)")
    records, _ = load_records(data, skip_invalid=skip_invalid)
    by_user = group_by_user(records)
    if model is None:
        model = load_reward_model(encoder_dir, adapter_dir=init_dir, device=device)
    else:
        model.load_adapter_dir(init_dir)
    meta = model.init_meta
    split = meta.get("split") or {}
    if users is None:
        if holdout is None:
            raise ConfigError("pass --users FILE or --holdout N")
        mc = meta.get("meta_config", {})
        split_seed = int(split.get("seed", 0))
        test = split_persona_users(sorted(by_user), holdout, 0, split_seed)["test"]
        if mc and holdout == mc.get("holdout_test") and split.get("test") and test != split["test"]:
            log.warning("the held-out users differ from the init's recorded test split")
        users = test
    missing = [u for u in users if u not in by_user]
    if missing:
        raise DataError(f"user {missing[0]!r} has no records in {data}")
    need = max(ks) + 2
    small = [u for u in users if len(by_user[u]) < need]
    if small:
        raise DataError(f"K={max(ks)} but user {small[0]!r} has only {len(by_user[small[0]])} records (need {need})")
    seen = sorted(set(users) & set(split.get("train", [])) | set(users) & set(split.get("val", [])))
    if seen and "meta" in methods:
        log.warning("%d evaluated user(s) were seen in meta-training/validation, e.g. %s", len(seen), seen[0])
    n_steps = int(meta.get("inner_steps", 3)) if steps is None else steps
    inner = meta.get("inner", "head")
    resid_l2 = float(meta.get("inner_resid_l2", 0.0))
    meta_params = model.adapter_params()
    log_lrs = model.inner_log_lrs
    base_params = model.fresh_params(0)  # lora_B = 0: the plain encoder
    base_emb = EmbeddingCache(model, base_params)
    meta_emb = EmbeddingCache(model, meta_params)

    acc: dict[str, dict[int, list[float]]] = {m: {k: [] for k in ks} for m in methods}
    constant_per_user: dict[str, list[float]] = {}
    auc_per_user: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    per_user: dict[str, Any] = {}
    timing: dict[str, float] = {m: 0.0 for m in methods}
    t_all = time.perf_counter()
    total = len(users) * seeds
    bar = tqdm(total=total, disable=not progress, desc="eval reward")
    for u in users:
        per_user[u] = {m: {str(k): [] for k in ks} for m in methods}
        for seed in range(seeds):
            query, supports = user_splits(u, by_user[u], ks, seed, max_query)
            constant_per_user.setdefault(u, []).append(constant_accuracy(query))
            q = model.encode_records(query)
            for k in ks:
                s = model.encode_records(supports[k])
                for m in methods:
                    t0 = time.perf_counter()
                    if m == "base":
                        scores = RewardModel.head_scores(meta_params, meta_emb(q.ids))
                    elif m == "linear":
                        x, y = pair_features(base_emb(s.ids), s)
                        wb = fit_logistic_regression(x, y)
                        scores = base_emb(q.ids) @ wb[:-1] + wb[-1]
                    elif m == "meta" and inner in ("head", "subspace"):
                        adapted, _ = adapt_head(meta_emb(s.ids), s, meta_params, log_lrs, n_steps, resid_l2)
                        scores = RewardModel.head_scores(adapted, meta_emb(q.ids))
                    else:
                        if m == "meta":
                            adapted, _ = adapt_params(model, s, meta_params, log_lrs, n_steps, inner, seed,
                                                      resid_l2=resid_l2)
                        else:
                            adapted, _ = adapt_params(model, s, model.fresh_params(seed), {}, n_steps, seed=seed,
                                                      adam_lr=SCRATCH_ADAM_LR)
                        with torch.no_grad():
                            scores = RewardModel.head_scores(adapted, model.embed_ids(q.ids, adapted, 64))
                    a = records_accuracy(scores.detach(), q)
                    timing[m] += time.perf_counter() - t0
                    acc[m][k].append(a)
                    per_user[u][m][str(k)].append(a)
                    auc_per_user.setdefault(u, {}).setdefault(m, {}).setdefault(str(k), []).append(
                        records_auc(scores.detach(), q))
            bar.update(1)
    bar.close()
    summary = {
        "methods": {m: {str(k): round(sum(v) / len(v), 4) for k, v in acc[m].items()} for m in methods},
        "users": len(users),
        "query_per_user": min(max_query, min(len(by_user[u]) - max(ks) - 1 for u in users)),
        "constant": round(_mean(c for cs in constant_per_user.values() for c in cs), 4),
        "auc": {m: {str(k): _round(_mean(a for per in auc_per_user.values() for a in per[m][str(k)] if a is not None))
                    for k in ks} for m in methods},
        "software": software_versions(),
    }
    out = Path(out)
    atomic_write_json(out, summary)
    detail = {
        "per_user": per_user, "constant_per_user": constant_per_user, "auc_per_user": auc_per_user,
        "users": users, "seeds": seeds, "ks": ks, "steps": n_steps, "inner": inner,
        "inner_residual": R_KEY in log_lrs, "inner_resid_l2": resid_l2,
        "init": str(init_dir), "init_name": meta.get("name"), "encoder": model.base_model,
        "device": describe_device(model.device),
        "seen_in_meta_training": seen, "seconds_total": round(time.perf_counter() - t_all, 1),
        "seconds_per_method": {m: round(v, 1) for m, v in timing.items()}, "scratch_adam_lr": SCRATCH_ADAM_LR,
        "linear": "L2 logistic regression, C=1, L-BFGS, frozen base encoder embeddings",
    }
    atomic_write_json(_detail_path(out), detail)
    _plot(summary, out.with_suffix(".png"))
    return summary


def _mean(values: Any) -> float | None:
    """The mean of ``values`` (an iterable of floats), None when it is empty."""
    v = list(values)
    return sum(v) / len(v) if v else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _detail_path(out: str | Path) -> Path:
    """Where the per-user detail goes: ``<out stem>.detail.json`` next to ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".detail.json")


def _plot(summary: dict[str, Any], path: Path) -> None:
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metarlhf.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, by_k in summary["methods"].items():
        ks = sorted(by_k, key=int)
        ax.plot([int(k) for k in ks], [by_k[k] for k in ks], marker="o", label=m)
    if "constant" in summary:
        ax.axhline(summary["constant"], color="grey", linestyle=":", label="best constant")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (support records)")
    ax.set_ylabel("query accuracy")
    ax.set_title(f"reward few-shot accuracy ({summary['users']} users)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

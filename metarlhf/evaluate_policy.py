"""Few-shot policy personalization, measured on simulated users.

For each held-out simulated user and each K:

1. the user gives K thumbs on base-model samples: ``samples_per_prompt`` samples for
   each of the first ``ceil(K / samples_per_prompt)`` training prompts (the pool is
   sampled once and shared by all users; each user labels it with its own reward).
   Two exploration protocols (``explore``): ``plain`` samples the plain prompt;
   ``hints`` draws most samples with a style hint added to the prompt
   (:data:`metarlhf.policy.STYLE_HINTS`, a generic menu, in a seeded random order; every
   ``plain_every``-th sample is plain), as an app would show a new user varied answers.
   ``adaptive`` collects the thumbs in rounds and picks each sample's hint with a
   Thompson-sampling bandit over the menu (:func:`metarlhf.policy.explore_adaptive`;
   per user, since it depends on the user's answers; the simulated user labels every
   sample exactly as in the other protocols).
   The user rates (plain prompt, completion): the hint is never shown or trained on, so
   the adapter must produce the liked style from the plain prompt (context distillation);
2. the user's policy LoRA is adapted from each init (``meta``: the shipped meta-trained
   init, ``scratch``: peft's default init) with the same step budget; with
   ``distill_samples > 0`` it first draws that many extra samples in the style the
   thumbs liked (hint credit; ``+rank``: ranked by the user's personalized reward
   model) and adds them as thumbs up (:func:`metarlhf.policy.distill_records`);
3. on held-out prompts, one personalized completion and one base completion per prompt
   (same sampling seed, both on the plain prompt) are compared under the user's true
   reward. A win counts 1, a
   tie 1/2, a loss 0.

Reported per user and averaged over users: win rate against base, mean true reward
(personalized and base), adaptation wall time, and a fluency guard: the base model's
mean per-token NLL of the personalized and of the base completions (``nll_personal``,
``nll_base``). The true rewards score style only, so a recipe that wins by writing
gibberish shows up here as ``nll_personal`` far above ``nll_base``. Per answer, a
*fluency drop* is a personalized answer whose words are more than
:data:`FLUENCY_DROP_NATS` nats/token less likely than the base answer's
(``fluency_drop_rate``); ``fluent_win_rate`` counts every drop as a loss, and
``base_resample_fluency_drop_rate`` is the same rate for a second base sample. Two
figures catch answers that ignore the prompt (the true rewards cannot: a memorised
answer in the liked style wins on every prompt): ``relevance``, the mean
:func:`prompt_relevance` (nats/token the base model gains from the answer's own prompt
over another one; ``base_relevance`` for the base answers), and ``repeat_opening_rate``,
the share of answers whose first five words open another answer of the same user
(``base_repeat_opening_rate`` for base). ``loop_rate`` is the share of answers caught in a
decoding loop (:func:`repetition_loops`; ``base_loop_rate``), which the fluency drop misses,
and ``sound_win_rate`` counts an answer that is a fluency drop *or* a loop as a loss. The JSON is
rewritten after every (user, K, method) cell, so an interrupted run keeps what it
measured; a PNG plots the average win rate against K per method. Each row keeps its
per-prompt ``outcomes``; the summary's ``win_rate_ci95`` is a bootstrap interval over the
held-out prompts with the users fixed (:func:`bootstrap_ci`), ``win_rate_ci95_users``
resamples the users as well (wider with few users), and :func:`method_gaps` gives ``meta``
minus ``scratch`` with a paired interval. The base answers of ``win_rate`` are sampled with
the same seed as the personalized ones (``seed + 1``: common random numbers, which tend to
favour a small consistent gain); ``win_rate_vs_resample`` scores the personalized answers
against a second, independent base sample (``seed + 2``, ``base_resample_answers``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metarlhf.errors import ConfigError, DataError
from metarlhf.policy import EXPLORE_MODES, AdaptConfig

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [8, 16, 32])
    eval_prompts: int = 16
    samples_per_prompt: int = 2
    methods: list[str] = field(default_factory=lambda: ["meta", "scratch"])
    steps: int = AdaptConfig.steps
    lr: float = AdaptConfig.lr
    max_new_tokens: int = 48
    sample_temperature: float = 1.0  # base samples the user labels
    eval_temperature: float = 0.7  # completions compared on held-out prompts
    label_noise: float = 0.0
    seed: int = 0
    meta_init: str | None = None  # adapter dir for method "meta" (None: the shipped init)
    explore: list[str] = field(default_factory=lambda: ["hints", "plain"])  # exploration protocols
    plain_every: int = 4  # hints protocol: every n-th sample is plain
    kto_weight: float = 0.0  # the loss mix and layers default to AdaptConfig's
    sft_weight: float = 1.0
    pair_weight: float = 1.0
    train_layers: int = 15  # 0: all layers
    kl_weight: float = AdaptConfig.kl_weight  # fluency anchor (AdaptConfig.kl_weight)
    contrast_weight: float = AdaptConfig.contrast_weight  # prompt contrast (AdaptConfig.contrast_weight)
    distill_samples: int = 0  # extra self-generated thumbs up in the liked style (AdaptConfig.distill_samples)
    distill_hints: int = 1
    round_prompts: int = 2  # adaptive exploration: prompts per round after the first
    allow_seen: bool = False  # evaluate users / prompts an init was meta-trained on (check_init_overlap)

    def adapt_config(self) -> AdaptConfig:
        """The :class:`AdaptConfig` every method of this evaluation adapts with."""
        return AdaptConfig(steps=self.steps, lr=self.lr, max_completion_tokens=self.max_new_tokens,
                           kto_weight=self.kto_weight, sft_weight=self.sft_weight, pair_weight=self.pair_weight,
                           train_layers=self.train_layers, kl_weight=self.kl_weight,
                           contrast_weight=self.contrast_weight, distill_samples=self.distill_samples,
                           distill_hints=self.distill_hints)

    def __post_init__(self) -> None:
        if not self.explore or any(e not in EXPLORE_MODES for e in self.explore):
            raise ConfigError(f"explore must be a non-empty list of {' / '.join(map(repr, EXPLORE_MODES))}, got {self.explore}")
        if self.round_prompts < 1:
            raise ConfigError(f"round_prompts must be >= 1, got {self.round_prompts}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"K values must be >= 1, got {self.ks}")
        if not self.methods:
            raise ConfigError("no methods to evaluate")
        if self.samples_per_prompt < 2:
            raise ConfigError("samples_per_prompt must be >= 2 (a user rates samples side by side)")
        if self.eval_prompts < 1:
            raise ConfigError("eval_prompts must be >= 1")
        if not 0 <= self.label_noise <= 0.5:
            raise ConfigError(f"label_noise must be in [0, 0.5], got {self.label_noise}")


@dataclass(frozen=True)
class Method:
    """``<init>[+bon<N>|+ibon<N>][+aug<N>][+rank]``: init ``meta``/``scratch``/adapter dir, optional
    reward-model use."""

    name: str
    init: str
    best_of: int = 1  # best-of-N at inference, ranked by the user's personalized reward model
    augment: int = 0  # on-policy augmentation: N samples per support prompt labelled by the reward model
    rank: bool = False  # distilled samples: draw 2x, keep the half the personalized reward model ranks highest
    implicit: bool = False  # ibon<N>: best-of-N ranked by the adapter's own log-ratio (policy.implicit_scorer)

    @property
    def uses_reward(self) -> bool:
        return (self.best_of > 1 and not self.implicit) or self.augment > 0 or self.rank


def parse_method(text: str) -> Method:
    """Parse ``meta``, ``scratch+bon4``, ``meta+ibon8``, ``meta+aug4``, ``meta+rank``, ``/path/to/init+bon2`` ..."""
    parts = text.split("+")
    init, best_of, augment, rank, implicit = parts[0], 1, 0, False, False
    if not init:
        raise ConfigError(f"method {text!r}: empty init name")
    seen: set[str] = set()
    for opt in parts[1:]:
        m = re.fullmatch(r"rank|(i?bon|aug)([0-9]+)", opt)
        if m is None:
            raise ConfigError(f"method {text!r}: unknown option {opt!r} (use bon<N>, ibon<N>, aug<N> or rank)")
        kind = "rank" if opt == "rank" else "aug<N>" if m[1] == "aug" else "bon<N> / ibon<N>"
        if kind in seen:
            raise ConfigError(f"method {text!r}: give {kind} once at most")
        seen.add(kind)
        if opt == "rank":
            rank = True
        elif m[1] == "aug":
            augment = int(m[2])
        else:
            implicit, best_of = m[1] == "ibon", int(m[2])
    if best_of < 1 or ("aug<N>" in seen and augment < 2):
        raise ConfigError(f"method {text!r}: bon / ibon need N >= 1 and aug N >= 2")
    return Method(text, init, best_of, augment, rank, implicit)


def thumbs_rng(cfg: EvalConfig, user: Any) -> random.Random:
    """The random source of ``user``'s label noise in an evaluation seeded by ``cfg.seed``."""
    return random.Random(f"{cfg.seed}:{user.name}")


def adaptive_support(model: Any, tok: Any, user: Any, prompts: Sequence[str], k: int, cfg: EvalConfig,
                     rng: random.Random | None = None) -> tuple[list[Any], list[Any]]:
    """``user``'s K thumbs on ``prompts`` with adaptive exploration, as the evaluation draws
    them (:func:`metarlhf.policy.explore_adaptive`): ``(thumbs, hints)``."""
    from metarlhf.policy import explore_adaptive

    rng = thumbs_rng(cfg, user) if rng is None else rng

    def rate(p: str, cs: list[str]) -> list[Any]:
        return user.thumbs(p, cs, noise=cfg.label_noise, rng=rng)

    return explore_adaptive(model, tok, prompts, rate, k, cfg.samples_per_prompt, seed=cfg.seed,
                            round_prompts=cfg.round_prompts, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.sample_temperature)


def prompt_outcome(personal: float, base: float) -> float:
    """One prompt's score against base: a win 1, a tie 1/2, a loss 0."""
    return 1.0 if personal > base else 0.5 if personal == base else 0.0


def win_rate(personal: Sequence[float], base: Sequence[float]) -> float:
    """Share of prompts where the personalized reward beats base; ties count 1/2."""
    if len(personal) != len(base) or not personal:
        raise DataError("win_rate needs two equally long, non-empty reward lists")
    return sum(prompt_outcome(p, b) for p, b in zip(personal, base, strict=True)) / len(base)


def bootstrap_ci(groups: Sequence[Sequence[float]], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, resample_groups: bool = False) -> tuple[float, float]:
    """Percentile interval of the mean of group means, prompts resampled within each group.

    ``groups`` holds one list per user (its per-prompt outcomes, or per-prompt differences
    between two methods). The users are kept fixed and each user's prompts are drawn with
    replacement, so the interval says how far the average could move on other held-out
    prompts for these users; it does not cover other users. With ``resample_groups`` the
    users are drawn with replacement too (a two-stage bootstrap): how far it could move for
    other users like these, a wider interval with few users.
    """
    if not groups or any(not g for g in groups):
        raise DataError("bootstrap_ci needs at least one non-empty group")
    if not 0 < level < 1 or n_boot < 1:
        raise ConfigError("bootstrap_ci needs 0 < level < 1 and n_boot >= 1")
    rng = random.Random(seed)
    means = []
    for _ in range(n_boot):
        drawn = rng.choices(groups, k=len(groups)) if resample_groups else groups
        means.append(statistics.mean(statistics.mean(rng.choices(g, k=len(g))) for g in drawn))
    means.sort()
    tail = (1 - level) / 2
    return means[int(tail * (n_boot - 1))], means[math.ceil((1 - tail) * (n_boot - 1))]


def method_gaps(rows: Sequence[dict[str, Any]], a: str = "meta", b: str = "scratch") -> dict[str, dict[str, Any]]:
    """Win rate of method ``a`` minus method ``b``, per (explore, K), with a paired 95% interval.

    Rows of the two methods are paired by user; where every paired row holds its per-prompt
    ``outcomes`` (same prompts, same base answers), the interval comes from
    :func:`bootstrap_ci` on the per-prompt differences. Keys are ``"<explore>/k<K>"``.
    """
    out: dict[str, dict[str, Any]] = {}
    cells = sorted({(r.get("explore", "plain"), r["k"]) for r in rows if r["method"] == a})
    for explore, k in cells:
        def pick(m: str, explore: str = explore, k: int = k) -> dict[str, dict[str, Any]]:
            return {r["user"]: r for r in rows if r["method"] == m and r.get("explore", "plain") == explore
                    and r["k"] == k}
        ra, rb = pick(a), pick(b)
        users = sorted(set(ra) & set(rb))
        if not users:
            continue
        gap: dict[str, Any] = {"users": len(users),
                               "gap": statistics.mean(ra[u]["win_rate"] - rb[u]["win_rate"] for u in users)}
        if all("outcomes" in ra[u] and "outcomes" in rb[u] for u in users):
            diffs = [[x - y for x, y in zip(ra[u]["outcomes"], rb[u]["outcomes"], strict=True)] for u in users]
            gap["ci95"] = list(bootstrap_ci(diffs))
        out[f"{explore}/k{k}"] = gap
    return out


def base_nll(model: Any, tok: Any, prompts: Sequence[str], completions: Sequence[str], chunk: int = 8) -> float:
    """Mean per-token negative log-likelihood of ``completions`` under ``model`` (plain prompts).

    The fluency guard of the evaluation: ``model`` is the base model (no adapter). As in
    training, an EOS is scored after each completion and completions are cut at 64 tokens,
    so an answer cut at ``max_new_tokens`` pays for that EOS; personalized and base answers
    are treated alike.
    """
    return base_nll_rows(model, tok, prompts, completions, chunk)[1]


def base_nll_rows(model: Any, tok: Any, prompts: Sequence[str], completions: Sequence[str],
                  chunk: int = 8) -> tuple[list[float], float]:
    """Per-answer mean per-token NLL of the answer's *words* under ``model`` (the closing EOS
    left out, so a short answer is not charged for stopping early, which the base model
    rarely does; an empty answer gets +inf, i.e. always a fluency drop), and the
    token-weighted mean with the EOS (:func:`base_nll`)."""
    import torch

    from metarlhf.policy import encode_pairs, token_logps
    from metarlhf.runtime import model_device

    batch = encode_pairs(tok, list(prompts), list(completions), device=model_device(model))
    words = batch.comp_mask.clone()
    words[:, -1] = 0  # rows are right-aligned and end with the EOS: the last column
    with torch.no_grad():
        per_token = token_logps(model, batch, chunk)  # [n, C]
    logps, word_logps = (per_token * batch.comp_mask).sum(-1), (per_token * words).sum(-1)
    n_words = words.sum(-1)
    per_answer = torch.where(n_words > 0, -word_logps / n_words.clamp(min=1), torch.full_like(word_logps, math.inf))
    return per_answer.tolist(), float(-logps.sum() / batch.comp_mask.sum())


#: An answer whose words' base-model NLL is this many nats/token above the base answer's to the
#: same prompt counts as a fluency drop (a judgment call: 1 nat/token is e^1 = 2.7x less likely
#: per token).
FLUENCY_DROP_NATS = 1.0


def fluency_drops(nll_answers: Sequence[float], nll_base: Sequence[float],
                  drop: float = FLUENCY_DROP_NATS) -> list[bool]:
    """Per prompt: is the answer's NLL (:func:`base_nll_rows`) more than ``drop`` above base's?"""
    if len(nll_answers) != len(nll_base) or not nll_base:
        raise DataError("fluency_drops needs two equally long, non-empty NLL lists")
    return [a > b + drop for a, b in zip(nll_answers, nll_base, strict=True)]


def win_rate_without(personal: Sequence[float], base: Sequence[float], broken: Sequence[bool]) -> float:
    """Win rate (:func:`prompt_outcome`) with every ``broken`` answer counted as a loss."""
    if len(personal) != len(base) or len(personal) != len(broken) or not base:
        raise DataError("win_rate_without needs equally long, non-empty lists")
    return sum(0.0 if x else prompt_outcome(p, b) for p, b, x in zip(personal, base, broken, strict=True)) / len(base)


def fluent_win_rate(personal: Sequence[float], base: Sequence[float], nll_personal: Sequence[float],
                    nll_base: Sequence[float], drop: float = FLUENCY_DROP_NATS) -> tuple[float, float]:
    """``(win rate with every fluency drop counted as a loss, share of fluency drops)``."""
    if len(personal) != len(base) or len(personal) != len(nll_personal):
        raise DataError("fluent_win_rate needs equally long, non-empty lists")
    dropped = fluency_drops(nll_personal, nll_base, drop)
    return win_rate_without(personal, base, dropped), sum(dropped) / len(base)


def _words(text: str) -> list[str]:
    """The words of ``text``, lower-cased, punctuation stripped (empty ones dropped)."""
    return [t for t in ("".join(ch for ch in w.lower() if ch.isalnum()) for w in text.split()) if t]


def _has_loop(toks: Sequence[str], max_block: int) -> bool:
    for n in range(1, max_block + 1):
        for i in range(len(toks) - 2 * n + 1):
            c = 1  # back-to-back copies of toks[i:i+n]
            while toks[i + c * n:i + (c + 1) * n] == toks[i:i + n]:
                c += 1
            if (c >= 3 and n * c >= 6) or (c >= 2 and n >= 4):
                return True
    return False


def repetition_loops(completions: Sequence[str], max_block: int = 10) -> list[bool]:
    """Per answer: is it caught in a decoding loop? A block of ``n`` words (lower-cased,
    punctuation stripped; ``n <= max_block``) that comes back to back, either 3+ times over 6+
    words ("very, very, very, very, very, very", "I'm you. I'm you. I'm you.") or twice when the
    block has 4+ words ("I'm gonna see her. I'm gonna see her."). The fluency drop misses these:
    the base model finds a repeated phrase *likely*. A phrase that recurs with other words in
    between ("I'm a bit of a stubborn one ... I'm a bit of a pragmatist") is not a loop."""
    return [_has_loop(_words(text), max_block) for text in completions]


def prompt_relevance(model: Any, tok: Any, prompts: Sequence[str], completions: Sequence[str],
                     own_nll: Sequence[float] | None = None, chunk: int = 8) -> list[float]:
    """Per answer: how much more likely (nats/token of its words) ``model`` finds it after its
    own prompt than after the next *distinct* prompt of the list (cyclically,
    :func:`metarlhf.policy.contrast_prompts`), a pointwise mutual information between prompt
    and answer. An answer that ignores its prompt (a memorised
    template served for every question) scores about 0, an on-topic answer well above; an
    empty answer scores 0. ``own_nll``: :func:`base_nll_rows` of the answers under their own
    prompts, when already computed. Needs at least two distinct prompts."""
    from metarlhf.policy import contrast_prompts

    nxt = contrast_prompts(prompts)
    if len(prompts) != len(completions) or not nxt:
        raise DataError("prompt_relevance needs at least two distinct prompts, one answer each")
    own = list(own_nll) if own_nll is not None else base_nll_rows(model, tok, prompts, completions, chunk)[0]
    other = base_nll_rows(model, tok, [nxt[p] for p in prompts], completions, chunk)[0]
    return [o - w if math.isfinite(w) else 0.0 for w, o in zip(own, other, strict=True)]


def repeated_openings(completions: Sequence[str], words: int = 5) -> list[bool]:
    """Per answer: do its first ``words`` words (lower-cased, punctuation stripped) open
    another answer of the list too? Answers to different prompts that open alike are the
    visible face of a template; an empty answer never counts."""
    heads = [tuple(_words(c)[:words]) for c in completions]
    counts: dict[tuple[str, ...], int] = {}
    for h in heads:
        counts[h] = counts.get(h, 0) + 1
    return [bool(h) and counts[h] > 1 for h in heads]


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in result["summary"]})
    if len(ks) == 1:  # one K: bars per (method, protocol), one dot per user
        fig, ax = plt.subplots(figsize=(7, 4))
        cells = [(m, e) for e in result["config"].get("explore", ["plain"]) for m in result["config"]["methods"]]
        for i, (m, e) in enumerate(cells):
            summ = [r for r in result["summary"] if r["method"] == m and r.get("explore", "plain") == e]
            if not summ:
                continue
            ax.bar(i, summ[0]["win_rate"], color=f"C{i % 10}", alpha=0.6)
            if "win_rate_ci95" in summ[0]:  # 95% interval over prompts (users fixed)
                lo, hi = summ[0]["win_rate_ci95"]
                ax.errorbar(i, summ[0]["win_rate"], yerr=[[summ[0]["win_rate"] - lo], [hi - summ[0]["win_rate"]]],
                            c="grey", capsize=4, lw=1)
            ax.text(i, 0.03, f"{summ[0]['win_rate']:.3f}", ha="center", fontsize=9)
            pts = [r["win_rate"] for r in result["rows"] if r["method"] == m and r.get("explore", "plain") == e]
            ax.scatter([i] * len(pts), pts, c="black", s=10, zorder=3)
        ax.set_xticks(range(len(cells)), [f"{m}\n{e}" for m, e in cells], fontsize=8)
        ax.axhline(0.75, ls="--", c="grey", lw=1, label="target 0.75")
        ax.axhline(0.5, ls=":", c="black", lw=1, label="base (tie)")
        ax.set_ylabel(f"win rate vs base at K={ks[0]} (dots: users; bars: 95% CI)")
        ax.set_ylim(0, 1.15)
        ax.set_title(f"policy personalization, {len(result['users'])} sim users, K={ks[0]}")
        ax.legend(loc="upper center", ncol=2, fontsize=8)  # above the dots, clear of the value labels
        fig.tight_layout()
        _save_png(fig, path)
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in result["config"]["methods"]:
        for explore in result["config"].get("explore", ["plain"]):
            rows = sorted((r for r in result["summary"] if r["method"] == method
                           and r.get("explore", "plain") == explore), key=lambda r: r["k"])
            if rows:
                line, = ax.plot([r["k"] for r in rows], [r["win_rate"] for r in rows], marker="o",
                                ls={"hints": "-", "adaptive": "-."}.get(explore, "--"),
                                label=f"{method} (explore: {explore})")
                if all("win_rate_ci95" in r for r in rows):  # 95% interval over prompts (users fixed)
                    ax.fill_between([r["k"] for r in rows], [r["win_rate_ci95"][0] for r in rows],
                                    [r["win_rate_ci95"][1] for r in rows], color=line.get_color(), alpha=0.12)
    ax.axhline(0.75, ls="--", c="grey", lw=1, label="target 0.75")
    ax.axhline(0.5, ls=":", c="black", lw=1, label="base (tie)")
    ax.set_xlabel("K (thumbs)")
    ax.set_ylabel("win rate vs base (true reward)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_title(f"policy personalization, {len(result['users'])} held-out sim users")
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from metarlhf.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average the per-user rows for each (method, K)."""
    out = []
    keys = sorted({(r["method"], r.get("explore", "plain"), r["k"]) for r in rows})
    for method, explore, k in keys:
        sel = [r for r in rows if r["method"] == method and r.get("explore", "plain") == explore and r["k"] == k]
        out.append({
            "method": method,
            "explore": explore,
            "k": k,
            "users": len(sel),
            "win_rate": statistics.mean(r["win_rate"] for r in sel),
            # prompts resampled per user, users fixed (bootstrap_ci); and users resampled too
            **({"win_rate_ci95": list(bootstrap_ci([r["outcomes"] for r in sel])),
                "win_rate_ci95_users": list(bootstrap_ci([r["outcomes"] for r in sel], resample_groups=True))}
               if all(r.get("outcomes") for r in sel) else {}),
            # against a second, independently seeded base sample (the headline base answers
            # share the personalized answers' sampling seed)
            **({"win_rate_vs_resample": statistics.mean(r["win_rate_vs_resample"] for r in sel)}
               if all("win_rate_vs_resample" in r for r in sel) else {}),
            "mean_reward": statistics.mean(r["mean_reward"] for r in sel),
            "base_mean_reward": statistics.mean(r["base_mean_reward"] for r in sel),
            "adapt_s": statistics.mean(r["adapt_s"] for r in sel),
            **({"nll_personal": statistics.mean(r["nll_personal"] for r in sel),
                "nll_base": statistics.mean(r["nll_base"] for r in sel)} if all("nll_personal" in r for r in sel) else {}),
            **({"fluent_win_rate": statistics.mean(r["fluent_win_rate"] for r in sel),
                "fluency_drop_rate": statistics.mean(r["fluency_drop_rate"] for r in sel)}
               if all("fluent_win_rate" in r for r in sel) else {}),
            **({"relevance": statistics.mean(r["relevance"] for r in sel)}
               if all(r.get("relevance") is not None for r in sel) else {}),
            **({"repeat_opening_rate": statistics.mean(r["repeat_opening_rate"] for r in sel)}
               if all("repeat_opening_rate" in r for r in sel) else {}),
            **({"loop_rate": statistics.mean(r["loop_rate"] for r in sel),
                "sound_win_rate": statistics.mean(r["sound_win_rate"] for r in sel)}
               if all("sound_win_rate" in r for r in sel) else {}),
        })
    return out


def check_eval_out(out: str | os.PathLike) -> None:
    """Raise ConfigError unless ``out`` (and its ``.png``) may be written by ``eval policy``."""
    from metarlhf.io import check_results_out

    check_results_out(out, ("config", "rows"), "an earlier `eval policy` result")


def init_overlap(meta: dict[str, Any], users: Sequence[str], prompts: Sequence[str]) -> dict[str, Any]:
    """What an evaluation shares with the meta-training of an init (its metadata ``meta``):
    ``users``, the evaluated users among its ``train_users``; ``prompts``, how many of the
    evaluation's distinct prompts are among its ``prompt_digests`` (None: the init does not
    record them; inits made before session 15 do not). A user's own adapter used as an init
    (``kind`` policy, e.g. a neighbour's) was trained on its ``user_id``, and inherits what
    its own init was trained on (``init_train_users``, ``init_prompt_digests``)."""
    from metarlhf.data import prompt_digests
    from metarlhf.policy import init_lineage

    lineage = init_lineage(meta)  # the init's own training, and its init's (a user adapter's chain)
    seen = set(lineage["init_train_users"])
    digests = lineage["init_prompt_digests"]
    shared = None if digests is None else len(set(prompt_digests(prompts)) & set(digests))
    return {"users": [u for u in users if u in seen], "prompts": shared}


def check_init_overlap(cfg: EvalConfig, users: Sequence[str], prompts: Sequence[str],
                       warn: bool = True) -> dict[str, dict[str, Any]]:
    """:func:`init_overlap` of each init the methods use (read from its metadata only, so a
    command can call it before it loads a model). ConfigError if an init was meta-trained on
    an evaluated user or prompt, unless ``cfg.allow_seen``: the figure would measure
    training, not few-shot personalization. An init that cannot be read is left to
    :func:`metarlhf.policy.load_init` to report. ``warn``: log that an init does not record
    its prompts (off for an early check that :func:`evaluate_policy` repeats)."""
    from metarlhf.adapters import read_meta
    from metarlhf.errors import AdapterError
    from metarlhf.policy import DEFAULT_INIT_DIR

    out: dict[str, dict[str, Any]] = {}
    for init in dict.fromkeys(parse_method(m).init for m in cfg.methods):
        if init == "scratch":
            continue
        path = (cfg.meta_init or DEFAULT_INIT_DIR) if init == "meta" else init
        try:
            meta = read_meta(path)
        except AdapterError:
            continue
        got = out[init] = init_overlap(meta, users, prompts)
        if got["prompts"] is None and warn:
            log.warning("init %r (%s) does not record its meta-training prompts: held-out prompts are not checked "
                        "against them (its users are)", init, path)
        if not cfg.allow_seen and (got["users"] or got["prompts"]):
            what = [f"user(s) {', '.join(got['users'])}"] if got["users"] else []
            what += [f"{got['prompts']} of the evaluation's prompts"] if got["prompts"] else []
            raise ConfigError(f"init {init!r} ({path}) was meta-trained on {' and '.join(what)}: that measures "
                              "training, not few-shot personalization; evaluate others (--users, --offset), or "
                              "pass --allow-seen to do it anyway")
    return out


def evaluate_policy(
    users: Sequence[Any],
    prompts: Sequence[str],
    config: EvalConfig | None = None,
    base: Any = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the evaluation; returns (and writes to ``out``, + ``.png``) the results dict."""
    from tqdm import tqdm

    from metarlhf.io import atomic_write_json
    from metarlhf.policy import (
        adapt_policy,
        adapter_attached,
        best_of_n,
        exploration_hints,
        generate,
        hint_credit,
        implicit_scorer,
        load_init,
        resolve_base,
    )
    from metarlhf.runtime import software_versions

    cfg = config or EvalConfig()
    if out is not None:
        check_eval_out(out)
    if not users:
        raise ConfigError("no simulated users to evaluate")
    s = cfg.samples_per_prompt
    n_train = math.ceil(max(cfg.ks) / s)
    if len(prompts) < n_train + cfg.eval_prompts:
        raise DataError(f"need {n_train + cfg.eval_prompts} prompts ({n_train} for thumbs, "
                        f"{cfg.eval_prompts} held out), got {len(prompts)}")
    train_prompts = list(prompts[:n_train])
    eval_prompts = list(prompts[n_train:n_train + cfg.eval_prompts])
    overlap = check_init_overlap(cfg, [u.name for u in users], train_prompts + eval_prompts)
    t_start = time.perf_counter()
    model, tok, base_name = resolve_base(base)
    methods = [parse_method(m) for m in cfg.methods]
    inits: dict[str, Any] = {}
    for m in methods:
        if m.init == "scratch":
            inits[m.init] = None
        elif m.init == "meta":
            inits[m.init] = load_init(cfg.meta_init or "meta", base_name)
        else:
            inits[m.init] = load_init(m.init, base_name)
    reward_model = _load_reward_model() if any(m.uses_reward for m in methods) else None
    scorers: dict[tuple[str, int], Any] = {}
    acfg = cfg.adapt_config()
    log.info("sampling %d base completions for thumbs and %d for held-out prompts", n_train * s, len(eval_prompts))
    rep = [p for p in train_prompts for _ in range(s)]
    pools: dict[str, list[str]] = {}
    hint_log: dict[str, list[str | None]] = {}
    for explore in (e for e in cfg.explore if e != "adaptive"):
        hints = exploration_hints(len(rep), explore, cfg.plain_every, seed=cfg.seed)
        pools[explore] = generate(model, tok, rep, cfg.max_new_tokens, cfg.sample_temperature, seed=cfg.seed,
                                  hints=hints)
        hint_log[explore] = hints
    base_eval = generate(model, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature, seed=cfg.seed + 1)
    nll_base_rows, nll_base = base_nll_rows(model, tok, eval_prompts, base_eval)
    # calibration of the fluency figures: a second base sample per prompt against the first
    resample = generate(model, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature, seed=cfg.seed + 2)
    resample_drop = statistics.mean(fluency_drops(base_nll_rows(model, tok, eval_prompts, resample)[0], nll_base_rows))
    many = len(set(eval_prompts)) > 1  # relevance compares each answer with another prompt
    base_relevance = statistics.mean(prompt_relevance(model, tok, eval_prompts, base_eval, nll_base_rows)) if many else None
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "software": software_versions(),  # the same seed on another torch/transformers samples differently
        "base_model": base_name,
        "users": [u.name for u in users],
        "families": {u.name: u.family for u in users},
        "n_train_prompts": n_train,
        "n_eval_prompts": len(eval_prompts),
        "init_overlap": overlap,  # users / prompts each init was meta-trained on (check_init_overlap)
        "exploration_hints": hint_log,
        "base_resample_fluency_drop_rate": resample_drop,  # the drop rate of base itself (another sample)
        "base_relevance": base_relevance,  # nats/token: prompt_relevance of the base answers
        "base_repeat_opening_rate": statistics.mean(repeated_openings(base_eval)),
        "base_loop_rate": statistics.mean(repetition_loops(base_eval)),
        "base_answers": base_eval,
        "base_resample_answers": resample,  # seed + 2: the base for win_rate_vs_resample
        "rows": [],
        "summary": [],
    }
    adaptive: dict[tuple[str, int], tuple[list[Any], list[str | None], float]] = {}
    # K-major: the first K completes first
    cells = [(u, k, e, m) for k in cfg.ks for u in users for e in cfg.explore for m in methods]
    bar = tqdm(cells, desc="eval policy", disable=not progress)
    for user, k, explore, method in bar:
        rng = thumbs_rng(cfg, user)
        explore_s = 0.0
        if explore == "adaptive":
            if (user.name, k) not in adaptive:  # per user and K; shared by the methods
                t0 = time.perf_counter()
                got_t, got_h = adaptive_support(model, tok, user, train_prompts, k, cfg, rng)
                adaptive[(user.name, k)] = (got_t, got_h, time.perf_counter() - t0)
            support, support_hints, explore_s = adaptive[(user.name, k)]
        else:
            pool = pools[explore]
            thumbs = []
            for i, p in enumerate(train_prompts):
                thumbs += user.thumbs(p, pool[i * s:(i + 1) * s], noise=cfg.label_noise, rng=rng)
            support = thumbs[:k]
            support_hints = hint_log[explore][:k]
        base_r = [user.reward(p, c) for p, c in zip(eval_prompts, base_eval, strict=True)]
        resample_r = [user.reward(p, c) for p, c in zip(eval_prompts, resample, strict=True)]
        scorer, rm_s = None, 0.0
        if method.uses_reward:
            if (user.name, k, explore) not in scorers:
                t0 = time.perf_counter()
                scorers[(user.name, k, explore)] = personal_scorer(reward_model, support, cfg.seed)
                rm_s = time.perf_counter() - t0
            scorer = scorers[(user.name, k, explore)]
        t0 = time.perf_counter()
        adapter = adapt_policy(support, base=(model, tok), init=inits[method.init], seed=cfg.seed, config=acfg,
                               scorer=scorer if method.augment else None, augment_samples=method.augment,
                               augment_explore="plain" if explore == "plain" else "hints", hints=support_hints,
                               distill_scorer=scorer if method.rank else None)
        adapt_s = time.perf_counter() - t0 + rm_s
        with adapter_attached(model, adapter) as pm:
            if method.best_of > 1:
                ranker = implicit_scorer(pm, tok) if method.implicit else scorer
                comps = best_of_n(pm, tok, eval_prompts, ranker, method.best_of, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.eval_temperature, seed=cfg.seed + 1)
            else:
                comps = generate(pm, tok, eval_prompts, cfg.max_new_tokens, cfg.eval_temperature, seed=cfg.seed + 1)
        pers_r = [user.reward(p, c) for p, c in zip(eval_prompts, comps, strict=True)]
        nll_personal_rows, nll_personal = base_nll_rows(model, tok, eval_prompts, comps)
        dropped = fluency_drops(nll_personal_rows, nll_base_rows)
        fluent_win, drops = win_rate_without(pers_r, base_r, dropped), statistics.mean(dropped)
        loops = repetition_loops(comps)
        broken = [d or lp for d, lp in zip(dropped, loops, strict=True)]
        relevance = (statistics.mean(prompt_relevance(model, tok, eval_prompts, comps, nll_personal_rows))
                     if many else None)
        row = {
            "user": user.name,
            "family": user.family,
            "k": k,
            "method": method.name,
            "explore": explore,
            "n_up": sum(t.label for t in support),
            "hint_credit": {str(h): list(c) for h, c in hint_credit(support_hints, [t.label for t in support]).items()},
            "distill_hints": adapter.meta.get("distill_hints", []),
            "n_distilled": adapter.meta.get("n_distilled", 0),
            "distill_s": adapter.meta.get("distill_s", 0.0),
            "explore_s": round(explore_s, 2),
            "support_mean_reward": statistics.mean(user.reward(t.prompt, t.completion) for t in support),
            "win_rate": win_rate(pers_r, base_r),
            "outcomes": [prompt_outcome(x, y) for x, y in zip(pers_r, base_r, strict=True)],  # per eval prompt
            "win_rate_vs_resample": win_rate(pers_r, resample_r),  # base answers drawn with seed + 2
            "mean_reward": statistics.mean(pers_r),
            "base_mean_reward": statistics.mean(base_r),
            "adapt_s": round(adapt_s, 2),
            "nll_personal": round(nll_personal, 4),
            "nll_base": round(nll_base, 4),
            "fluent_win_rate": fluent_win,
            "fluency_drop_rate": drops,
            "relevance": relevance,
            "repeat_opening_rate": statistics.mean(repeated_openings(comps)),
            "loop_rate": statistics.mean(loops),
            "sound_win_rate": win_rate_without(pers_r, base_r, broken),
            "reward_model_s": round(rm_s, 2),
            "loss_first": adapter.meta["losses"][0],
            "loss_last": adapter.meta["losses"][-1],
            "examples": [{"prompt": eval_prompts[i], "base": base_eval[i], "personalized": comps[i]}
                         for i in range(min(2, len(comps)))],
            "answers": comps,  # every personalized answer, in eval-prompt order (base: result["base_answers"])
        }
        result["rows"].append(row)
        bar.set_postfix(user=user.name[:12], k=k, e=explore, m=method.name, win=f"{row['win_rate']:.2f}")
        log.info("%s K=%d %s %s: win %.3f reward %.3f (base %.3f) adapt %.1f s", user.name, k, explore, method.name,
                 row["win_rate"], row["mean_reward"], row["base_mean_reward"], adapt_s)
        result["summary"] = summarize(result["rows"])
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        if out is not None:
            atomic_write_json(out, result)
    if out is not None:
        _plot(result, Path(out).with_suffix(".png"))
    return result


def _load_reward_model() -> Any:
    """The reward model (embedded encoder, shipped reward init when present)."""
    from metarlhf.reward import load_reward_model

    return load_reward_model()


def personal_scorer(reward_model: Any, support: Sequence[Any], seed: int, init: Any = None) -> Any:
    """``adapt_reward`` on the user's K thumbs -> ``scorer(prompts, completions)``.

    ``init``: a reward init directory for ``reward_model``'s encoder (None: the shipped
    one where it exists, else ``"scratch"``)."""
    from metarlhf.reward import SHIPPED_INIT_DIR, adapt_reward

    if init is None and not (SHIPPED_INIT_DIR / "metarlhf.json").is_file():
        init = "scratch"
    adapter = adapt_reward(list(support), init=init, encoder=reward_model, seed=seed)
    params = reward_model.params_from_tensors(adapter.tensors, "personal reward adapter")

    def scorer(prompts: Sequence[str], completions: Sequence[str]) -> Any:
        return reward_model.scores_with(params, list(prompts), list(completions))

    return scorer


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read results: {e}") from e

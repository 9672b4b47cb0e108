"""Adaptive exploration (Thompson sampling over the style hints) and liked-style distillation."""

import json
import random

import pytest

from metarlhf import policy as P
from metarlhf.cli import main
from metarlhf.data import Thumbs
from metarlhf.errors import ConfigError, DataError
from metarlhf.testing import save_tiny, tiny_policy, tiny_thumbs

NUM = "Answer as a numbered list."
BUL = "Answer as a bulleted list."


def test_hint_credit_and_posterior_hand_computed():
    credit = P.hint_credit([NUM, NUM, None, BUL, NUM], [1, 1, 0, 0, 0])
    assert credit == {NUM: (2, 1), None: (0, 1), BUL: (0, 1)}
    assert P.posterior_up_rate(2, 1) == pytest.approx(3 / 5)
    assert P.posterior_up_rate(0, 0) == pytest.approx(0.5)
    with pytest.raises(DataError, match="one hint per label"):
        P.hint_credit([NUM], [1, 0])


def test_liked_hints_need_positive_net_feedback_best_first():
    credit = {NUM: (2, 1), BUL: (3, 0), "Be casual and friendly.": (1, 1), None: (5, 0)}
    assert P.liked_hints(credit, top=3) == [BUL, NUM]  # ties (1, 1) and plain (None) are not liked styles
    assert P.liked_hints(credit, top=1) == [BUL]
    assert P.liked_hints({NUM: (0, 2)}) == []


def test_thompson_arms_are_distinct_seeded_and_follow_the_posterior():
    arms = [NUM, BUL, None]
    credit = {NUM: (9, 0), BUL: (0, 9), None: (0, 9)}
    picks = [P.thompson_arms(credit, arms, 1, random.Random(i))[0] for i in range(50)]
    assert picks.count(NUM) >= 45  # Beta(10, 1) beats Beta(1, 10) almost always
    two = P.thompson_arms(credit, arms, 2, random.Random(0))
    assert len(set(two)) == 2 and two[0] == NUM
    assert P.thompson_arms(credit, arms, 2, random.Random(3)) == P.thompson_arms(credit, arms, 2, random.Random(3))
    with pytest.raises(ConfigError, match="distinct arms"):
        P.thompson_arms(credit, arms, 4, random.Random(0))


def _echo_hints(monkeypatch):
    """generate() returns each sample's hint as its text, so a rater can see which style it got."""
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens=48, temperature=0.7, seed=0, precision="auto",
                      hints=None, **kw):
        calls.append(list(hints))
        return [f"answer: {h}" for h in hints]

    monkeypatch.setattr(P, "generate", fake_generate)
    return calls


def test_explore_adaptive_spreads_then_concentrates_on_the_liked_hint(monkeypatch):
    calls = _echo_hints(monkeypatch)

    def rate(prompt, comps):  # likes numbered lists; side by side, so only the numbered one is up
        return [Thumbs("u", prompt, c, int(NUM in c)) for c in comps]

    prompts = [f"q{i}" for i in range(12)]
    thumbs, arms = P.explore_adaptive(None, None, prompts, rate, k=24, samples_per_prompt=2, seed=0)
    assert len(thumbs) == len(arms) == 24
    assert [len(c) for c in calls] == [12, 4, 4, 4]  # first half, then rounds of 2 prompts x 2 samples
    assert len(set(calls[0])) == 12 and set(calls[0]) == set(P.STYLE_HINTS)  # the spread: every hint once
    later = [h for c in calls[1:] for h in c]
    assert later.count(NUM) >= 5  # concentrated on the liked style (6 of 6 prompts would be perfect)
    assert all(t.prompt in prompts and "answer:" in t.completion for t in thumbs)
    assert [t.prompt for t in thumbs] == [p for p in prompts for _ in range(2)]  # each prompt once, in order
    again, _ = P.explore_adaptive(None, None, prompts, rate, k=24, seed=0)
    assert again == thumbs  # seeded
    with pytest.raises(DataError, match="needs 12 prompts"):
        P.explore_adaptive(None, None, prompts[:5], rate, k=24)


def test_distill_records_add_liked_style_ups_on_plain_prompts(monkeypatch):
    _echo_hints(monkeypatch)
    recs = tiny_thumbs()
    hints = [NUM, BUL, NUM, None]  # NUM: 2 ups; BUL, None: downs
    extra, liked = P.distill_records(None, None, recs, hints, n=4)
    assert liked == [NUM]
    assert len(extra) == 4 and all(t.label == 1 and t.completion == f"answer: {NUM}" for t in extra)
    assert {t.prompt for t in extra} == {"tell me", "say more"}  # the plain prompts, never the hint
    assert P.distill_records(None, None, recs, [None, BUL, None, BUL], n=4) == ([], [])  # no liked style
    # ranked by a scorer: 2n drawn, the n best kept
    scored, _ = P.distill_records(None, None, recs, hints, n=2, scorer=lambda ps, cs: [len(p) for p in ps])
    assert [t.prompt for t in scored] == ["say more", "say more"]
    with pytest.raises(DataError, match="one hint"):
        P.distill_records(None, None, recs, [NUM], n=2)


def test_adapt_policy_distills_only_with_hints():
    model, tok = tiny_policy()
    cfg = P.AdaptConfig(steps=2, lr=1e-2, precision="fp32", distill_samples=3, max_completion_tokens=4)
    recs = tiny_thumbs()
    a = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg, hints=[NUM, None, NUM, None])
    assert a.meta["n_distilled"] == 3 and a.meta["distill_hints"] == [NUM] and a.meta["k"] == 4
    b = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)  # server path: no hints, no extra samples
    assert b.meta["n_distilled"] == 0 and b.meta["distill_hints"] == []
    with pytest.raises(ConfigError, match="distill_samples"):
        P.AdaptConfig(distill_samples=-1)


@pytest.fixture
def tiny_dir(tmp_path):
    model, tok = tiny_policy()
    return save_tiny(model, tok, tmp_path / "tiny")


def test_cli_eval_policy_adaptive_with_distillation(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "res.json"
    rc = main(["eval", "policy", "--users", "bullets", "--k", "4", "--prompts", str(prompts), "--offset", "0",
               "--eval-prompts", "2", "--methods", "scratch", "--steps", "1", "--max-new-tokens", "4",
               "--explore", "adaptive", "plain", "--distill-samples", "2", "--policy", str(tiny_dir),
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {r["explore"] for r in res["rows"]} == {"adaptive", "plain"}
    adaptive = next(r for r in res["rows"] if r["explore"] == "adaptive")
    assert sum(u + d for u, d in adaptive["hint_credit"].values()) == 4
    plain = next(r for r in res["rows"] if r["explore"] == "plain")
    assert plain["n_distilled"] == 0 and set(plain["hint_credit"]) == {"None"}
    from metarlhf.evaluate_policy import EvalConfig

    with pytest.raises(ConfigError, match="explore"):
        EvalConfig(explore=["loud"])


def test_eval_config_adapt_config_carries_every_recipe_field():
    from dataclasses import fields

    from metarlhf.evaluate_policy import EvalConfig

    cfg = EvalConfig(steps=7, lr=0.03, max_new_tokens=20, kto_weight=0.5, sft_weight=0.25, pair_weight=2.0,
                     train_layers=3, kl_weight=0.4, contrast_weight=0.6, distill_samples=2, distill_hints=2)
    a = cfg.adapt_config()
    assert (a.steps, a.lr, a.max_completion_tokens) == (7, 0.03, 20)
    shared = {f.name for f in fields(EvalConfig)} & {f.name for f in fields(P.AdaptConfig)}
    assert shared >= {"kto_weight", "sft_weight", "pair_weight", "train_layers", "kl_weight", "contrast_weight",
                      "distill_samples", "distill_hints"}
    assert all(getattr(a, name) == getattr(cfg, name) for name in shared)

"""The adaptation recipe: cached lower layers, SFT / paired-thumbs terms, exploration hints."""

import math
import random

import pytest
import torch

from metarlhf import policy as P
from metarlhf.errors import ConfigError
from metarlhf.testing import tiny_policy, tiny_thumbs


def _randomize_lora(pm):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_sft_loss_hand_computed():
    loss = P.sft_loss(torch.tensor([-4.0, -9.0]), torch.tensor([2, 3]))
    assert float(loss) == pytest.approx((2.0 + 3.0) / 2)


def test_thumb_pairs_pairs_ups_with_downs_of_the_same_prompt():
    pairs = P.thumb_pairs(["a", "a", "a", "b", "b", "c"], [1, 0, 0, 1, 0, 1])
    assert pairs.tolist() == [[0, 1], [0, 2], [3, 4]]
    assert P.thumb_pairs(["a"], [1]).shape == (0, 2)


def test_sequence_logps_from_cached_hidden_states_equals_full_forward():
    model, tok = tiny_policy(layers=4)
    recs = tiny_thumbs()
    with P.lora_attached(model, None, 0) as pm:
        _randomize_lora(pm)
        batch = P.encode_pairs(tok, [r.prompt for r in recs], [r.completion for r in recs])
        with torch.no_grad():
            full = P.sequence_logps(pm, batch)
            hidden = P.hidden_at(pm, batch, 2, chunk=3)  # chunked: 3 + 1 rows
            assert hidden.shape[:2] == batch.input_ids.shape
            assert torch.allclose(P.sequence_logps(pm, batch, None, hidden, 2), full, atol=1e-5)
            rows = torch.tensor([1, 3])
            assert torch.allclose(P.sequence_logps(pm, batch, rows, hidden, 2), full[rows], atol=1e-5)
        assert len(P.decoder_of(pm).layers) == 4  # restored after slicing


def test_train_layers_trains_only_the_top_layers():
    model, tok = tiny_policy(layers=4)
    cfg = P.AdaptConfig(train_layers=2, precision="fp32", lr=2e-2, sft_weight=1.0, pair_weight=1.0)
    with P.lora_attached(model, None, 0) as pm:
        _randomize_lora(pm)
        data = P.prepare(pm, tok, tiny_thumbs(), cfg)
        assert data.start == 2 and data.kto_h is not None
        before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
        losses = P.train_steps(pm, data, cfg, 3, random.Random(0))
        assert losses[-1] < losses[0]
        for n, p in pm.named_parameters():
            if "lora_" in n:
                moved = not torch.equal(p, before[n])
                assert moved == (P.layer_index(n) >= 2), n
    assert P.start_layer_for(model, 0) == 0 and P.start_layer_for(model, 9) == 0  # all layers


def test_sft_term_raises_likelihood_of_ups_only_objective():
    model, tok = tiny_policy()
    recs = tiny_thumbs()
    cfg = P.AdaptConfig(steps=6, lr=2e-2, precision="fp32", kto_weight=0.0, sft_weight=1.0, pair_weight=0.0)
    adapter = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)
    batch = P.encode_pairs(tok, [r.prompt for r in recs], [r.completion for r in recs])
    with torch.no_grad():
        ref = P.sequence_logps(model, batch)
        with P.adapter_attached(model, adapter) as pm:
            pol = P.sequence_logps(pm, batch)
    assert float(pol[0] - ref[0]) > 0 and float(pol[2] - ref[2]) > 0
    first = adapter.meta["losses"][0]
    ntok = batch.comp_mask.sum(-1)
    assert first == pytest.approx(float(P.sft_loss(ref[[0, 2]], ntok[[0, 2]])), rel=1e-4)


def test_pair_term_alone_starts_at_log2():
    model, tok = tiny_policy()
    cfg = P.AdaptConfig(steps=2, lr=2e-2, precision="fp32", kto_weight=0.0, sft_weight=0.0, pair_weight=1.0)
    a = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=None, config=cfg)
    assert a.meta["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # scratch init: policy == reference


def test_recipe_config_validation():
    with pytest.raises(ConfigError, match="sft_weight"):
        P.AdaptConfig(sft_weight=-1)
    with pytest.raises(ConfigError, match="at least one"):
        P.AdaptConfig(kto_weight=0, sft_weight=0, pair_weight=0)
    with pytest.raises(ConfigError, match="train_layers"):
        P.AdaptConfig(train_layers=-1)


def test_exploration_hints_and_chat_prompt():
    assert P.exploration_hints(5, "plain") == [None] * 5
    hints = P.exploration_hints(16, "hints", plain_every=4, seed=0)
    assert [h is None for h in hints] == [i % 4 == 3 for i in range(16)]
    assert sorted(h for h in hints if h) == sorted(P.STYLE_HINTS)  # 12 hinted samples: every style once
    assert P.exploration_hints(16, "hints", seed=0) == hints and P.exploration_hints(16, "hints", seed=1) != hints
    assert P.exploration_hints(3, "hints", plain_every=0, seed=None) == list(P.STYLE_HINTS[:3])
    with pytest.raises(ConfigError, match="explore"):
        P.exploration_hints(3, "loud")
    _, tok = tiny_policy()
    assert P.chat_prompt(tok, "hi", "Be brief.") == P.chat_prompt(tok, "hi\n\n(Be brief.)")


def test_generate_with_hints():
    model, tok = tiny_policy()
    a = P.generate(model, tok, ["hi", "hi"], max_new_tokens=4, seed=0, hints=[None, None])
    assert a == P.generate(model, tok, ["hi", "hi"], max_new_tokens=4, seed=0)
    with pytest.raises(ConfigError, match="one hint"):
        P.generate(model, tok, ["hi"], hints=[None, None])


def test_augmentation_with_hints_keeps_plain_prompts():
    model, tok = tiny_policy()
    extra = P.augment_with_scorer(model, tok, tiny_thumbs(), lambda ps, cs: [len(c) for c in cs], n=4,
                                  max_new_tokens=4, explore="hints")
    assert {t.prompt for t in extra} == {"tell me", "say more"} and sum(t.label for t in extra) == 4


def test_meta_train_with_hints_pool_and_recipe(tmp_path):
    import json

    from metarlhf.simusers import SimUser

    model, tok = tiny_policy(layers=4)
    cfg = P.MetaConfig(meta_steps=2, pool_prompts=8, max_new_tokens=4, checkpoint_every=1, explore="hints")
    acfg = P.AdaptConfig(kto_weight=0.0, sft_weight=1.0, pair_weight=1.0, train_layers=2, lr=1e-2)
    a = P.meta_train_policy([f"q {i}" for i in range(8)], [SimUser("long", "custom", lambda p, c: len(c))], tmp_path / "m",
                            config=cfg, adapt_config=acfg, base=(model, tok), progress=False)
    pool = [json.loads(x) for x in (tmp_path / "m.work" / "pool.jsonl").read_text().splitlines()]
    assert all(p["explore"] == "hints" for p in pool) and any(h for p in pool for h in p["hints"])
    assert not any(h in p["prompt"] for p in pool for h in P.STYLE_HINTS)  # rated on the plain prompt
    moved = {P.layer_index(k) for k, v in a.tensors.items() if "lora_B" in k and v.abs().sum() > 0}
    assert moved == {2, 3}  # only the trained top layers left their zero init
    with pytest.raises(ConfigError, match="explore"):
        P.MetaConfig(explore="loud")


def test_default_recipe_moves_towards_ups_and_away_from_downs():
    model, tok = tiny_policy()
    recs = tiny_thumbs()
    cfg = P.AdaptConfig(steps=6, lr=2e-2, precision="fp32")  # default mix: SFT on ups + DPO on (up, down)
    assert (cfg.kto_weight, cfg.sft_weight, cfg.pair_weight) == (0.0, 1.0, 1.0)
    adapter = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)
    batch = P.encode_pairs(tok, [r.prompt for r in recs], [r.completion for r in recs])
    with torch.no_grad():
        ref = P.sequence_logps(model, batch)
        with P.adapter_attached(model, adapter) as pm:
            r = P.sequence_logps(pm, batch) - ref
    assert float(r[0] - r[1]) > 0 and float(r[2] - r[3]) > 0  # each up gained on its prompt's down
    assert float(r[0]) > 0 and float(r[2]) > 0
    assert adapter.meta["losses"][-1] < adapter.meta["losses"][0]


def test_topk_kl_is_a_true_kl_and_exact_with_the_full_vocabulary():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    pol = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    exact = (ref.exp() * (ref - pol)).sum(-1)
    assert torch.allclose(P.topk_kl(ref, pol), exact, atol=1e-4)  # k = vocab: the rest bucket is empty
    idx = torch.topk(ref, 5, -1).indices
    kl5 = P.topk_kl(ref.gather(-1, idx), pol.gather(-1, idx))
    assert bool((kl5 >= -1e-6).all()) and bool((kl5 <= exact + 1e-5).all())  # coarsening never adds KL
    assert torch.allclose(P.topk_kl(ref.gather(-1, idx), ref.gather(-1, idx)), torch.zeros(3), atol=1e-6)


def test_kl_anchor_is_zero_at_the_reference_and_keeps_the_adapter_closer():
    model, tok = tiny_policy()
    recs = tiny_thumbs()
    with P.lora_attached(model, None, 0) as pm:
        data = P.prepare(pm, tok, recs, P.AdaptConfig(precision="fp32", kl_weight=1.0, kl_topk=8))
        assert data.kto_top[0].shape[-1] == 8
        with torch.no_grad():
            _, kl = P.sequence_logps(pm, data.kto, None, None, 0, ref_top=data.kto_top)
        assert float(kl.abs().max()) < 1e-5  # scratch init (B = 0) is the reference
        _randomize_lora(pm)
        with torch.no_grad():
            _, kl = P.sequence_logps(pm, data.kto, None, None, 0, ref_top=data.kto_top)
        assert float(kl.min()) > 1e-4
    # the tiny random model is near-uniform and its drift tiny (KL ~0.01 nats), so the anchor
    # needs a large weight here; k >= vocab makes it the exact KL
    cfg = P.AdaptConfig(steps=8, lr=5e-2, precision="fp32", kl_weight=1000.0, kl_topk=4096)
    batch = P.encode_pairs(tok, [r.prompt for r in recs], [r.completion for r in recs])
    top = None

    def drift(adapter):
        nonlocal top
        with P.adapter_attached(model, adapter) as pm, torch.no_grad():
            if top is None:
                top = P.reference_topk(pm, batch, 4096, precision="fp32")
            return float(P.sequence_logps(pm, batch, None, None, 0, ref_top=top)[1].mean())

    free = P.adapt_policy(recs, base=(model, tok), init=None, config=P.AdaptConfig(**{**vars(cfg), "kl_weight": 0.0}))
    anchored = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)
    assert drift(anchored) < 0.5 * drift(free)
    # all thumbs down, no pairs: no feedback term applies, so the anchor alone takes no step
    # (Adam would otherwise turn its ~0 gradient at the reference into full-size random steps)
    downs = [r for r in recs if r.label == 0]
    still = P.adapt_policy(downs, base=(model, tok), init=None, config=P.AdaptConfig(steps=3, kl_weight=1.0))
    assert all(float(v.abs().sum()) == 0 for k, v in still.tensors.items() if "lora_B" in k)
    with pytest.raises(ConfigError, match="kl_weight"):
        P.AdaptConfig(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="kl_topk"):
        P.AdaptConfig(kl_topk=0)


def test_kl_anchor_term_with_cached_layers_pairs_and_row_subsets():
    """The anchor's share of feedback_loss is exactly w x the per-row KL (thumbs and both
    sides of pairs, weighted by rows), on the cached-hidden path and on sampled rows; with
    w = 0 the loss is the same whether or not the reference top-k was prepared."""
    from metarlhf.data import Pair

    model, tok = tiny_policy(layers=4)
    recs = tiny_thumbs() + [Pair("u", "tell me", "- p\n- q", "plain"), Pair("u", "say more", "- r", "no")]
    w = 50.0  # large, so the anchor share stands well above fp32 rounding of the ~6-nat loss
    cfg = P.AdaptConfig(precision="fp32", train_layers=2, batch_size=2, kl_weight=w, kl_topk=8)
    cfg0 = P.AdaptConfig(**{**vars(cfg), "kl_weight": 0.0})
    with P.lora_attached(model, None, 0) as pm:
        _randomize_lora(pm)
        data = P.prepare(pm, tok, recs, cfg)
        plain = P.prepare(pm, tok, recs, cfg0)
        assert data.start == 2 and plain.kto_top is None and data.dpo_c_top is not None
        with torch.no_grad():
            kl = {name: P.sequence_logps(pm, getattr(data, name), None, None, 0, ref_top=getattr(data, f"{name}_top"))[1]
                  for name in ("kto", "dpo_c", "dpo_r")}
            for kr, dr in [(torch.tensor([0, 3]), torch.tensor([1])), (torch.tensor([1, 2]), torch.tensor([0, 1]))]:
                with_kl = P.feedback_loss(pm, data, cfg, kr, dr)
                without = P.feedback_loss(pm, data, cfg0, kr, dr)
                assert float(without) == pytest.approx(float(P.feedback_loss(pm, plain, cfg0, kr, dr)), abs=1e-6)
                share = (len(kr) * kl["kto"][kr].mean() + len(dr) * (kl["dpo_c"][dr].mean() + kl["dpo_r"][dr].mean()) / 2)
                assert float(with_kl - without) == pytest.approx(w * float(share) / (len(kr) + len(dr)), rel=1e-3)
                assert float(share) > 0


def test_contrast_prompts_pairs_each_prompt_with_the_next_distinct_one():
    assert P.contrast_prompts(["a", "a", "b", "c", "b"]) == {"a": "b", "b": "c", "c": "a"}
    assert P.contrast_prompts(["a", "a"]) == {}  # one prompt: nothing to contrast with


def test_prompt_contrast_term_is_dpo_of_own_prompt_against_another():
    """feedback_loss with contrast_weight w adds w x DPO(up answer after its own prompt,
    the same answer after the next support prompt), on up rows only, cached layers and
    sampled rows included."""
    model, tok = tiny_policy(layers=4)
    recs = tiny_thumbs()  # ups: rows 0 ("tell me") and 2 ("say more")
    w = 3.0
    cfg = P.AdaptConfig(precision="fp32", train_layers=2, contrast_weight=w)
    cfg0 = P.AdaptConfig(**{**vars(cfg), "contrast_weight": 0.0})
    with P.lora_attached(model, None, 0) as pm:
        _randomize_lora(pm)
        data = P.prepare(pm, tok, recs, cfg)
        assert data.ctx_of.tolist() == [0, -1, 1, -1] and P.prepare(pm, tok, recs, cfg0).ctx is None
        swapped = P.encode_pairs(tok, ["say more", "tell me"], [recs[0].completion, recs[2].completion])
        with torch.no_grad():
            ref_other = P.reference_logps(pm, swapped, precision="fp32")
            assert data.ctx_ref.tolist() == pytest.approx(ref_other.tolist(), abs=1e-5)
            own = P.sequence_logps(pm, data.kto)
            other = P.sequence_logps(pm, swapped)
            for rows in (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3])):
                ups = rows[torch.tensor([recs[int(i)].label == 1 for i in rows])]
                expect = P.dpo_loss(own[ups], other[data.ctx_of[ups]], data.kto_ref[ups], ref_other[data.ctx_of[ups]])
                got = P.feedback_loss(pm, data, cfg, rows, torch.tensor([], dtype=torch.long))
                base = P.feedback_loss(pm, data, cfg0, rows, torch.tensor([], dtype=torch.long))
                assert float(got - base) == pytest.approx(w * float(expect), rel=1e-4)
            downs = torch.tensor([1, 3])  # no up row in the batch: the contrast adds nothing
            assert float(P.feedback_loss(pm, data, P.AdaptConfig(**{**vars(cfg), "kto_weight": 1.0}), downs,
                                         torch.tensor([], dtype=torch.long))) == pytest.approx(
                float(P.feedback_loss(pm, data, P.AdaptConfig(**{**vars(cfg0), "kto_weight": 1.0}), downs,
                                      torch.tensor([], dtype=torch.long))))


def test_prompt_contrast_makes_liked_answers_depend_on_their_prompt():
    """Trained with the contrast, an up answer becomes more likely after its own prompt than
    after the other one (a template would be equally likely after both)."""
    model, tok = tiny_policy()
    recs = tiny_thumbs()
    ups = [r for r in recs if r.label == 1]
    own = P.encode_pairs(tok, [r.prompt for r in ups], [r.completion for r in ups])
    swapped = P.encode_pairs(tok, [ups[1].prompt, ups[0].prompt], [r.completion for r in ups])

    def gap(adapter):
        with P.adapter_attached(model, adapter) as pm, torch.no_grad():
            return float((P.sequence_logps(pm, own) - P.sequence_logps(pm, swapped)).mean())

    cfg = P.AdaptConfig(steps=8, lr=5e-2, precision="fp32", pair_weight=0.0)
    plain = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)
    contrast = P.adapt_policy(recs, base=(model, tok), init=None,
                              config=P.AdaptConfig(**{**vars(cfg), "contrast_weight": 5.0}))
    assert gap(contrast) > gap(plain) + 0.5
    with pytest.raises(ConfigError, match="contrast_weight"):
        P.AdaptConfig(contrast_weight=-1.0)

import dataclasses
import json
import math

import pytest
import torch

from metarlhf import policy as P
from metarlhf.adapters import load_adapter, save_adapter
from metarlhf.cli import main
from metarlhf.data import Pair, Thumbs, prompt_digests, text_digest
from metarlhf.errors import AdapterError, ConfigError, DataError
from metarlhf.io import load_tensors
from metarlhf.simusers import get_users
from metarlhf.testing import save_tiny, tiny_policy, tiny_thumbs


def sig(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------ pure losses
def test_kto_loss_hand_computed():
    loss, z0 = P.kto_loss(torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([1, 0]), beta=1.0)
    assert float(z0) == 0.0
    assert float(loss) == pytest.approx(1 - sig(1.0), abs=1e-6)
    # z0 = mean ratio = 1; up: 2 * (1 - sig(0.5 * (2 - 1))); down: 1 - sig(0.5 * (1 - 0))
    loss, z0 = P.kto_loss(
        torch.tensor([2.0, 0.0]), torch.zeros(2), torch.tensor([1, 0]), beta=0.5, desirable_weight=2.0
    )
    assert float(z0) == pytest.approx(1.0)
    assert float(loss) == pytest.approx((2 * (1 - sig(0.5)) + (1 - sig(0.5))) / 2, abs=1e-6)


def test_kto_reference_point_is_clamped_and_detached():
    pol = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss, z0 = P.kto_loss(pol, torch.zeros(2), torch.tensor([1, 1]), beta=1.0)
    assert float(z0) == 0.0  # mean ratio -2, clamped
    loss.backward()
    # d/dr (1 - sig(r)) / 2 = -sig(r)(1 - sig(r)) / 2, no term through z0
    expected = [-sig(-1) * (1 - sig(-1)) / 2, -sig(-3) * (1 - sig(-3)) / 2]
    assert pol.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_dpo_loss_hand_computed():
    loss = P.dpo_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.zeros(2), torch.zeros(2), beta=0.5)
    expected = (-math.log(sig(0.5)) - math.log(sig(-1.0))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError):
        P.dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0)


def test_reptile_update():
    out = P.reptile_update([torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 0.0])], eps=0.25)
    assert out[0].tolist() == [0.25, 1.5]


# ------------------------------------------------------------------ log-probs
def test_sequence_logps_matches_unpadded_forward():
    model, tok = tiny_policy()
    prompts, comps = ["hi", "a much longer prompt here"], ["hello there", "ok"]
    batch = P.encode_pairs(tok, prompts, comps)
    got = P.sequence_logps(model, batch)
    for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        p_ids = tok(P.chat_prompt(tok, p), add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p_ids + c_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        want = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids))
        assert float(got[i]) == pytest.approx(want, abs=1e-4)


def test_token_logprobs_matches_autograd_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    h, w = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    index = torch.randint(0, 11, (7, 3))
    g = torch.randn(7, 3, dtype=torch.float64)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.log_softmax(h1 @ w1.T, -1).gather(-1, index)
    (want * g).sum().backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = P.token_logprobs(h2, w2, index)
    (got * g).sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5) and torch.allclose(w2.grad, w1.grad, atol=1e-5)
    with torch.no_grad():  # the same values without grad
        assert torch.allclose(P.token_logprobs(h, w, index).double(), want, atol=1e-5)


@pytest.mark.parametrize("start", [0, 1])
def test_fused_head_changes_no_logp_kl_or_gradient(monkeypatch, start):
    """Log-probs from the final states through token_logprobs (the plain-head path) equal
    those from the model's full logits (the path of any other model), with the top-k KL
    and the LoRA gradients."""
    model, tok = tiny_policy()
    assert P.plain_head(model) is model.lm_head.weight
    batch = P.encode_pairs(tok, ["hi", "a much longer prompt here", "x"], ["hello there", "ok", "a b c d e"])
    rows = torch.tensor([2, 0, 1])

    def run(plain):
        if not plain:
            monkeypatch.setattr(P, "plain_head", lambda m: None)
        with P.lora_attached(model, None, 0) as pm:
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
            top = P.reference_topk(pm, batch, k=4)
            assert P.plain_head(pm) is (model.lm_head.weight if plain else None)
            hidden = P.hidden_at(pm, batch, start) if start else None
            lp, kl = P.sequence_logps(pm, batch, rows, hidden, start, ref_top=(top[0][rows], top[1][rows]))
            (lp.sum() + 10 * kl.sum()).backward()
            grads = [p.grad.clone() for p in P.trainable_params(pm, start)]
            with torch.no_grad():
                ref = P.reference_logps(pm, batch)
                tokens = P.token_logps(pm, batch, chunk=2) * batch.comp_mask
        monkeypatch.undo()
        return lp.detach(), kl.detach(), grads, ref, tokens

    fused, slow = run(True), run(False)
    for a, b in zip(fused[:2] + fused[3:], slow[:2] + slow[3:], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert fused[1].abs().sum() > 0 and any(g.abs().sum() > 0 for g in fused[2])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused[2], slow[2], strict=True))


@pytest.mark.parametrize("start,attn", [(0, "sdpa"), (1, "sdpa"), (1, "eager")])
def test_packed_prompts_change_no_logp_kl_or_gradient(monkeypatch, start, attn):
    """Rows that share a prompt run as one sequence [prompt, completion 1, completion 2]
    under a 4D mask: the same log-probs, top-k KL and LoRA gradients as unpacked rows."""
    model, tok = tiny_policy()
    model.set_attn_implementation(attn)
    prompts = ["hi there", "a much longer prompt here", "hi there", "x", "a much longer prompt here", "hi there"]
    comps = ["hello there", "ok", "a b c d e f", "y y", "fine", "z"]
    batch = P.encode_pairs(tok, prompts, comps)
    packing = P.pack_prompts(batch.input_ids, batch.attention_mask, batch.comp_mask)
    assert packing.src.shape[0] == 3 and packing.mask.sum() < batch.attention_mask.sum()
    assert P.pack_prompts(batch.input_ids[:2], batch.attention_mask[:2], batch.comp_mask[:2]) is None
    rows = torch.tensor([5, 1, 0, 3, 2, 4])

    def run(pack):
        monkeypatch.setattr(P, "PACK_PROMPTS", pack)
        monkeypatch.setattr(P, "LENGTH_GROUP_ROWS", 2)
        calls = []
        monkeypatch.setattr(P, "pack_prompts", lambda *a: calls.append(1) or packing_fn(*a))
        with P.lora_attached(model, None, 0) as pm:
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
            top = P.reference_topk(pm, batch, k=4)
            hidden = P.hidden_at(pm, batch, start) if start else None
            lp, kl = P.sequence_logps(pm, batch, rows, hidden, start, ref_top=(top[0][rows], top[1][rows]))
            (lp.sum() + 10 * kl.sum()).backward()
            grads = [p.grad.clone() for p in P.trainable_params(pm, start)]
        monkeypatch.undo()
        return lp.detach(), kl.detach(), grads, len(calls)

    packing_fn = P.pack_prompts
    packed, plain = run(True), run(False)
    assert packed[3] > 0 and plain[3] == 0
    assert torch.allclose(packed[0], plain[0], atol=1e-5) and torch.allclose(packed[1], plain[1], atol=1e-5)
    assert packed[1].abs().sum() > 0 and any(g.abs().sum() > 0 for g in packed[2])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(packed[2], plain[2], strict=True))


def test_packed_prompts_per_token_reference_row_subsets_and_pack_size(monkeypatch):
    model, tok = tiny_policy()
    prompts = ["hi there", "a much longer prompt here", "hi there", "x", "a much longer prompt here", "hi there"]
    comps = ["hello there", "ok", "a b c d e f", "y y", "fine", "z"]
    batch = P.encode_pairs(tok, prompts, comps)

    def values():
        with torch.no_grad(), P.lora_attached(model, None, 0) as pm:
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
            return (P.token_logps(pm, batch, chunk=4) * batch.comp_mask,  # chunks regroup the prompts
                    # fp32: under bf16 autocast (auto on CPUs with native bf16) packing rounds differently
                    P.reference_logps(pm, batch, chunk=4, precision="fp32"),
                    P.sequence_logps(pm, batch, torch.tensor([3, 4, 0, 1])))  # one shared prompt left

    packed = values()
    monkeypatch.setattr(P, "PACK_MAX_COMPLETIONS", 2)  # "hi there" x 3 -> packs of 2 and 1
    pk = P.pack_prompts(batch.input_ids, batch.attention_mask, batch.comp_mask)
    assert pk.src.shape[0] == 4
    capped = values()
    monkeypatch.setattr(P, "PACK_PROMPTS", False)
    plain = values()
    for a, b, c in zip(packed, capped, plain, strict=True):
        assert torch.allclose(a, c, atol=1e-5) and torch.allclose(b, c, atol=1e-5) and c.abs().sum() > 0


def test_packing_is_off_where_a_custom_mask_would_change_the_attention():
    model, tok = tiny_policy()
    assert P.packable(model, 200)
    model.config.sliding_window = 64  # rows longer than the window: its mask would be replaced
    assert P.packable(model, 64) and not P.packable(model, 65)
    model.config.sliding_window = None
    model.config._attn_implementation = "flex_attention"
    assert not P.packable(model, 10)


def test_fused_packed_path_under_bf16_autocast_matches_the_logits_path(monkeypatch):
    model, tok = tiny_policy()
    prompts = ["hi there", "a much longer prompt here", "hi there", "a much longer prompt here"]
    batch = P.encode_pairs(tok, prompts, ["hello there", "ok", "a b c d e f", "fine"])

    def run():
        with P.lora_attached(model, None, 0) as pm:
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lp = P.sequence_logps(pm, batch)
            lp.sum().backward()
            grads = [p.grad.clone() for p in P.trainable_params(pm, 0)]
        return lp.detach(), grads

    fused = run()
    monkeypatch.setattr(P, "plain_head", lambda m: None)
    slow = run()
    assert fused[0].dtype == torch.float32 and torch.allclose(fused[0], slow[0], rtol=0.02, atol=0.05)
    for a, b in zip(fused[1], slow[1], strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=0.1, atol=0.02 * float(b.abs().max()) + 1e-6)


def test_plain_head_only_for_known_bias_free_heads():
    from transformers import GPT2Config, GPT2LMHeadModel

    model, _ = tiny_policy()
    model.config.model_type = "granite"  # scales its logits after the head
    assert P.plain_head(model) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert P.plain_head(gpt2) is None


@pytest.mark.parametrize("start", [0, 1])
def test_length_groups_change_no_logp_or_gradient(monkeypatch, start):
    """Rows run in groups of similar length, cut to the group's longest: the same values and
    LoRA gradients as the whole batch in one forward (up to rounding), rows in their order."""
    model, tok = tiny_policy()
    prompts = ["hi", "a much longer prompt here, with many more words in it", "x", "mid length prompt", "ok", "q"]
    comps = ["hello there", "ok", "a b c d e f g h", "y", "fine thanks", "z z"]
    batch = P.encode_pairs(tok, prompts, comps)
    groups = P.length_groups(batch.attention_mask, batch.comp_len + 1, size=2)
    lens = batch.attention_mask.sum(-1)
    assert sorted(int(i) for g, _ in groups for i in g) == list(range(6))
    assert all(cols >= int(lens[g].max()) for g, cols in groups) and groups[0][1] < batch.input_ids.shape[1]
    rows = torch.tensor([1, 5, 3, 0])  # lengths 75, 24, 38, 33: not in length order

    def run(size, one_row_at_a_time=False):
        monkeypatch.setattr(P, "LENGTH_GROUP_ROWS", size)
        with P.lora_attached(model, None, 0) as pm:
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
            hidden = P.hidden_at(pm, batch, start) if start else None
            if one_row_at_a_time == "model":  # no cut code at all: the model's own logits, one unpadded row each
                lp = []
                for r in rows.tolist():
                    ids = batch.input_ids[r][batch.attention_mask[r].bool()]
                    c = int(batch.comp_mask[r].sum())
                    logp = torch.log_softmax(pm(input_ids=ids[None]).logits[0, :-1], -1)  # [t - 1, V]
                    lp.append(logp[-c:].gather(-1, ids[-c:, None]).sum())
                lp = torch.stack(lp)
            elif one_row_at_a_time:  # no grouping, no reordering
                lp = torch.cat([P.sequence_logps(pm, batch, rows[i:i + 1], hidden, start) for i in range(len(rows))])
            else:
                lp = P.sequence_logps(pm, batch, rows, hidden, start)
            lp.sum().backward()
            grads = [p.grad.clone() for p in P.trainable_params(pm, start)]
        return lp.detach(), grads

    ref, g_ref = run(64, one_row_at_a_time="model")
    one, g_one = run(64, one_row_at_a_time=True)
    grouped, g_grouped = run(2)
    assert torch.allclose(ref, grouped, atol=1e-4) and torch.allclose(one, grouped, atol=1e-4) and one.abs().sum() > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_one, g_grouped, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ref, g_grouped, strict=True))
    assert any(a.abs().sum() > 0 for a in g_one)


def test_base_nll_is_the_per_token_mean_of_the_completion_logps():
    from metarlhf.evaluate_policy import base_nll

    model, tok = tiny_policy()
    prompts, comps = ["hi", "a much longer prompt here", "x"], ["hello there", "ok", "a b c d e"]
    batch = P.encode_pairs(tok, prompts, comps)
    with torch.no_grad():
        want = -float(P.sequence_logps(model, batch).sum()) / float(batch.comp_mask.sum())
    assert base_nll(model, tok, prompts, comps, chunk=2) == pytest.approx(want, rel=1e-5)
    # a completion the model finds likelier lowers the figure
    greedy = P.generate(model, tok, ["hi"], max_new_tokens=6, temperature=0)
    assert base_nll(model, tok, ["hi"], greedy) < base_nll(model, tok, ["hi"], ["zq xv qz vx"])


# ------------------------------------------------------------------ adaptation
def _ratios(model, tok, adapter, records):
    batch = P.encode_pairs(tok, [r.prompt for r in records], [r.completion for r in records])
    with torch.no_grad():
        ref = P.sequence_logps(model, batch)
        with P.adapter_attached(model, adapter) as pm:
            pol = P.sequence_logps(pm, batch)
    return pol - ref


def test_adapt_policy_trains_lora_moves_towards_ups_and_leaves_base_untouched():
    model, tok = tiny_policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = tiny_thumbs()
    cfg = P.AdaptConfig(steps=6, lr=2e-2, precision="fp32", beta=1.0, kto_weight=1.0, sft_weight=0.0, pair_weight=0.0)
    adapter = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)
    # base model unchanged: same keys, same values, no peft leftovers
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    # peft key names; B moved away from its zero init
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in adapter.tensors)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.tensors.items())
    assert adapter.config["r"] == 8 and sorted(adapter.config["target_modules"]) == ["q_proj", "v_proj"]
    m = adapter.meta
    assert m["kind"] == "policy" and m["init"] == "scratch" and m["k"] == 4 and m["steps"] == 6
    assert m["base_model"] == "custom" and len(m["losses"]) == 6 and m["losses"][-1] < m["losses"][0]
    r = _ratios(model, tok, adapter, recs)
    assert float(r[0]) > 0 and float(r[2]) > 0  # ups more likely than under the reference
    assert float(r[1]) < 0 and float(r[3]) < 0  # downs less likely


def test_implicit_scorer_is_the_adapters_log_ratio_and_prefers_the_liked_answers():
    model, tok = tiny_policy()
    recs = tiny_thumbs()
    cfg = P.AdaptConfig(steps=6, lr=2e-2, precision="fp32", beta=1.0, kto_weight=1.0, sft_weight=0.0, pair_weight=0.0)
    adapter = P.adapt_policy(recs, base=(model, tok), init=None, config=cfg)
    want = _ratios(model, tok, adapter, recs)  # reference pass on the plain model, outside the adapter
    with P.adapter_attached(model, adapter) as pm:
        scorer = P.implicit_scorer(pm, tok, chunk=3)
        got = scorer([r.prompt for r in recs], [r.completion for r in recs])
        again = scorer([r.prompt for r in recs], [r.completion for r in recs])  # the adapter is active again
    assert got == pytest.approx(want.tolist(), abs=1e-4) and again == pytest.approx(got, abs=1e-6)
    assert got[0] > got[1] and got[2] > got[3]  # the thumbs-up answers rank above the thumbs-down ones
    zero = P.Adapter({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in adapter.tensors.items()},
                     adapter.config, adapter.meta)
    with P.adapter_attached(model, zero) as pm:  # B = 0: the adapter is the base model, every ratio 0
        assert P.implicit_scorer(pm, tok)(["tell me"], ["- a"]) == pytest.approx([0.0], abs=1e-5)
    assert not hasattr(model, "peft_config")  # and the base model is left as it was


def test_adapt_policy_with_pairs_and_mixedtiny_thumbs():
    model, tok = tiny_policy()
    pairs = [Pair("u", "tell me", "- a\n- b", "words"), Pair("u", "more", "- x", "nah")]
    cfg = P.AdaptConfig(steps=4, lr=2e-2, precision="fp32", kto_weight=1.0, sft_weight=0.0, pair_weight=0.0)
    a = P.adapt_policy(pairs, base=(model, tok), init=None, config=cfg)
    assert a.meta["n_pairs"] == 2 and a.meta["n_thumbs"] == 0 and a.meta["losses"][0] == pytest.approx(math.log(2))
    assert a.meta["losses"][-1] < a.meta["losses"][0]
    mixed = P.adapt_policy(pairs + tiny_thumbs(), base=(model, tok), init=None, config=cfg)
    assert mixed.meta["n_pairs"] == 2 and mixed.meta["n_thumbs"] == 4


def test_saved_adapter_loads_in_peft_and_matches(tmp_path):
    from peft import PeftModel

    model, tok = tiny_policy()
    a = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=None, steps=2, config=P.AdaptConfig(lr=2e-2))
    save_adapter(tmp_path / "ad", a)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), P.adapter_attached(model, a) as pm:
        ours = pm(ids).logits
    fresh, _ = tiny_policy()
    pm2 = PeftModel.from_pretrained(fresh, tmp_path / "ad")
    with torch.no_grad():
        theirs = pm2(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_adapt_from_init_and_init_checks(tmp_path):
    model, tok = tiny_policy()
    first = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=None, steps=1)
    save_adapter(tmp_path / "init", first)
    second = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=str(tmp_path / "init"), steps=1)
    assert second.meta["init_sha256"] == load_adapter(tmp_path / "init").meta["sha256"]
    first.meta["base_model"] = "another-model"
    with pytest.raises(AdapterError, match="made for base model"):
        P.adapt_policy(tiny_thumbs(), base=(model, tok), init=first, steps=1)
    first.meta["kind"] = "reward"
    first.meta["base_model"] = "custom"
    with pytest.raises(AdapterError, match="expected 'policy_init'"):
        P.adapt_policy(tiny_thumbs(), base=(model, tok), init=first, steps=1)


def test_adapt_bad_input():
    model, tok = tiny_policy()
    with pytest.raises(DataError, match="no feedback"):
        P.adapt_policy([], base=(model, tok), init=None)
    with pytest.raises(DataError, match="one user"):
        P.adapt_policy(tiny_thumbs("a") + tiny_thumbs("b"), base=(model, tok), init=None)
    with pytest.raises(ConfigError, match="steps"):
        P.AdaptConfig(steps=0)
    with pytest.raises(ConfigError, match="lr"):
        P.AdaptConfig(lr=float("nan"))
    with pytest.raises(ConfigError):
        P.adapt_policy(tiny_thumbs(), base=42, init=None)


def test_generate_is_deterministic_and_best_of_n_picks_top_score():
    model, tok = tiny_policy()
    a = P.generate(model, tok, ["hi", "there"], max_new_tokens=5, seed=3)
    b = P.generate(model, tok, ["hi", "there"], max_new_tokens=5, seed=3)
    assert a == b and len(a) == 2
    best = P.best_of_n(model, tok, ["hi"], scorer=lambda ps, cs: [len(c) for c in cs], n=4, max_new_tokens=6)
    cands = P.generate(model, tok, ["hi"] * 4, max_new_tokens=6)
    assert len(best[0]) == max(len(c) for c in cands)


def test_augmentation_adds_ranked_thumbs():
    model, tok = tiny_policy()
    recs = tiny_thumbs()
    extra = P.augment_with_scorer(model, tok, recs, lambda ps, cs: [len(c) for c in cs], n=4, max_new_tokens=6)
    assert len(extra) == 2 * 4 and sum(t.label for t in extra) == 4
    for p in {"tell me", "say more"}:
        group = [t for t in extra if t.prompt == p]
        assert min(len(t.completion) for t in group if t.label) >= max(len(t.completion) for t in group if not t.label)


# ------------------------------------------------------------------ meta-training
def test_meta_train_reptile_writes_init_and_resumes(tmp_path):
    model, tok = tiny_policy()
    prompts = [f"question {i}?" for i in range(10)]
    users = get_users(["bullets", "concise-15", "casual"])
    cfg = P.MetaConfig(meta_steps=2, pool_prompts=8, max_new_tokens=6, checkpoint_every=1)
    kto = P.AdaptConfig(kto_weight=1.0, sft_weight=0.0, pair_weight=0.0)  # learns from all-down groups too
    a = P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg, adapt_config=kto, base=(model, tok),
                            progress=False)
    assert a.meta["kind"] == "policy_init" and a.meta["steps"] == 2 and len(a.meta["losses"]) == 2
    saved = load_adapter(tmp_path / "init", expect_kind="policy_init", expect_rank=8)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.tensors.items())
    work = tmp_path / "init.work"
    assert (work / "pool.jsonl").is_file() and (work / "checkpoint" / "state.json").is_file()
    cfg4 = P.MetaConfig(meta_steps=4, pool_prompts=8, max_new_tokens=6, checkpoint_every=1)
    P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg4, adapt_config=kto, base=(model, tok),
                        resume=True, progress=False)
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the init records what it was trained on
    init = load_adapter(tmp_path / "init", expect_kind="policy_init")
    assert init.meta["train_users"] == ["bullets", "concise-15", "casual"]
    assert init.meta["prompt_digests"] == prompt_digests(prompts[:8]) and len(init.meta["prompt_digests"]) == 8
    assert init.meta["prompts_sha256"] == text_digest(prompts[:8])
    # resuming on other prompts (another file or offset) or other users would mix two runs: refused
    cfg6 = P.MetaConfig(meta_steps=6, pool_prompts=8, max_new_tokens=6, checkpoint_every=1)
    with pytest.raises(ConfigError, match="other prompts"):
        P.meta_train_policy(prompts[1:], users, tmp_path / "init", config=cfg6, adapt_config=kto, base=(model, tok),
                            resume=True, progress=False)
    with pytest.raises(ConfigError, match="trained on users"):
        P.meta_train_policy(prompts, users[:2], tmp_path / "init", config=cfg6, adapt_config=kto, base=(model, tok),
                            resume=True, progress=False)
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # resuming with another adaptation recipe (here the fluency anchor) would mix two recipes: refused
    with pytest.raises(ConfigError, match="adapt_config.kl_weight"):
        P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg4, base=(model, tok), resume=True,
                            adapt_config=P.AdaptConfig(**{**vars(kto), "kl_weight": 0.5}), progress=False)
    # a checkpoint written before a setting existed (here contrast_weight) had it at its default
    state_file = work / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["adapt_config"]["contrast_weight"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="adapt_config.contrast_weight"):
        P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg4, base=(model, tok), resume=True,
                            adapt_config=P.AdaptConfig(**{**vars(kto), "contrast_weight": 1.0}), progress=False)
    # the saved init works as an init for adaptation
    saved = load_adapter(tmp_path / "init", expect_kind="policy_init")
    ad = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=str(tmp_path / "init"), steps=1)
    assert ad.meta["init_sha256"] == saved.meta["sha256"]


def test_meta_train_fomaml_and_bad_config(tmp_path):
    model, tok = tiny_policy()
    prompts = [f"q {i}" for i in range(8)]
    cfg = P.MetaConfig(algo="fomaml", meta_steps=2, pool_prompts=8, max_new_tokens=4, checkpoint_every=1)
    a = P.meta_train_policy(prompts, get_users(["bullets"]), tmp_path / "f", config=cfg, base=(model, tok),
                            progress=False)  # default recipe; all-down groups give no SFT / pair term: no step
    rows = [json.loads(x) for x in (tmp_path / "f.work" / "metrics.jsonl").read_text().splitlines()]
    assert all("query_loss" in r for r in rows) and a.meta["algo"] == "fomaml"
    with pytest.raises(ConfigError, match="algo"):
        P.MetaConfig(algo="maml2")
    with pytest.raises(DataError, match="at least"):
        P.meta_train_policy(prompts[:3], get_users(["bullets"]), tmp_path / "g", config=cfg, base=(model, tok))


def test_meta_train_fomaml_resumes_with_untrained_lower_layers(tmp_path):
    """Layers below train_layers never step, so they have no Adam state to save or restore."""
    model, tok = tiny_policy()
    prompts = [f"q {i}" for i in range(8)]
    kto = P.AdaptConfig(kto_weight=1.0, sft_weight=0.0, pair_weight=0.0, train_layers=1)  # 1 of 2 layers
    cfg = P.MetaConfig(algo="fomaml", meta_steps=2, pool_prompts=8, max_new_tokens=4, checkpoint_every=1)
    P.meta_train_policy(prompts, get_users(["bullets"]), tmp_path / "f", config=cfg, adapt_config=kto,
                        base=(model, tok), progress=False)
    saved = load_tensors(tmp_path / "f.work" / "checkpoint" / "outer.safetensors")
    assert saved and all(".layers.1." in k for k in saved)
    cfg3 = P.MetaConfig(algo="fomaml", meta_steps=3, pool_prompts=8, max_new_tokens=4, checkpoint_every=1)
    a = P.meta_train_policy(prompts, get_users(["bullets"]), tmp_path / "f", config=cfg3, adapt_config=kto,
                            base=(model, tok), resume=True, progress=False)
    assert a.meta["steps"] == 3


def test_task_subspace_recovers_the_directions_the_tasks_share():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 2))  # a 2-d subspace of R^12 (orthonormal columns)
    u = u.T  # [2, 12]
    deltas = [torch.randn(5, 2) @ u for _ in range(3)]  # every task moves inside it
    a, energy = P.task_subspace(deltas, 2, row_norm=0.5)
    assert a.shape == (2, 12) and energy == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(a @ u.T @ u, a, atol=1e-5)  # rows lie in the shared subspace
    assert torch.allclose(a @ a.T, 0.25 * torch.eye(2), atol=1e-5)  # orthogonal, each of norm 0.5
    a3, e3 = P.task_subspace(deltas + [torch.randn(5, 12)], 3, row_norm=1.0)  # a stray task: energy < 1
    assert a3.shape == (3, 12) and 0 < e3 < 1 and torch.allclose(a3 @ a3.T, torch.eye(3), atol=1e-5)
    with pytest.raises(DataError):
        P.task_subspace([], 2, 1.0)
    # energy is the share of *squared* singular values: (3, 2, 1) at rank 2 -> 13 / 14
    _, e = P.task_subspace([torch.diag(torch.tensor([3.0, 2.0, 1.0]))], 2, 1.0)
    assert e == pytest.approx(13 / 14, abs=1e-6)
    one = [torch.randn(1, 12)]  # one row, rank 3: the basis is completed, deterministically
    assert torch.equal(P.task_subspace(one, 3, 1.0)[0], P.task_subspace(one, 3, 1.0)[0])


def test_meta_train_subspace_init_is_the_base_model_and_resumes(tmp_path, monkeypatch):
    model, tok = tiny_policy()
    prompts = [f"question {i}?" for i in range(10)]
    users = get_users(["bullets", "concise-15"])
    # KTO learns from all-down groups too; train_layers=1 leaves layer 0 untrained, so its A shows each task's draw
    kto = P.AdaptConfig(kto_weight=1.0, sft_weight=0.0, pair_weight=0.0, train_layers=1)
    cfg = P.MetaConfig(algo="subspace", meta_steps=2, inner_steps=2, pool_prompts=8, max_new_tokens=6,
                       checkpoint_every=1, task_a="per-task")
    a = P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg, adapt_config=kto, base=(model, tok),
                            progress=False)
    rows = [json.loads(x) for x in (tmp_path / "init.work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["user"] for r in rows] == ["bullets", "concise-15"]  # the users in turn
    assert a.meta["algo"] == "subspace" and a.meta["subspace"]["tasks"] == 2 and a.meta["subspace"]["modules"] > 0
    tasks = tmp_path / "init.work" / "tasks"
    t1, t2 = (load_tensors(tasks / f"task_{i:05d}.safetensors") for i in (1, 2))
    a0 = [k for k in t1 if ".layers.0." in k and "lora_A" in k]
    assert a0 and not any(torch.equal(t1[k], t2[k]) for k in a0)  # every task drew its own A
    shared = P.meta_train_policy(prompts, users, tmp_path / "shared", config=P.MetaConfig(**{**cfg.__dict__, "task_a": "shared"}),
                                 adapt_config=kto, base=(model, tok), progress=False)
    s1, s2 = (load_tensors(tmp_path / "shared.work" / "tasks" / f"task_{i:05d}.safetensors") for i in (1, 2))
    assert all(torch.equal(s1[k], s2[k]) for k in a0) and shared.meta["meta_config"]["task_a"] == "shared"
    with pytest.raises(ConfigError, match="task_a"):
        P.MetaConfig(task_a="each")
    saved = load_adapter(tmp_path / "init", expect_kind="policy_init", expect_rank=8)
    assert all(v.abs().sum() == 0 for k, v in saved.tensors.items() if "lora_B" in k)
    with P.lora_attached(model, None, 0) as pm:
        fresh = P.lora_state(pm)
    moved = [k for k, v in saved.tensors.items() if "lora_A" in k and not torch.allclose(v, fresh[k])]
    assert moved  # A now spans the tasks' update directions: orthogonal rows of the fresh rows' mean norm
    for k in moved:
        g = saved.tensors[k].float() @ saved.tensors[k].float().T
        assert torch.allclose(g, g[0, 0] * torch.eye(g.shape[0]), atol=1e-4)
    ids = tok("question 1?", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
        with P.adapter_attached(model, saved) as pm:
            init_logits = pm(ids).logits
    assert torch.allclose(base_logits, init_logits, atol=1e-6)  # B = 0: the init is the base model
    cfg3 = P.MetaConfig(**{**cfg.__dict__, "meta_steps": 3})
    calls = []
    real_train = P.train_steps
    monkeypatch.setattr(P, "train_steps", lambda *a, **kw: calls.append(1) or real_train(*a, **kw))
    b = P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg3, adapt_config=kto, base=(model, tok),
                            resume=True, progress=False)
    assert len(calls) == 1  # resumed: only task 3 ran
    assert b.meta["subspace"]["tasks"] == 3 and len(list(tasks.iterdir())) == 3
    assert torch.equal(load_tensors(tasks / "task_00001.safetensors")[a0[0]], t1[a0[0]])
    ad = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=str(tmp_path / "init"), steps=1)
    assert ad.meta["init_sha256"] == b.meta["sha256"]
    # resuming with other task settings is refused, not mixed into one subspace
    with pytest.raises(ConfigError, match="task_a='per-task' \\(now 'shared'\\)"):
        P.meta_train_policy(prompts, users, tmp_path / "init", config=P.MetaConfig(**{**cfg3.__dict__, "task_a": "shared"}),
                            adapt_config=kto, base=(model, tok), resume=True, progress=False)
    with pytest.raises(ConfigError, match="'subspace' only"):
        P.MetaConfig(algo="reptile", task_a="per-task")
    # a missing task file is refused on resume, not silently left out of the subspace
    (tasks / "task_00002.safetensors").unlink()
    with pytest.raises(DataError, match="task files missing"):
        P.meta_train_policy(prompts, users, tmp_path / "init", config=cfg3, adapt_config=kto, base=(model, tok),
                            resume=True, progress=False)
    # a fresh run (no resume) starts over: old task files are discarded
    P.meta_train_policy(prompts, users, tmp_path / "init2", work=tmp_path / "init.work", config=cfg,
                        adapt_config=kto, base=(model, tok), progress=False)
    assert sorted(f.name for f in tasks.iterdir()) == ["task_00001.safetensors", "task_00002.safetensors"]


# ------------------------------------------------------------------ CLI
@pytest.fixture
def tiny_dir(tmp_path):
    model, tok = tiny_policy()
    return save_tiny(model, tok, tmp_path / "tiny")


def test_cli_adapt_policy(tmp_path, tiny_dir, capsys):
    data = tmp_path / "fb.jsonl"
    data.write_text("".join(json.dumps({"user_id": r.user_id, "prompt": r.prompt, "completion": r.completion,
                                        "label": r.label}) + "\n" for r in tiny_thumbs("alice")))
    out = tmp_path / "out"
    rc = main(["adapt", "policy", "--data", str(data), "--user", "alice", "--k", "4", "--out", str(out),
               "--init", "scratch", "--policy", str(tiny_dir), "--steps", "2"])
    assert rc == 0
    ad = load_adapter(out, expect_kind="policy")
    assert ad.meta["k"] == 4 and ad.meta["steps"] == 2
    assert main(["adapt", "policy", "--data", str(data), "--user", "bob", "--k", "4", "--out", str(out),
                 "--init", "scratch", "--policy", str(tiny_dir)]) == 2
    assert main(["adapt", "policy", "--data", str(data), "--user", "alice", "--k", "9", "--out", str(out),
                 "--init", "scratch", "--policy", str(tiny_dir)]) == 2
    assert "only 4 records" in capsys.readouterr().err
    assert main(["adapt", "policy", "--data", str(data), "--user", "alice", "--k", "4", "--out", str(out),
                 "--init", str(tmp_path / "missing"), "--policy", str(tiny_dir)]) == 2
    assert load_adapter(out).meta["sha256"] == ad.meta["sha256"]  # nothing stored was lost


def test_cli_eval_policy_with_users_file(tmp_path, tiny_dir):
    users = tmp_path / "users.py"
    users.write_text("USERS = {'likes-e': lambda p, c: c.count('e')}\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "res.json"
    rc = main(["eval", "policy", "--users-file", str(users), "--users", "likes-e,bullets", "--k", "2", "4",
               "--prompts", str(prompts), "--offset", "0", "--eval-prompts", "3", "--methods", "scratch",
               "--steps", "1", "--max-new-tokens", "4", "--policy", str(tiny_dir), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    # 2 users x 2 K x 2 exploration protocols (hints and plain, both by default)
    assert len(res["rows"]) == 8 and {r["user"] for r in res["rows"]} == {"likes-e", "bullets"}
    assert all(0 <= r["win_rate"] <= 1 and r["adapt_s"] > 0 for r in res["rows"])
    assert all(r["nll_personal"] > 0 and r["nll_base"] > 0 for r in res["rows"])
    assert all(0 <= r["fluent_win_rate"] <= r["win_rate"] and 0 <= r["fluency_drop_rate"] <= 1 for r in res["rows"])
    assert all("fluent_win_rate" in s for s in res["summary"])
    assert 0 <= res["base_resample_fluency_drop_rate"] <= 1
    assert all(math.isfinite(r["relevance"]) and 0 <= r["repeat_opening_rate"] <= 1 for r in res["rows"])
    assert all(0 <= r["loop_rate"] <= 1 and 0 <= r["sound_win_rate"] <= r["fluent_win_rate"] for r in res["rows"])
    assert 0 <= res["base_loop_rate"] <= 1 and "sound_win_rate" in res["summary"][0]
    assert all(len(r["answers"]) == 3 for r in res["rows"]) and len(res["base_answers"]) == 3
    assert res["software"]["torch"] == torch.__version__ and "transformers" in res["software"]
    assert all(r["win_rate"] == pytest.approx(sum(r["outcomes"]) / 3) for r in res["rows"])
    assert all(s["win_rate_ci95"][0] <= s["win_rate"] <= s["win_rate_ci95"][1] for s in res["summary"])
    # users resampled too: at least as wide as with the users fixed
    assert all(s["win_rate_ci95_users"][0] <= s["win_rate_ci95"][0] + 1e-9 and
               s["win_rate_ci95_users"][1] >= s["win_rate_ci95"][1] - 1e-9 for s in res["summary"])
    # against an independent second base sample, which the result keeps
    assert len(res["base_resample_answers"]) == 3 and res["base_resample_answers"] != res["base_answers"]
    assert all(0 <= r["win_rate_vs_resample"] <= 1 for r in res["rows"]) and "win_rate_vs_resample" in res["summary"][0]
    assert math.isfinite(res["base_relevance"]) and "relevance" in res["summary"][0]
    assert {(s["method"], s["explore"], s["k"]) for s in res["summary"]} == {
        ("scratch", e, k) for e in ("hints", "plain") for k in (2, 4)}
    hints = res["exploration_hints"]
    assert set(hints["plain"]) == {None} and sum(h is not None for h in hints["hints"]) == 3  # 4 samples, 1 plain
    assert out.with_suffix(".png").stat().st_size > 1000


def test_cli_eval_policy_bad_users_file(tmp_path, tiny_dir, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    rc = main(["eval", "policy", "--users-file", str(bad), "--prompts", str(bad), "--out", str(tmp_path / "r.json"),
               "--policy", str(tiny_dir)])
    assert rc == 2 and "boom" in capsys.readouterr().err


def test_repetition_loops_and_win_rate_without():
    from metarlhf.evaluate_policy import repetition_loops, win_rate_without

    loops = ["I being MIA. I being MIA. I being MIA.", "really, very, very, very, very, very, very",
             "I'm gonna see her, I'm gonna see her now"]
    fine = ["I'm a bit of a stubborn one, and I'm a bit of a pragmatist, and I'm a bit of a cook.",  # not back to back
            "een een een", "you can, you can", "A plain answer that says one thing once.", ""]
    assert repetition_loops(loops + fine) == [True] * 3 + [False] * 5
    assert win_rate_without([2, 1, 3], [1, 1, 0], [False, False, True]) == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(DataError):
        win_rate_without([1], [1, 2], [False])


def test_bootstrap_ci_resamples_prompts_within_users():
    from metarlhf.evaluate_policy import bootstrap_ci

    assert bootstrap_ci([[1.0] * 5, [0.0] * 7]) == (0.5, 0.5)  # no spread within users: no width
    lo, hi = bootstrap_ci([[0.0, 1.0] * 6])
    wide_lo, wide_hi = bootstrap_ci([[0.0, 1.0] * 2])
    assert lo < 0.5 < hi and wide_lo < lo and hi < wide_hi  # more prompts, a narrower interval
    assert bootstrap_ci([[0.0, 1.0] * 6], seed=3) == bootstrap_ci([[0.0, 1.0] * 6], seed=3)
    with pytest.raises(DataError):
        bootstrap_ci([[1.0], []])
    with pytest.raises(ConfigError):
        bootstrap_ci([[1.0]], level=1.0)


def test_method_gaps_pair_rows_by_user():
    from metarlhf.evaluate_policy import method_gaps

    def row(user, method, outcomes, k=16):
        return {"user": user, "method": method, "explore": "adaptive", "k": k, "outcomes": outcomes,
                "win_rate": sum(outcomes) / len(outcomes)}

    rows = [row("a", "meta", [1, 1, 1, 1]), row("a", "scratch", [1, 1, 0, 0]),
            row("b", "meta", [0, 0, 1, 1]), row("b", "scratch", [0, 0, 1, 1]),
            row("c", "meta", [1, 1, 1, 1])]  # c has no scratch row: not paired
    gaps = method_gaps(rows)
    assert set(gaps) == {"adaptive/k16"} and gaps["adaptive/k16"]["users"] == 2
    assert gaps["adaptive/k16"]["gap"] == pytest.approx(0.25)
    lo, hi = gaps["adaptive/k16"]["ci95"]
    assert 0 <= lo <= 0.25 <= hi <= 0.5  # b's differences are all 0, a's are 0 or 1
    del rows[1]["outcomes"]
    assert "ci95" not in method_gaps(rows)["adaptive/k16"]  # a gap, but no interval without outcomes


def test_win_rate_counts_ties_as_half():
    from metarlhf.evaluate_policy import win_rate

    assert win_rate([2, 1, 0, 3], [1, 1, 1, 3]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    with pytest.raises(DataError):
        win_rate([], [])


def test_fluent_win_rate_counts_fluency_drops_as_losses():
    from metarlhf.evaluate_policy import base_nll_rows, fluent_win_rate

    # wins on prompts 0 and 1, a tie on 2, a loss on 3; prompt 1's answer is 1.5 nats/token less fluent
    win, drops = fluent_win_rate([2, 2, 1, 0], [1, 1, 1, 1], [2.0, 3.5, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0])
    assert win == pytest.approx((1 + 0 + 0.5 + 0) / 4) and drops == pytest.approx(1 / 4)
    assert fluent_win_rate([2], [1], [2.9], [2.0]) == (1.0, 0.0)  # within 1 nat: still a win
    with pytest.raises(DataError):
        fluent_win_rate([1], [1, 2], [1], [1])
    model, tok = tiny_policy()
    prompts, comps = ["hi", "a much longer prompt here"], ["hello there", "ok"]
    rows, mean = base_nll_rows(model, tok, prompts, comps)
    batch = P.encode_pairs(tok, prompts, comps)
    words = batch.comp_mask.clone()
    words[:, -1] = 0
    with torch.no_grad():
        lp = P.sequence_logps(model, batch)
        wlp = P.sequence_logps(model, dataclasses.replace(batch, comp_mask=words))
    ntok = batch.comp_mask.sum(-1)
    assert rows == pytest.approx((-wlp / words.sum(-1)).tolist(), rel=1e-5)  # per answer: words only, no EOS
    assert mean == pytest.approx(float(-lp.sum() / ntok.sum()), rel=1e-5)  # the mean keeps the EOS
    assert words.sum() == ntok.sum() - len(comps)
    assert base_nll_rows(model, tok, ["hi"], [""])[0] == [math.inf]  # an empty answer is no fluent answer


def test_prompt_relevance_is_own_prompt_gain_over_the_next_prompt():
    from metarlhf.evaluate_policy import base_nll_rows, prompt_relevance

    model, tok = tiny_policy()
    prompts, comps = ["hi", "a much longer prompt here", "third"], ["hello there", "ok", ""]
    rel = prompt_relevance(model, tok, prompts, comps)
    own = base_nll_rows(model, tok, prompts, comps)[0]
    other = base_nll_rows(model, tok, [prompts[1], prompts[2], prompts[0]], comps)[0]
    assert rel[:2] == pytest.approx([other[0] - own[0], other[1] - own[1]], rel=1e-5)
    assert rel[2] == 0.0  # an empty answer carries no information about its prompt
    assert prompt_relevance(model, tok, prompts, comps, own_nll=own) == pytest.approx(rel)
    # a repeated prompt is compared with the next *distinct* one, never with itself
    dup = prompt_relevance(model, tok, ["hi", "hi", "third"], ["hello there", "ok", "yes"])
    vs_third = base_nll_rows(model, tok, ["third", "third", "hi"], ["hello there", "ok", "yes"])[0]
    own_dup = base_nll_rows(model, tok, ["hi", "hi", "third"], ["hello there", "ok", "yes"])[0]
    assert dup == pytest.approx([o - w for o, w in zip(vs_third, own_dup, strict=True)], rel=1e-5)
    assert min(abs(d) for d in dup) > 1e-4  # (with the plain next entry, the first answer would score 0)
    for bad in (["one prompt"], ["q", "q"]):
        with pytest.raises(DataError):
            prompt_relevance(model, tok, bad, ["an answer"] * len(bad))


def test_repeated_openings_flags_answers_that_open_alike():
    from metarlhf.evaluate_policy import repeated_openings

    comps = ["What's that? Two lasses. We don't", "what's that two LASSES, we sing", "Here is a plan", "", ""]
    assert repeated_openings(comps) == [True, True, False, False, False]  # empty answers never count
    assert repeated_openings(["a b c d e f", "a b c d e g"]) == [True, True]  # five words decide
    assert repeated_openings(["a b c d e", "a b c d x"]) == [False, False]


def test_parse_method():
    from metarlhf.evaluate_policy import parse_method

    m = parse_method("meta+bon4")
    assert (m.init, m.best_of, m.augment, m.uses_reward, m.implicit) == ("meta", 4, 0, True, False)
    m = parse_method("scratch+ibon8")  # ranked by the adapter itself: no reward model needed
    assert (m.init, m.best_of, m.implicit, m.uses_reward) == ("scratch", 8, True, False)
    assert parse_method("meta+ibon2+aug2").uses_reward  # augmentation still needs one
    m = parse_method("meta+bon4+aug2+rank")  # one of each option is fine
    assert (m.best_of, m.augment, m.rank, m.implicit) == (4, 2, True, False)
    for text in ("meta+aug0", "meta+bon 4", "meta+bon4_0", "meta+ibon", "meta+bon-1"):
        with pytest.raises(ConfigError):
            parse_method(text)
    for text in ("meta+bon2+ibon2", "meta+ibon1+bon4", "meta+bon1+ibon4", "meta+bon4+bon4", "meta+aug2+aug3",
                 "meta+rank+rank"):
        with pytest.raises(ConfigError, match="once at most"):
            parse_method(text)
    assert parse_method("scratch+aug3").augment == 3 and not parse_method("scratch").uses_reward
    with pytest.raises(ConfigError, match="unknown option"):
        parse_method("meta+xyz")
    with pytest.raises(ConfigError):
        parse_method("meta+aug1")


def test_eval_with_reward_model_methods(monkeypatch):
    import metarlhf.evaluate_policy as E

    calls = []

    def fake_scorer(reward_model, support, seed):
        calls.append(len(support))
        return lambda ps, cs: [float(c.count("e")) for c in cs]

    monkeypatch.setattr(E, "_load_reward_model", lambda: object())
    monkeypatch.setattr(E, "personal_scorer", fake_scorer)
    model, tok = tiny_policy()
    cfg = E.EvalConfig(ks=[4], eval_prompts=2, methods=["scratch", "scratch+bon3", "scratch+aug2", "scratch+ibon3"],
                       steps=1, max_new_tokens=4, explore=["plain"])
    res = E.evaluate_policy(get_users(["bullets"]), [f"q{i}" for i in range(4)], cfg, base=(model, tok),
                            progress=False)
    assert [r["method"] for r in res["rows"]] == ["scratch", "scratch+bon3", "scratch+aug2", "scratch+ibon3"]
    assert calls == [4]  # one personalized reward model per (user, K), shared by both methods; none for ibon


def test_eval_ibon_ranks_with_the_adapter_and_needs_no_reward_model(monkeypatch):
    import metarlhf.evaluate_policy as E

    def no_reward_model(*a, **k):
        raise AssertionError("ibon must not load or fit a reward model")

    ranked = []
    real = P.implicit_scorer

    def recording_scorer(pm, tok, *a, **k):
        scorer = real(pm, tok, *a, **k)

        def wrapped(ps, cs):
            ranked.append(len(cs))
            return scorer(ps, cs)
        return wrapped

    monkeypatch.setattr(E, "_load_reward_model", no_reward_model)
    monkeypatch.setattr(E, "personal_scorer", no_reward_model)
    monkeypatch.setattr(P, "implicit_scorer", recording_scorer)  # evaluate_policy imports it at call time
    model, tok = tiny_policy()
    cfg = E.EvalConfig(ks=[4], eval_prompts=2, methods=["scratch+ibon3"], steps=1, max_new_tokens=4,
                       explore=["plain"])
    res = E.evaluate_policy(get_users(["bullets"]), [f"q{i}" for i in range(4)], cfg, base=(model, tok),
                            progress=False)
    assert [r["method"] for r in res["rows"]] == ["scratch+ibon3"]
    assert ranked == [2 * 3]  # the 3 samples of each of the 2 held-out prompts, ranked by the adapter


def test_eval_and_cli_defaults_follow_the_adaptation_recipe():
    import argparse

    from metarlhf.commands import policy as cmd
    from metarlhf.evaluate_policy import EvalConfig

    d = P.AdaptConfig()
    assert (EvalConfig().steps, EvalConfig().lr) == (d.steps, d.lr)
    groups = {}
    sub = argparse.ArgumentParser().add_subparsers()
    for name in ("meta-train", "adapt", "eval"):
        groups[name] = sub.add_parser(name).add_subparsers()
    cmd.register(groups)
    adapt = groups["adapt"].choices["policy"].parse_args(["--data", "x", "--user", "u", "--k", "4", "--out", "o"])
    assert (adapt.steps, adapt.lr) == (d.steps, d.lr)
    ev = groups["eval"].choices["policy"].parse_args(["--prompts", "p", "--out", "o"])
    assert (ev.steps, ev.lr) == (d.steps, d.lr)


def test_eval_refuses_users_and_prompts_the_init_was_meta_trained_on(tmp_path, tiny_dir, capsys, monkeypatch, caplog):
    from metarlhf.evaluate_policy import EvalConfig, check_init_overlap

    model, tok = tiny_policy()
    prompts = [f"question {i}?" for i in range(12)]
    cfg = P.MetaConfig(meta_steps=1, pool_prompts=4, max_new_tokens=4, checkpoint_every=1, support_prompts=2,
                       query_prompts=1)
    P.meta_train_policy(prompts, get_users(["bullets"]), tmp_path / "init", config=cfg, base=(model, tok),
                        progress=False)
    ev = EvalConfig(ks=[2], eval_prompts=2, methods=["meta", "scratch"], meta_init=str(tmp_path / "init"))
    assert check_init_overlap(ev, ["casual"], prompts[6:9]) == {"meta": {"users": [], "prompts": 0}}
    with pytest.raises(ConfigError, match="user\\(s\\) bullets"):
        check_init_overlap(ev, ["bullets", "casual"], prompts[6:9])
    with pytest.raises(ConfigError, match="2 of the evaluation's prompts"):
        check_init_overlap(ev, ["casual"], prompts[2:5])
    allowed = EvalConfig(**{**vars(ev), "allow_seen": True})
    assert check_init_overlap(allowed, ["bullets"], prompts[2:5]) == {"meta": {"users": ["bullets"], "prompts": 2}}
    # an init without prompt digests (made before they were recorded): prompts unknown, users still checked
    meta_file = tmp_path / "init" / "metarlhf.json"
    meta = json.loads(meta_file.read_text())
    del meta["prompt_digests"]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="metarlhf.evaluate_policy"):
        assert check_init_overlap(ev, ["casual"], prompts[:3]) == {"meta": {"users": [], "prompts": None}}
        check_init_overlap(ev, ["casual"], prompts[:3], warn=False)  # the command's early check: no second warning
    assert sum("does not record its meta-training prompts" in r.message for r in caplog.records) == 1
    # a user's own adapter as the init (a neighbour's, say): trained on that user
    save_adapter(tmp_path / "own", P.adapt_policy(tiny_thumbs("casual"), base=(model, tok), init=None,
                                                config=P.AdaptConfig(steps=1)))
    own = EvalConfig(**{**vars(ev), "meta_init": str(tmp_path / "own")})
    with pytest.raises(ConfigError, match="user\\(s\\) casual"):
        check_init_overlap(own, ["bullets", "casual"], prompts[6:9], warn=False)
    assert check_init_overlap(own, ["bullets"], prompts[6:9], warn=False)["meta"]["users"] == []
    # ...and on its prompts, which it records and passes on to adapters made from it
    assert json.loads((tmp_path / "own" / "metarlhf.json").read_text())["prompt_digests"] == prompt_digests(
        ["tell me", "say more"])
    with pytest.raises(ConfigError, match="2 of the evaluation's prompts"):
        check_init_overlap(own, ["bullets"], ["tell me", "say more", "new one"], warn=False)
    grandchild = P.adapt_policy([Thumbs("formal", "elsewhere", "ok", 1)], base=(model, tok),
                                init=str(tmp_path / "own"), config=P.AdaptConfig(steps=1))
    assert grandchild.meta["init_prompt_digests"] == prompt_digests(["tell me", "say more"])
    assert grandchild.meta["prompt_digests"] == prompt_digests(["elsewhere"])
    # a user adapter adapted from the meta-init inherits what that init was trained on
    meta["prompt_digests"] = prompt_digests(prompts[:4])
    meta_file.write_text(json.dumps(meta))
    child = P.adapt_policy(tiny_thumbs("casual"), base=(model, tok), init=str(tmp_path / "init"),
                           config=P.AdaptConfig(steps=1))
    assert child.meta["init_train_users"] == ["bullets"]
    save_adapter(tmp_path / "child", child)
    kid = EvalConfig(**{**vars(ev), "meta_init": str(tmp_path / "child")})
    with pytest.raises(ConfigError, match="user\\(s\\) bullets, casual"):
        check_init_overlap(kid, ["bullets", "casual", "formal"], prompts[6:9], warn=False)
    with pytest.raises(ConfigError, match="2 of the evaluation's prompts"):
        check_init_overlap(kid, ["formal"], prompts[2:5], warn=False)
    assert check_init_overlap(kid, ["formal"], prompts[6:9], warn=False) == {"meta": {"users": [], "prompts": 0}}
    # the command refuses before it loads the model
    import metarlhf.commands.policy as cp

    monkeypatch.setattr(cp, "_base", lambda *a, **k: pytest.fail("the model was loaded first"))
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rc = main(["eval", "policy", "--users", "bullets", "--k", "2", "--prompts", str(pf), "--offset", "6",
               "--eval-prompts", "2", "--init", str(tmp_path / "init"), "--policy", str(tiny_dir),
               "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "--allow-seen" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_init_lineage_follows_the_chain_and_ignores_malformed_fields():
    meta_init = {"kind": "policy_init", "train_users": ["bullets", "casual"], "prompt_digests": ["d1", "d2"]}
    first = {"kind": "policy", "user_id": "formal", **P.init_lineage(meta_init)}  # adapted from the meta-init
    second = P.init_lineage(first)  # a user adapted from `first` (a neighbour's adapter, say)
    assert second == {"init_train_users": ["bullets", "casual", "formal"], "init_prompt_digests": ["d1", "d2"]}
    assert P.init_lineage(None) == {"init_train_users": [], "init_prompt_digests": None}
    bad = {"train_users": "bullets", "init_train_users": [3], "prompt_digests": "d1", "init_prompt_digests": None}
    assert P.init_lineage(bad) == {"init_train_users": ["3"], "init_prompt_digests": None}  # no letters of a string

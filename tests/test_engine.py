"""MultiAdapterEngine on a tiny random Llama: mixed-adapter batches vs peft references,
the adapter cache (hits read nothing, bounded residency, pin, evict), bad adapters,
sampling parameters, stop strings and streaming."""

import math
import shutil
import threading

import pytest
import torch

from metarlhf.adapters import WEIGHTS_FILE, Adapter, save_adapter
from metarlhf.engine import (
    BASE,
    AdapterRef,
    GenerationRequest,
    MultiAdapterEngine,
    SamplingParams,
    find_stop,
    lora_delta,
    safe_stream_end,
    sample_token,
    stop_holdback,
    top_p_mask,
)
from metarlhf.errors import AdapterError, ConfigError
from metarlhf.testing import tiny_policy

BASE_NAME = "tiny-llama"
PROMPTS = ["hello there", "the cat sat on", "a", "what is two plus two?", "xyz xyz xyz"]


def random_lora(model, seed, r=8, targets=("q_proj", "v_proj"), scale=0.5):
    """peft-format LoRA tensors (``get_peft_model_state_dict`` key names), nonzero B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, torch.nn.Linear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) * scale
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * scale
    return tensors


def make_adapter(path, model, seed, r=8, base=BASE_NAME, kind="policy", alpha=16, targets=("q_proj", "v_proj"),
                 scale=0.5):
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
    }
    save_adapter(path, Adapter(random_lora(model, seed, r, targets, scale), config, {"kind": kind, "base_model": base}))
    return str(path)


def fresh_model():
    return tiny_policy(seed=0)


@pytest.fixture
def setup(tmp_path):
    model, tok = fresh_model()
    refs = [AdapterRef(f"u{i}", 1, make_adapter(tmp_path / f"u{i}" / "v1", model, seed=100 + i)) for i in range(4)]
    return model, tok, refs, tmp_path


def reference_tokens(ref_path, prompt, n, seed_model=0):
    """Greedy tokens from HF ``generate`` on a peft-wrapped copy of the tiny model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from metarlhf.adapters import load_adapter

    model, tok = tiny_policy(seed=seed_model)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ref_path is not None:
        ad = load_adapter(ref_path)
        cfg = LoraConfig(**{k: v for k, v in ad.config.items() if k != "peft_type"})
        model = get_peft_model(model, cfg)
        set_peft_model_state_dict(model, ad.tensors)
        model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return new


# --- pure helpers ------------------------------------------------------------------------
def test_top_p_mask_hand_computed():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert top_p_mask(probs, 0.5).tolist() == [False, True, False, False]
    assert top_p_mask(probs, 0.6).tolist() == [False, True, False, True]  # 0.5 < 0.6 -> add 0.25
    assert top_p_mask(probs, 0.75).tolist() == [False, True, False, True]
    assert top_p_mask(probs, 0.76).tolist() == [False, True, True, True]
    assert top_p_mask(probs, 1e-9).tolist() == [False, True, False, False]  # top-1 always kept
    assert top_p_mask(probs, 1.0).all()


def test_sample_token_greedy_and_seeded():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert sample_token(logits, 0.0, 1.0) == 1
    assert sample_token(logits, 1.0, 1e-6, torch.Generator().manual_seed(0)) == 1
    draws = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    again = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again
    # top_p = 0.9 removes token 0 (p ~= 0.032): softmax([0,3,1,2]) ~ [.032, .644, .087, .237]
    draws = {sample_token(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(300)}
    assert draws == {1, 2, 3}


def test_lora_delta_matches_per_row_loop():
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 2, 5, 3
    adapters = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), s) for s in (0.5, 2.0)]
    x = torch.randn(3, 4, d_in, generator=g)  # rows: adapter 1, base, adapter 0
    a_sel = torch.cat([a.t() for a, _, _ in adapters], dim=1)  # [in, 2r]
    b_sel = torch.cat([b.t() * s for _, b, s in adapters], dim=0)  # [2r, out]
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)[:, None, :]
    got = lora_delta(x, a_sel, b_sel, mask)
    for row, k in ((0, 1), (2, 0)):
        a, b, s = adapters[k]
        assert torch.allclose(got[row], x[row] @ a.t() @ b.t() * s, atol=1e-5)
    assert torch.equal(got[1], torch.zeros(4, d_out))


def test_stop_helpers():
    assert find_stop("abc END def", ["END", "def"]) == 4
    assert find_stop("abc", ["x"]) == -1
    assert stop_holdback("hello EN", ["END"]) == 2
    assert stop_holdback("hello E", ["END", "Ex"]) == 1
    assert stop_holdback("hello", ["END"]) == 0
    assert stop_holdback("xEN", ["END", "NDx"]) == 2
    assert safe_stream_end("hello EN", ["END"], final=False) == 6
    assert safe_stream_end("hello EN", ["END"], final=True) == 8
    assert safe_stream_end("caf\ufffd", [], final=False) == 3
    # a stop string's prefix before a half-decoded character is held back as well
    assert safe_stream_end("ok\ufffd", ["ok\U0001F600"], final=False) == 0
    assert safe_stream_end("so ok\ufffd\ufffd", ["ok\U0001F600"], final=False) == 3
    assert safe_stream_end("so ok\ufffd", ["zz"], final=False) == 5


# --- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"stop": 3}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_sampling_params_refuse_bad_values(kw, field):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**kw)


def test_sampling_params_normalise():
    p = SamplingParams(stop="END", temperature=1, top_p=1)
    assert p.stop == ["END"] and isinstance(p.temperature, float)


def test_request_validation():
    with pytest.raises(ConfigError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ConfigError, match="exactly one"):
        GenerationRequest(prompt="a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ConfigError, match=r"messages\[0\]"):
        GenerationRequest(messages=[{"role": "user"}])
    with pytest.raises(ConfigError, match="adapter"):
        GenerationRequest(prompt="a", adapter="u1")
    with pytest.raises(ConfigError, match="version"):
        AdapterRef("u", -1, "/x")
    GenerationRequest(prompt="a", adapter=BASE)


# --- correctness of mixed batches -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["stacked", "peft"])
def test_mixed_batch_matches_peft_reference(setup, backend):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=8, backend=backend)
    if backend == "stacked":  # q_proj and v_proj of a layer share one down-projection matmul
        assert sorted(len(v) for v in eng._bank.groups.values()) == [2, 2]
    adapters = [refs[0], refs[1], None, refs[2], refs[0]]
    reqs = [GenerationRequest(prompt=p, adapter=a, params=SamplingParams(max_new_tokens=6))
            for p, a in zip(PROMPTS, adapters, strict=True)]
    out = eng.generate(reqs)
    for p, a, res in zip(PROMPTS, adapters, out, strict=True):
        assert res.error is None
        expect = reference_tokens(a.path if a else None, p, 6)
        assert res.token_ids == expect, (p, a)
        assert res.prompt_tokens == len(tok(p)["input_ids"])
        assert res.completion_tokens == len(res.token_ids)
        assert res.finish_reason == ("length" if len(expect) == 6 else "stop")
        assert res.text == tok.decode(expect, skip_special_tokens=True)
    # the adapters really change the output (otherwise the comparison above proves little)
    base_only = eng.generate([GenerationRequest(prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=6))])
    assert base_only[0].token_ids != out[0].token_ids
    assert eng.stats["misses"] == 3 and eng.stats["resident"] == 3


def test_batched_equals_one_at_a_time(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=4)
    reqs = [GenerationRequest(prompt=p, adapter=refs[i % 4], params=SamplingParams(max_new_tokens=8))
            for i, p in enumerate(PROMPTS)]
    together = [r.token_ids for r in eng.generate(reqs)]
    alone = [eng.generate([r])[0].token_ids for r in reqs]
    assert together == alone


def test_base_rows_unaffected_by_adapters_and_model_restored(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    reqs = [GenerationRequest(prompt=PROMPTS[1], adapter=a, params=SamplingParams(max_new_tokens=6))
            for a in (refs[0], BASE, AdapterRef(BASE, 0, ""))]
    out = eng.generate(reqs)
    expect = reference_tokens(None, PROMPTS[1], 6)
    assert out[1].token_ids == expect and out[2].token_ids == expect
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    ref_model, _ = fresh_model()
    with torch.no_grad():  # hooks are inert outside the engine's forwards, and gone after close()
        assert torch.allclose(model(ids).logits, ref_model(ids).logits, atol=1e-6)
        eng.close()
        assert torch.allclose(model(ids).logits, ref_model(ids).logits, atol=1e-6)


# --- adapter cache ----------------------------------------------------------------------------
def test_cache_hit_reads_nothing_from_disk(setup, monkeypatch):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=4)
    req = GenerationRequest(prompt="hi", adapter=refs[0], params=SamplingParams(max_new_tokens=5))
    first = eng.generate([req])[0]
    import metarlhf.adapters

    calls = []
    real = metarlhf.adapters.load_adapter
    monkeypatch.setattr(metarlhf.adapters, "load_adapter", lambda *a, **k: calls.append(a) or real(*a, **k))
    shutil.rmtree(refs[0].path)  # a hit must not even look at the directory
    second = eng.generate([req])[0]
    assert second.token_ids == first.token_ids and not calls
    s = eng.stats
    assert (s["hits"], s["misses"]) == (1, 1) and s["load_ms"] is not None
    eng.evict("u0")  # now it is gone for real
    res = eng.generate([req])[0]
    assert res.finish_reason == "error" and isinstance(res.error, AdapterError)


def test_residency_is_bounded_and_batches_run_in_waves(tmp_path):
    model, tok = fresh_model()
    refs = [AdapterRef(f"u{i}", 1, make_adapter(tmp_path / f"u{i}", model, seed=i)) for i in range(7)]
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=3)
    reqs = [GenerationRequest(prompt="abc", adapter=r, params=SamplingParams(max_new_tokens=4)) for r in refs]
    out = eng.generate(reqs)
    assert all(r.error is None for r in out)
    for r, res in zip(refs, out, strict=True):  # each wave used the right weights
        assert res.token_ids == reference_tokens(r.path, "abc", 4)
    s = eng.stats
    assert s["resident"] == 3 and s["capacity"] == 3 and s["misses"] == 7 and s["evictions"] == 4
    assert eng.resident == [("u4", 1), ("u5", 1), ("u6", 1)]


def test_pin_survives_churn_and_lru_order(tmp_path):
    model, tok = fresh_model()
    refs = [AdapterRef(f"u{i}", 1, make_adapter(tmp_path / f"u{i}", model, seed=i)) for i in range(5)]
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=2)
    eng.pin(refs[0])
    eng.pin(refs[0])  # idempotent
    with pytest.raises(ConfigError, match="pin"):
        eng.pin(refs[1])  # would leave no slot for anyone else
    for r in refs[1:]:
        eng.preload(r)
    assert eng.resident == [("u0", 1), ("u4", 1)]
    assert eng.stats["pinned"] == 1
    assert eng.stats["device"] == "cpu"
    eng.unpin(refs[0])
    eng.preload(refs[1])
    assert ("u0", 1) not in eng.resident


def test_evict_user_and_new_version(tmp_path):
    model, tok = fresh_model()
    v1 = AdapterRef("alice", 1, make_adapter(tmp_path / "v1", model, seed=1))
    v2 = AdapterRef("alice", 2, make_adapter(tmp_path / "v2", model, seed=2))
    bob = AdapterRef("bob", 1, make_adapter(tmp_path / "bob", model, seed=3))
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=4)
    params = SamplingParams(max_new_tokens=6)
    out = eng.generate([GenerationRequest(prompt="abc", adapter=r, params=params) for r in (v1, v2, bob)])
    assert out[0].token_ids != out[1].token_ids  # version is part of the key: no stale weights
    assert eng.evict("alice") == 2 and eng.evict("alice") == 0
    assert eng.resident == [("bob", 1)]
    again = eng.generate([GenerationRequest(prompt="abc", adapter=v2, params=params)])[0]
    assert again.token_ids == out[1].token_ids


def test_miss_load_time_is_recorded(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    eng.preload(refs[0])
    assert 0 < eng.stats["load_ms"] < 5000


# --- bad adapters -------------------------------------------------------------------------------
def test_bad_adapters_fail_only_their_rows(setup):
    model, tok, refs, tmp = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=8)
    params = SamplingParams(max_new_tokens=5)
    good = [GenerationRequest(prompt="abc", adapter=r, params=params) for r in refs[:2]]
    before = [r.token_ids for r in eng.generate(good)]
    corrupt = make_adapter(tmp / "corrupt", model, seed=9)
    w = tmp / "corrupt" / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    bad_refs = {
        "base model": AdapterRef("b1", 1, make_adapter(tmp / "b1", model, seed=5, base="other-model")),
        "rank": AdapterRef("b2", 1, make_adapter(tmp / "b2", model, seed=6, r=4)),
        "checksum": AdapterRef("b3", 1, corrupt),
        "not an adapter": AdapterRef("b4", 1, str(tmp / "missing")),
        "'reward'": AdapterRef("b5", 1, make_adapter(tmp / "b5", model, seed=7, kind="reward")),
        "targets": AdapterRef("b6", 1, make_adapter(tmp / "b6", model, seed=8, targets=("q_proj", "o_proj"))),
    }
    reqs = [good[0]] + [GenerationRequest(prompt="abc", adapter=r, params=params) for r in bad_refs.values()]
    reqs.append(good[1])
    out = eng.generate(reqs)
    assert [out[0].token_ids, out[-1].token_ids] == before
    for (msg, ref), res in zip(bad_refs.items(), out[1:-1], strict=True):
        assert res.finish_reason == "error" and isinstance(res.error, AdapterError), msg
        assert msg in str(res.error) and ref.user in str(res.error)
    assert sorted(eng.resident) == [("u0", 1), ("u1", 1)]
    assert eng.stats["load_errors"] == len(bad_refs)
    with pytest.raises(AdapterError, match="rank"):
        eng.preload(bad_refs["rank"])
    with pytest.raises(AdapterError, match="rank"):
        eng.generate_one(reqs[2])


def test_adapter_with_wrong_shapes_or_nan_is_refused(tmp_path):
    model, tok = fresh_model()
    other, _ = tiny_policy(hidden=64)
    wrong = AdapterRef("w", 1, make_adapter(tmp_path / "w", other, seed=1))  # same names, other dims
    t = random_lora(model, 2)
    next(iter(t.values()))[0, 0] = math.nan
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    save_adapter(tmp_path / "n", Adapter(t, cfg, {"kind": "policy", "base_model": BASE_NAME}))
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    with pytest.raises(AdapterError, match="shapes"):
        eng.preload(wrong)
    with pytest.raises(AdapterError, match="NaN"):
        eng.preload(AdapterRef("n", 1, str(tmp_path / "n")))
    assert eng.resident == []


# --- prompts, limits, sampling, stop strings, streaming -------------------------------------------
def test_backend_names(setup):
    model, tok, _, _ = setup
    assert MultiAdapterEngine(model, tok, BASE_NAME, backend="bgmv").backend == "stacked"  # old name
    with pytest.raises(ConfigError, match="backend"):
        MultiAdapterEngine(model, tok, BASE_NAME, backend="vllm")
    with pytest.raises(ConfigError, match="capacity"):
        MultiAdapterEngine(model, tok, BASE_NAME, capacity=0)


def test_stats_do_not_block_during_generation(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    eng.preload(refs[0])
    before = eng.stats
    got = []
    with eng._lock:  # as if a batch were running in another thread
        t = threading.Thread(target=lambda: got.append(eng.stats))
        t.start()
        t.join(timeout=5)
    assert got == [before] and before["misses"] == 1


def test_chat_template_and_context_limit(setup):
    model, tok, _, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME, max_context=40)
    msgs = [{"role": "user", "content": "hi"}]
    ids = eng.encode(GenerationRequest(messages=msgs, params=SamplingParams(max_new_tokens=4)))
    assert ids == tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"]
    long = GenerationRequest(prompt="x" * 38, params=SamplingParams(max_new_tokens=4))
    ok = GenerationRequest(messages=msgs, params=SamplingParams(max_new_tokens=4))
    out = eng.generate([long, ok])
    assert out[0].finish_reason == "error" and "limit is 36" in str(out[0].error)
    assert out[1].error is None and out[1].completion_tokens > 0
    with pytest.raises(ConfigError, match="max_context"):
        eng.generate_one(long)
    with pytest.raises(ConfigError, match="empty"):
        eng.generate_one(GenerationRequest(prompt=""))
    with pytest.raises(ConfigError, match="list of GenerationRequest"):
        eng.generate(["hi"])


def test_length_finish_and_greedy_top_p(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    greedy = eng.generate_one(GenerationRequest(prompt="hello", adapter=refs[1],
                                                params=SamplingParams(max_new_tokens=7)))
    nucleus = eng.generate_one(GenerationRequest(
        prompt="hello", adapter=refs[1], params=SamplingParams(max_new_tokens=7, temperature=1.0, top_p=1e-6)))
    assert nucleus.token_ids == greedy.token_ids
    if greedy.finish_reason == "length":
        assert greedy.completion_tokens == 7


def test_seeded_sampling_is_reproducible_per_row(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME)

    def req(seed, adapter=refs[0]):
        return GenerationRequest(prompt="abc", adapter=adapter,
                                 params=SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed))

    a = eng.generate([req(1), req(2), req(1, refs[3])])
    b = eng.generate([req(1), req(2), req(1, refs[3])])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].token_ids != a[1].token_ids
    # a row's draw does not depend on the batch it is in
    assert eng.generate([req(2)])[0].token_ids == a[1].token_ids


def ascii_only(model, tok):
    """Test-only logits bias so the random tiny model writes lowercase ASCII words."""
    allowed = set("abcdefghijklmnopqrstuvwxyz ")
    bias = torch.full((len(tok),), -1e4)
    for i in range(len(tok)):
        if tok.decode([i]) in allowed:
            bias[i] = 0.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    return model


SAMPLED = {"temperature": 1.0, "seed": 7, "max_new_tokens": 20}


def _stop_setup(eng, refs):
    base = eng.generate_one(GenerationRequest(prompt="abc", adapter=refs[2], params=SamplingParams(**SAMPLED)))
    assert len(base.text) >= 12 and base.text.isascii(), base.text
    stop = base.text[6:9]
    cut = base.text.find(stop)
    assert cut > 0
    return base, stop, cut


def test_stop_strings_cut_text(setup):
    model, tok, refs, _ = setup
    ascii_only(model, tok)
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    base, stop, cut = _stop_setup(eng, refs)
    res = eng.generate_one(GenerationRequest(prompt="abc", adapter=refs[2],
                                             params=SamplingParams(**SAMPLED, stop=["zzzz", stop])))
    assert res.text == base.text[:cut] and res.finish_reason == "stop"
    assert res.token_ids == base.token_ids[: len(res.token_ids)] and len(res.token_ids) < len(base.token_ids)


def test_stream_matches_generate_and_respects_stop(setup):
    model, tok, refs, _ = setup
    ascii_only(model, tok)
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    base, stop, cut = _stop_setup(eng, refs)
    plain = list(eng.stream(GenerationRequest(prompt="abc", adapter=refs[2],
                                              params=SamplingParams(**SAMPLED))))
    assert "".join(plain) == base.text and len(plain) > 1
    it = eng.stream(GenerationRequest(prompt="abc", adapter=refs[2],
                                      params=SamplingParams(**SAMPLED, stop=stop)))
    deltas = []
    try:
        while True:
            deltas.append(next(it))
    except StopIteration as done:
        final = done.value
    assert "".join(deltas) == base.text[:cut] and stop not in "".join(deltas)
    assert final.finish_reason == "stop" and final.text == base.text[:cut]
    with pytest.raises(AdapterError):
        eng.stream(GenerationRequest(prompt="abc", adapter=AdapterRef("x", 1, "/nonexistent")))
    with pytest.raises(ConfigError):
        eng.stream(GenerationRequest(prompt="a" * 600))


def test_stream_interleaves_with_generate_and_keeps_its_slot(setup):
    model, tok, refs, _ = setup
    ascii_only(model, tok)
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=2)
    req = GenerationRequest(prompt="abc", adapter=refs[0], params=SamplingParams(max_new_tokens=10))
    expect = eng.generate_one(req).text
    it = eng.stream(req)
    first = next(it)
    eng.evict("u0")  # erasure while streaming: the stream keeps its weights until it ends
    other = eng.generate([GenerationRequest(prompt="q", adapter=r, params=SamplingParams(max_new_tokens=3))
                          for r in refs[1:3]])  # needs both slots; one is held by the stream
    assert all(o.error is None for o in other)
    assert first + "".join(it) == expect
    assert ("u0", 1) not in eng.resident and eng.stats["resident"] <= 2


def test_concurrent_generate_and_cache_operations(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME, capacity=3)
    reqs = [GenerationRequest(prompt=p, adapter=refs[i % 4], params=SamplingParams(max_new_tokens=5))
            for i, p in enumerate(PROMPTS)]
    expect = [r.token_ids for r in eng.generate(reqs)]
    errors = []

    def churn():
        try:
            for _ in range(20):
                for r in refs:
                    eng.preload(r)
                eng.evict("u1")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    for _ in range(3):
        assert [r.token_ids for r in eng.generate(reqs)] == expect
    t.join()
    assert not errors and eng.stats["resident"] <= 3


def test_generate_streams_rows_of_a_batch_through_on_text(setup):
    model, tok, refs, _ = setup
    ascii_only(model, tok)
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    base, stop, cut = _stop_setup(eng, refs)
    got: dict[str, list[str]] = {"plain": [], "stop": []}

    def broken(delta: str) -> None:
        raise RuntimeError("client went away")

    reqs = [GenerationRequest(prompt="abc", adapter=refs[2], params=SamplingParams(**SAMPLED),
                              on_text=got["plain"].append),
            GenerationRequest(prompt="abc", adapter=refs[2], params=SamplingParams(**SAMPLED, stop=[stop]),
                              on_text=got["stop"].append),
            GenerationRequest(prompt="abc", adapter=refs[2], params=SamplingParams(**SAMPLED), on_text=broken),
            GenerationRequest(prompt="xyz", adapter=refs[0], params=SamplingParams(max_new_tokens=4))]
    out = eng.generate(reqs)
    assert all(o.error is None for o in out)
    assert len(got["plain"]) > 1 and "".join(got["plain"]) == out[0].text == base.text
    assert "".join(got["stop"]) == out[1].text == base.text[:cut] and stop not in "".join(got["stop"])
    assert out[2].text == base.text  # a failing callback is dropped; the row still finishes


def test_cancelled_row_leaves_the_batch_and_the_others_go_on(setup):
    model, tok, refs, _ = setup
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    params = SamplingParams(max_new_tokens=12)
    solo = eng.generate_one(GenerationRequest(prompt="xyz", adapter=refs[0], params=params))
    gone = threading.Event()
    seen: list[str] = []

    def client(delta: str) -> None:  # the client reads one piece of text, then disconnects
        seen.append(delta)
        gone.set()

    early = threading.Event()
    early.set()
    reqs = [GenerationRequest(prompt="abc", adapter=refs[1], params=params, on_text=client, cancel=gone),
            GenerationRequest(prompt="xyz", adapter=refs[0], params=params),
            GenerationRequest(prompt="abc", adapter=refs[2], params=params, cancel=early)]
    out = eng.generate(reqs)
    assert out[0].finish_reason == "cancelled" and seen
    assert 1 <= out[0].completion_tokens < params.max_new_tokens
    assert out[1].token_ids == solo.token_ids and out[1].finish_reason == solo.finish_reason
    assert out[2].finish_reason == "cancelled" and out[2].completion_tokens == 0
    assert eng.stats["resident"] <= 3


def test_kv_cache_reaches_a_model_that_names_it_past_key_values(tmp_path):
    """Older transformers call the forward() argument ``past_key_values``; a cache passed under
    the wrong name would vanish into ``**kwargs`` and every step would decode without context."""
    from transformers import LlamaForCausalLM

    from metarlhf.engine import cache_keyword

    class OlderStyleLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)

    model, tok = fresh_model()
    older = OlderStyleLlama(model.config).eval()
    older.load_state_dict(model.state_dict())
    assert cache_keyword(model) == "cache" and cache_keyword(older) == "past_key_values"
    ref = AdapterRef("u0", 1, make_adapter(tmp_path / "u0" / "v1", model, seed=100))
    reqs = [GenerationRequest(prompt=p, adapter=a, params=SamplingParams(max_new_tokens=12))
            for p, a in zip(PROMPTS[:3], [ref, None, ref], strict=True)]
    want = [r.token_ids for r in MultiAdapterEngine(model, tok, BASE_NAME).generate(reqs)]
    assert [r.token_ids for r in MultiAdapterEngine(older, tok, BASE_NAME).generate(reqs)] == want
    assert want[1] == reference_tokens(None, PROMPTS[1], 12)


def test_cache_keyword_refuses_a_forward_without_one():
    from metarlhf.engine import cache_keyword

    class NoCache(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return None

    with pytest.raises(ConfigError, match="neither"):
        cache_keyword(NoCache())


def _scripted(text):
    """A tiny engine whose model writes ``text`` then EOS, whatever the prompt."""
    model, tok = fresh_model()
    script = tok(text)["input_ids"] + [tok.eos_token_id]
    step = {"n": 0}

    def force(mod, inp, out):
        k = min(step["n"], len(script) - 1)
        step["n"] += 1
        out = torch.full_like(out, -1e4)
        out[..., script[k]] = 0.0
        return out

    model.lm_head.register_forward_hook(force)
    return MultiAdapterEngine(model, tok, BASE_NAME, capacity=2), tok, script, step


def _stream(eng, step, **params):
    step["n"] = 0
    deltas = []
    res = eng.generate([GenerationRequest(prompt="p", params=SamplingParams(temperature=0, **params),
                                          on_text=deltas.append)])[0]
    return deltas, res


def test_streams_never_send_what_a_multibyte_stop_string_later_cuts():
    eng, tok, script, step = _scripted("Hi ok\U0001F600 end")
    deltas, res = _stream(eng, step, stop=["ok\U0001F600"], max_new_tokens=32)
    assert res.text == "Hi " and res.finish_reason == "stop"
    # every delta stays a prefix of the final text (before the fix, "ok" was sent, then cut)
    assert "".join(deltas) == res.text


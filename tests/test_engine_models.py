"""MultiAdapterEngine on the embedded SmolLM2 (slow) and on CUDA (gpu)."""

import pytest
import torch
from test_engine import BASE_NAME, PROMPTS, fresh_model, make_adapter

from metarlhf.engine import AdapterRef, GenerationRequest, MultiAdapterEngine, SamplingParams


@pytest.mark.slow
def test_embedded_policy_mixed_batch_stacked_equals_peft(tmp_path):
    from metarlhf.models import DEFAULT_POLICY_NAME, load_policy

    eng = MultiAdapterEngine.from_pretrained(capacity=4)
    assert eng.base_name == DEFAULT_POLICY_NAME
    refs = [AdapterRef(f"u{i}", 1, make_adapter(tmp_path / f"u{i}", eng.model, seed=i, base=DEFAULT_POLICY_NAME,
                                                scale=0.05)) for i in range(2)]
    reqs = [GenerationRequest(messages=[{"role": "user", "content": p}], adapter=a,
                              params=SamplingParams(max_new_tokens=8))
            for p, a in zip(PROMPTS[:3], [refs[0], None, refs[1]], strict=True)]
    out = eng.generate(reqs)
    assert all(r.error is None and r.completion_tokens > 0 for r in out)
    model, tok = load_policy()
    peng = MultiAdapterEngine(model, tok, DEFAULT_POLICY_NAME, capacity=2, backend="peft")
    assert [r.token_ids for r in peng.generate(reqs)] == [r.token_ids for r in out]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    model, tok = fresh_model()
    refs = [AdapterRef(f"u{i}", 1, make_adapter(tmp_path / f"u{i}", model, seed=i)) for i in range(3)]
    reqs = [GenerationRequest(prompt=p, adapter=a, params=SamplingParams(max_new_tokens=6))
            for p, a in zip(PROMPTS, [refs[0], None, refs[1], refs[2], refs[0]], strict=True)]
    cpu = [r.token_ids for r in MultiAdapterEngine(model, tok, BASE_NAME).generate(reqs)]
    gmodel, _ = fresh_model()
    gpu = MultiAdapterEngine(gmodel.to("cuda"), tok, BASE_NAME).generate(reqs)
    assert [r.token_ids for r in gpu] == cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_from_pretrained_onto_cuda(tmp_path):
    from metarlhf.testing import save_tiny

    model, tok = fresh_model()
    path = str(save_tiny(model, tok, tmp_path / "tiny"))
    eng = MultiAdapterEngine.from_pretrained(path, device="cuda")
    assert eng.stats["device"].startswith("cuda")
    reqs = [GenerationRequest(prompt=p, params=SamplingParams(max_new_tokens=8)) for p in PROMPTS[:3]]
    cpu = [r.token_ids for r in MultiAdapterEngine.from_pretrained(path).generate(reqs)]
    assert [r.token_ids for r in eng.generate(reqs)] == cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_matches_hf_generate():
    """The engine's own KV-cache loop against transformers' generate, both on CUDA (fp32)."""
    model, tok = fresh_model()
    model = model.to("cuda")
    eng = MultiAdapterEngine(model, tok, BASE_NAME)
    for p in PROMPTS[:3]:
        got = eng.generate([GenerationRequest(prompt=p, params=SamplingParams(max_new_tokens=12))])[0].token_ids
        ids = tok(p, return_tensors="pt")["input_ids"].to("cuda")
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ref = ref[0, ids.shape[1]:].tolist()
        assert got == (ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)

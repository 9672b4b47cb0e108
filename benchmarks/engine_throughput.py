"""Mixed-adapter throughput and adapter-cache timings of MultiAdapterEngine.

Embedded SmolLM2-135M-Instruct on CPU (or ``--device cuda``), 8 users with 8 distinct random r=8 q,v LoRA
adapters (nonzero B), 8 chat prompts, greedy decoding, ``--new-tokens`` new tokens.
Measured per repeat (interleaved, medians reported):

  mixed      one batch of 8 rows, 8 different adapters          (stacked backend)
  base       the same 8 prompts as one batch on the base model
  seq_hit    the 8 rows one after another, switching adapter each time (adapter resident)
  seq_swap   the 8 rows one after another, each adapter evicted first and reloaded from disk
  peft_mixed / peft_base   the same batches with peft's ``adapter_names`` mixed-batch forward

Throughput is new (completion) tokens per second of wall time. Cache: a hit is timed
with ``preload`` on a resident adapter (and ``load_adapter`` calls are counted: must be
0); a miss is ``evict`` + ``preload``, i.e. a safetensors read + checksum + validation +
copy into a slot.

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/engine_throughput.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from metarlhf.adapters import Adapter, save_adapter
from metarlhf.engine import AdapterRef, GenerationRequest, MultiAdapterEngine, SamplingParams
from metarlhf.models import DEFAULT_POLICY_NAME, load_policy

PROMPTS = [
    "Explain in detail how a bicycle gear system works.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Describe the water cycle step by step for a ten year old.",
    "What are the main causes of the French Revolution? Explain each one.",
    "Give me a detailed recipe for a vegetable soup, with every step.",
    "Explain how vaccines train the immune system, in depth.",
    "Write a detailed guide to planting tomatoes in a small garden.",
    "Describe the history of the printing press and why it mattered.",
]


def random_policy_adapter(model, seed: int, r: int = 8) -> Adapter:
    """A random q,v LoRA in peft's saved format (A ~ kaiming-like, B nonzero)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and isinstance(mod, torch.nn.Linear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) / 24
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) / 50
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj"]}
    return Adapter(tensors, config, {"kind": "policy", "base_model": DEFAULT_POLICY_NAME})


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tokens(results) -> int:
    assert all(r.error is None for r in results), [r.error for r in results]
    return sum(r.completion_tokens for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-repeats", type=int, default=2, help="repeats of the (slow) sequential baseline")
    ap.add_argument("--peft-repeats", type=int, default=2, help="0 skips the peft backend")
    ap.add_argument("--cache-repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", default="benchmarks/results/engine_throughput.json")
    args = ap.parse_args()
    cmd = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {cmd}", flush=True)

    from metarlhf.runtime import describe_device, resolve_device

    device = resolve_device(args.device)
    model, tok = load_policy(device=str(device))
    tmp = Path(tempfile.mkdtemp(prefix="engine_bench_"))
    refs = []
    for i in range(8):
        save_adapter(tmp / f"user{i}" / "v1", random_policy_adapter(model, seed=i))
        refs.append(AdapterRef(f"user{i}", 1, str(tmp / f"user{i}" / "v1")))
    params = SamplingParams(max_new_tokens=args.new_tokens)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    mixed_reqs = [GenerationRequest(messages=m, adapter=r, params=params) for m, r in zip(msgs, refs, strict=True)]
    base_reqs = [GenerationRequest(messages=m, params=params) for m in msgs]

    eng = MultiAdapterEngine(model, tok, DEFAULT_POLICY_NAME, capacity=32)
    eng.generate([GenerationRequest(messages=msgs[0], adapter=refs[0], params=SamplingParams(max_new_tokens=4))])
    # the engine's own KV-cache loop must decode what transformers' greedy generate decodes
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    mine = eng.generate([GenerationRequest(prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=16))])[0].token_ids
    engine_equals_hf = mine == (hf[: hf.index(tok.eos_token_id)] if tok.eos_token_id in hf else hf)
    print(f"engine greedy == transformers generate: {engine_equals_hf}", flush=True)
    for r in refs:
        eng.preload(r)

    runs: dict[str, list[dict]] = {k: [] for k in ("mixed", "base", "seq_hit", "seq_swap", "peft_mixed", "peft_base")}

    def record(name, seconds, n):
        runs[name].append({"seconds": round(seconds, 4), "tokens": n, "tok_s": round(n / seconds, 2)})
        print(f"  {name:10s} {n:4d} tokens in {seconds:7.3f} s = {n / seconds:7.2f} tok/s", flush=True)

    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        s, out = timed(lambda: eng.generate(mixed_reqs))
        record("mixed", s, tokens(out))
        s, out = timed(lambda: eng.generate(base_reqs))
        record("base", s, tokens(out))
        if rep < args.seq_repeats:
            s, out = timed(lambda: [eng.generate([r])[0] for r in mixed_reqs])
            record("seq_hit", s, tokens(out))
            seq_texts = [r.text for r in out]
    mixed_texts = [r.text for r in eng.generate(mixed_reqs)]

    def swap_one(req):
        eng.evict(req.adapter.user)
        return eng.generate([req])[0]

    s, out = timed(lambda: [swap_one(r) for r in mixed_reqs])
    record("seq_swap", s, tokens(out))

    # cache timings
    import metarlhf.adapters as adapters_mod

    calls = {"n": 0}
    real_load = adapters_mod.load_adapter

    def counting_load(*a, **k):
        calls["n"] += 1
        return real_load(*a, **k)

    adapters_mod.load_adapter = counting_load
    hit_us, miss_ms = [], []
    for i in range(args.cache_repeats):
        ref = refs[i % len(refs)]
        eng.preload(ref)
        before = calls["n"]
        t, _ = timed(lambda ref=ref: eng.preload(ref))
        assert calls["n"] == before, "a cache hit read the adapter from disk"
        hit_us.append(t * 1e6)
        eng.evict(ref.user)
        t, _ = timed(lambda ref=ref: eng.preload(ref))
        miss_ms.append(t * 1e3)
    hit_disk_reads = 0
    adapters_mod.load_adapter = real_load
    stats = eng.stats
    eng.close()

    if args.peft_repeats:
        pmodel, _ = load_policy(device=str(device))
        peng = MultiAdapterEngine(pmodel, tok, DEFAULT_POLICY_NAME, capacity=8, backend="peft")
        for r in refs:
            peng.preload(r)
        peng.generate([GenerationRequest(messages=msgs[0], adapter=refs[0], params=SamplingParams(max_new_tokens=4))])
        for rep in range(args.peft_repeats):
            print(f"peft repeat {rep + 1}/{args.peft_repeats}", flush=True)
            s, out = timed(lambda: peng.generate(mixed_reqs))
            record("peft_mixed", s, tokens(out))
            s, out = timed(lambda: peng.generate(base_reqs))
            record("peft_base", s, tokens(out))
        peft_texts = [r.text for r in out]  # noqa: F841 - base texts; kept for debugging
        peft_mixed_texts = [r.text for r in peng.generate(mixed_reqs)]
    else:
        peft_mixed_texts = None

    med = {k: statistics.median(x["tok_s"] for x in v) for k, v in runs.items() if v}
    ratios = {
        "mixed_over_base": round(med["mixed"] / med["base"], 3),
        "mixed_over_seq_hit": round(med["mixed"] / med["seq_hit"], 3),
        "mixed_over_seq_swap": round(med["mixed"] / med["seq_swap"], 3),
    }
    if "peft_mixed" in med:
        ratios["peft_mixed_over_peft_base"] = round(med["peft_mixed"] / med["peft_base"], 3)
        ratios["peft_mixed_over_base"] = round(med["peft_mixed"] / med["base"], 3)
    cache = {
        "hit_us_median": round(statistics.median(hit_us), 1),
        "hit_disk_reads": hit_disk_reads,
        "miss_ms_median": round(statistics.median(miss_ms), 2),
        "miss_ms_max": round(max(miss_ms), 2),
        "miss_ms_all": [round(x, 2) for x in miss_ms],
        "adapter_file_bytes": (Path(refs[0].path) / "adapter_model.safetensors").stat().st_size,
    }
    targets = {
        "mixed >= 0.7x base": ratios["mixed_over_base"] >= 0.7,
        "mixed >= 3x sequential (resident adapters)": ratios["mixed_over_seq_hit"] >= 3.0,
        "mixed >= 3x sequential (swap from disk)": ratios["mixed_over_seq_swap"] >= 3.0,
        "engine greedy == transformers generate": engine_equals_hf,
        "cache hit reads no disk": hit_disk_reads == 0,
        "cache miss <= 50 ms (max)": cache["miss_ms_max"] <= 50.0,
    }
    report = {
        "command": cmd,
        "model": DEFAULT_POLICY_NAME,
        "device": describe_device(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch": 8,
        "new_tokens": args.new_tokens,
        "decoding": "greedy",
        "median_tok_s": {k: round(v, 2) for k, v in med.items()},
        "ratios": ratios,
        "cache": cache,
        "targets_met": targets,
        "engine_stats": stats,
        "engine_equals_hf_generate": engine_equals_hf,
        "mixed_equals_sequential_text": mixed_texts == seq_texts,
        "peft_mixed_equals_stacked_mixed_text": None if peft_mixed_texts is None else peft_mixed_texts == mixed_texts,
        "runs": runs,
        "sample_outputs": {"mixed_user0": mixed_texts[0][:200], "mixed_user1": mixed_texts[1][:200]},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from metarlhf.io import atomic_write_json

    atomic_write_json(out_path, report)
    plot(med, out_path.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("median_tok_s", "ratios", "cache", "targets_met")}, indent=2))
    print(f"wrote {out_path}")
    return 0


def plot(med: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(med)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [med[n] for n in names], color=["C0", "C1", "C2", "C3", "C4", "C5"][: len(names)])
    ax.set_ylabel("new tokens / s (median)")
    ax.set_title("MultiAdapterEngine, SmolLM2-135M, CPU, batch 8")
    for i, n in enumerate(names):
        ax.text(i, med[n], f"{med[n]:.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""Would a meta-trained SmolLM2 reward encoder beat the shipped MiniLM init? (issue 2 idea check)

``reward_encoder_probe.py`` found *frozen* SmolLM2-135M-Instruct features (layer 24 of 30,
standardised) 2.7-4.4 points better than frozen MiniLM at K=8 on the validation personas,
but still below the shipped init, whose MiniLM LoRA was meta-trained. This script
meta-trains a SmolLM2 reward model with the project's own ``meta_train_reward`` and
scores it with the project's own ``evaluate_reward`` on the 10 *validation* personas:

* encoder: the product's reward model with ``RewardConfig(encoder_layers=24,
  lora_layers=[20, 21, 22, 23], standardise=True)``: SmolLM2's first ``--split + --top``
  decoder layers (default 20 + 4) and its final norm, mean-pooled, standardised per
  dimension with label-free statistics of the training personas' records (fitted by
  ``meta_train_reward``), then L2-normalised as the MiniLM reward model's output;
* LoRA (r=8, ``q_proj``/``v_proj``) only on the top ``--top`` layers, so the first
  ``--split`` layers are frozen and their output is computed once per sequence and cached
  (``PrefixCachedRewardModel``, checked against the plainly loaded model at start): the
  same function at about ``top / (split + top)`` of the CPU cost per meta-step. The init
  it writes is an ordinary init for ``--encoder <SmolLM2 dir>``;
* recipe: the shipped init's stage 2 in one stage (Meta-SGD, head subspace of rank 32
  from a PCA of the training personas' heads, 5 inner steps, K in 4/8/16/32) plus the
  residual at a starting inner rate of 10 (the shipped stage 3), started from a zero LoRA;
* data: every validation and test persona's records; ``--train-records`` records of each
  training persona (the cache's size and cost; tasks are drawn from those). The user
  split is the shipped init's (``split.json``), checked.

Nothing here touches the test personas unless ``--test`` or ``--groups test`` is given. Writes a JSON with the
validation accuracies next to the shipped MiniLM init's (0.837 / 0.872 / 0.895 / 0.907).

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_smol_top_lora.py

``--eval-init DIR`` skips meta-training and scores an existing init (with the inner steps
its metadata names) on ``--groups``, e.g. the shipped one after session 10 set 20 steps.
``--init-from DIR`` continues meta-training from an init (``keep_basis``: its LoRA, head,
basis, learned rates and feature statistics; a fresh Adam state), with ``--inner-steps``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metarlhf.reward import RewardConfig, RewardModel  # noqa: E402

SHIPPED_VAL = {"4": 0.837, "8": 0.872, "16": 0.895, "32": 0.907}  # adapters/meta/reward residual_choice.val_acc


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer whose output comes from the prefix cache."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class PrefixCachedRewardModel(RewardModel):
    """The product's reward model on SmolLM2's first ``split + top`` layers, LoRA on the top
    ``top`` layers and standardised features (``RewardConfig(encoder_layers=split + top,
    lora_layers=[split, ..., split + top - 1], standardise=True)``), with the frozen first
    ``split`` layers computed once per token sequence and cached.

    The encoder's first ``split`` layers are replaced by pass-throughs; ``collate``
    returns the cached states after layer ``split - 1`` (right-padded) instead of token
    ids and :meth:`pooled` feeds them in as ``inputs_embeds``. Parameter names, adapter
    files and outputs are those of ``load_reward_model(<SmolLM2 dir>, config=...)``; right
    padding under causal attention leaves the real tokens' states as in an unpadded run.
    """

    def __init__(self, policy_dir: str | Path, split: int, top: int):
        from transformers import AutoModel, AutoTokenizer

        from metarlhf.models import model_name

        tok = AutoTokenizer.from_pretrained(policy_dir, local_files_only=True)
        full = AutoModel.from_pretrained(policy_dir, dtype=torch.float32, local_files_only=True,
                                         num_hidden_layers=split + top)
        layers = list(full.layers)
        bottom = type(full)(full.config.__class__.from_dict({**full.config.to_dict(), "num_hidden_layers": split,
                                                             "vocab_size": 8}))
        bottom.embed_tokens = full.embed_tokens
        bottom.layers = torch.nn.ModuleList(layers[:split])
        bottom.norm = torch.nn.Identity()  # the raw output of layer split - 1
        full.layers = torch.nn.ModuleList([_Skip() for _ in range(split)] + layers[split:])
        for p in bottom.parameters():
            p.requires_grad_(False)
        config = RewardConfig(encoder_layers=split + top, lora_layers=list(range(split, split + top)), standardise=True)
        super().__init__(full.eval(), tok, model_name(policy_dir, "SmolLM2-135M-Instruct"), config)
        self._bottom = [bottom.eval()]  # a list: not a submodule, so never in parameter dicts
        self.prefix_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _fill(self, ids: list[tuple[int, ...]]) -> None:
        todo = sorted({x for x in ids if x not in self.prefix_cache}, key=len)
        for i in range(0, len(todo), 64):
            chunk = todo[i : i + 64]
            length = max(len(x) for x in chunk)
            input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
            mask = torch.zeros(len(chunk), length, dtype=torch.long)
            for j, x in enumerate(chunk):
                input_ids[j, : len(x)] = torch.tensor(x)
                mask[j, : len(x)] = 1
            with torch.no_grad():
                h = self._bottom[0](input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            for j, x in enumerate(chunk):
                self.prefix_cache[x] = h[j, : len(x)].clone()

    def collate(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [tuple(x) for x in ids]
        self._fill(keys)
        length = max(len(x) for x in keys)
        states = torch.zeros(len(keys), length, self.hidden_size)
        mask = torch.zeros(len(keys), length, dtype=torch.long)
        for i, x in enumerate(keys):
            states[i, : len(x)] = self.prefix_cache[x]
            mask[i, : len(x)] = 1
        return states, mask

    def pooled(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.peft(inputs_embeds=states, attention_mask=attention_mask, use_cache=False).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _check_against_plain_model(model: PrefixCachedRewardModel, policy_dir: Path, records: list) -> dict[str, float]:
    """How far ``model`` is from the product's reward model loaded the ordinary way with the
    same set-up, under a random LoRA (so the LoRA path is compared too): the largest
    difference of the pooled features relative to their largest entry (before any
    standardisation, where a causal LM's few huge dimensions would hide the others after
    the L2 norm, so every dimension is also compared relative to its own scale), and of
    the final (L2-normalised) outputs."""
    from torch.func import functional_call

    from metarlhf.reward import load_reward_model

    plain = load_reward_model(policy_dir, adapter_dir=None, config=model.config)
    params = model.fresh_params(1)
    params = {k: (torch.randn_like(v) * 0.05 if "lora_B" in k else v) for k, v in params.items()}
    ids = model.encode_records(records).ids
    if ids != plain.encode_records(records).ids:
        return {"tokenisation": float("inf")}

    class Pooled(torch.nn.Module):  # functional_call runs forward(); this forward is pooled()
        def __init__(self, m: RewardModel):
            super().__init__()
            self.m = m

        def forward(self, *batch: torch.Tensor) -> torch.Tensor:
            return self.m.pooled(*batch)

    with torch.no_grad():
        pa = functional_call(Pooled(model), {f"m.{k}": v for k, v in params.items()}, model.collate(ids), strict=False)
        pb = functional_call(Pooled(plain), {f"m.{k}": v for k, v in params.items()}, plain.collate(ids), strict=False)
        fa = functional_call(model, params, model.collate(ids), strict=False)
        fb = functional_call(plain, params, plain.collate(ids), strict=False)
    scale = pb.abs().amax(0).clamp_min(1e-6)  # each dimension's own scale
    return {"pooled_max_rel_diff": float(((pa - pb).abs() / scale).max()),
            "output_max_abs_diff": float((fa - fb).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/personas"))
    ap.add_argument("--split-file", default=str(ROOT / "adapters/meta/reward/split.json"))
    ap.add_argument("--split", type=int, default=20, help="frozen, cached decoder layers")
    ap.add_argument("--top", type=int, default=4, help="decoder layers with LoRA above them")
    ap.add_argument("--train-records", type=int, default=128, help="records per training persona")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="meta-training wall budget")
    ap.add_argument("--inner-lr-r", type=float, default=10.0)
    ap.add_argument("--inner-steps", type=int, default=5, help="meta-training's inner steps (the init records them)")
    ap.add_argument("--init-from", default=None,
                    help="continue meta-training from this init (its LoRA, head, basis, rates and feature statistics)")
    ap.add_argument("--work", default="/tmp/metarlhf-smol-reward", help="data subset and eval files")
    ap.add_argument("--check-only", action="store_true", help="only compare the cached and the plain model")
    ap.add_argument("--init-out", default=None, help="where the init goes (default: <work>/init)")
    ap.add_argument("--test", action="store_true", help="also score the 20 test personas (after choosing)")
    ap.add_argument("--eval-init", default=None,
                    help="no meta-training: score this init (e.g. adapters/meta/reward-smollm2) with its own inner steps")
    ap.add_argument("--groups", nargs="+", choices=["val", "test"], default=None,
                    help="persona groups to score (default: val, plus test with --test)")
    ap.add_argument("--methods", nargs="+", default=None, help="eval reward's methods (default: all four)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/reward_smol_top_lora.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cmd = " ".join(["flock /tmp/metarlhf-cpu.lock .venv/bin/python", *sys.argv])
    print("command:", cmd, flush=True)

    from metarlhf.data import group_by_user, load_records
    from metarlhf.evaluate_reward import evaluate_reward
    from metarlhf.meta import MetaTrainConfig, meta_train_reward, split_persona_users
    from metarlhf.models import resolve_policy_dir

    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shipped_split = json.loads(Path(args.split_file).read_text())
    by_user = group_by_user(load_records(args.data)[0])
    split = split_persona_users(sorted(by_user), 20, 10, 0)
    if split != shipped_split:
        raise SystemExit("the persona split differs from the shipped init's split.json")
    rng = random.Random("smol-train-subset")
    subset = {u: (rng.sample(by_user[u], min(args.train_records, len(by_user[u]))) if u in split["train"]
                  else by_user[u]) for u in sorted(by_user)}
    data = work / "records.jsonl"
    with open(data, "w") as f:  # generic JSONL; each user's records keep their order (eval's draws)
        for u, recs in subset.items():
            for r in recs:
                f.write(json.dumps({"user_id": u, "prompt": r.prompt, "completion": r.completion,
                                    "label": int(r.label)}) + "\n")

    policy_dir = resolve_policy_dir(None)
    model = PrefixCachedRewardModel(policy_dir, args.split, args.top)
    check = _check_against_plain_model(model, policy_dir, by_user[split["val"][0]][:6])
    print(f"cached vs plain reward model: {check}", flush=True)
    if not all(v <= 1e-4 for v in check.values()):
        raise SystemExit("the prefix-cached reward model does not compute the plain model's function")
    if args.check_only:
        return

    if args.eval_init:
        init, mt = Path(args.eval_init), None
    else:
        cfg = MetaTrainConfig(algo="metasgd", inner="subspace", basis_rank=32, basis_records=args.train_records,
                              inner_steps=args.inner_steps, k_choices=[4, 8, 16, 32], inner_lr_r=args.inner_lr_r,
                              steps=4000, init_from=args.init_from, keep_basis=args.init_from is not None,
                              max_seconds=args.max_seconds, val_every=20, ckpt_every=20, seed=0,
                              encoder_layers=args.split + args.top,
                              lora_layers=list(range(args.split, args.split + args.top)), standardise=True)
        init = Path(args.init_out) if args.init_out else work / "init"
        with tempfile.TemporaryDirectory() as tmp:
            mt = meta_train_reward(data, init, cfg, ckpt_dir=Path(tmp) / "ckpt", progress=False, model=model)
        print("meta-train:", mt, flush=True)

    result: dict[str, Any] = {
        "command": cmd, "what": __doc__.split("\n")[0], "encoder": model.base_model, "split_layers": args.split,
        "top_layers": args.top, "train_records": args.train_records, "meta_train": mt, "init": str(init),
        "cached_vs_plain": check, "shipped_minilm_val": SHIPPED_VAL,
    }
    groups = args.groups or (["val", "test"] if args.test else ["val"])
    for group in groups:
        t0 = time.perf_counter()
        res = evaluate_reward(data, work / f"eval_{group}.json", users=split[group], ks=[4, 8, 16, 32], init=init,
                              seeds=2, max_query=200, progress=False, model=model, methods=args.methods)
        detail = json.loads((work / f"eval_{group}.detail.json").read_text())
        result[group] = res["methods"] | {"seconds": round(time.perf_counter() - t0, 1), "inner_steps": detail["steps"]}
        print(group, json.dumps(result[group]), flush=True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""How much of a subspace policy init's A lies in the row space of peft's seed-0 random draw.

With ``meta-train policy --algo subspace --task-a shared`` every task starts from that
draw, so the SVD of the tasks' updates leans towards it; ``--task-a per-task`` should
not. For each trained module (layers >= 15) this reports the share of ``|A|^2`` inside
the draw's row space; chance is r / in (8 / 576 for SmolLM2's q / v).

    .venv/bin/python benchmarks/policy_subspace_bias.py adapters/meta/policy [/tmp/s5/policy_sub13b ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("inits", nargs="+", help="policy init directories")
    ap.add_argument("--from-layer", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_subspace_bias.json"))
    args = ap.parse_args()
    import torch

    from metarlhf.adapters import load_adapter
    from metarlhf.io import atomic_write_json
    from metarlhf.models import load_policy
    from metarlhf.policy import layer_index, lora_attached, lora_state

    model, _ = load_policy()
    with lora_attached(model, None, 0) as pm:
        fresh = lora_state(pm)
    res: dict = {"command": " ".join([".venv/bin/python", *sys.argv]), "inits": {}}
    for path in args.inits:
        ad = load_adapter(path)
        shares = []
        for k, a in ad.tensors.items():
            if "lora_A" in k and layer_index(k) >= args.from_layer:
                q, _ = torch.linalg.qr(fresh[k].float().T)  # [in, r]: orthonormal basis of the draw's rows
                a = a.float()
                shares.append(float(((a @ q) ** 2).sum() / (a ** 2).sum()))
                chance = a.shape[0] / a.shape[1]
        res["inits"][path] = {"sha256": ad.meta.get("sha256"), "task_a": ad.meta.get("meta_config", {}).get("task_a"),
                              "modules": len(shares), "share_min": round(min(shares), 4),
                              "share_mean": round(sum(shares) / len(shares), 4), "share_max": round(max(shares), 4),
                              "chance": round(chance, 4)}
        print(path, res["inits"][path], flush=True)
    atomic_write_json(Path(args.out), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

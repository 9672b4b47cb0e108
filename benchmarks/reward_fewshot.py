"""Few-shot reward accuracy on held-out personas: base / linear / scratch / meta at K = 4, 8, 16, 32.

Thin wrapper over ``metarlhf eval reward`` with the benchmark's defaults (the 20 test
personas of the shipped init's split, 2 seeds, 200 query records per user). Writes
benchmarks/results/reward_eval.json, .png and .detail.json. Run under the CPU lock:

    flock /tmp/metarlhf-cpu.lock .venv/bin/python benchmarks/reward_fewshot.py
"""

import sys

from metarlhf.cli import main

DEFAULT = ["eval", "reward", "--data", "../shared/data/personas", "--holdout", "20", "--k", "4", "8", "16", "32",
           "--seeds", "2", "--out", "benchmarks/results/reward_eval.json", "--init", "adapters/meta/reward"]

if __name__ == "__main__":
    argv = sys.argv[1:] or DEFAULT
    print("command: metarlhf " + " ".join(argv))
    sys.exit(main(argv))

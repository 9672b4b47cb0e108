"""End-to-end CLI tests of meta-train / adapt / eval reward on tiny random models."""

import gzip
import json
import random

import pytest
import torch

from metarlhf.cli import main
from metarlhf.testing import save_tiny, tiny_encoder

WORDS = ["cats", "dogs", "taxes", "rain", "music", "code", "tea", "chess", "art", "war", "peace", "money"]


def _write_personas(root, n_users=8, n=40, seed=0):
    """Synthetic persona-format users: user u likes statements containing their liked words."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for u in range(n_users):
        liked = set(rng.sample(WORDS, 6))
        lines = []
        for i in range(n):
            yes = i % 2 == 0
            pool = sorted(liked) if yes else sorted(set(WORDS) - liked)
            st = f"I like {rng.choice(pool)} and {rng.choice(pool)}"
            lines.append(json.dumps({"question": f'Is the following statement something you would say?\n"{st}"',
                                     "statement": st, "answer_matching_behavior": " Yes" if yes else " No",
                                     "answer_not_matching_behavior": " No" if yes else " Yes"}))
        with gzip.open(root / f"user{u}.jsonl.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    return root


@pytest.fixture
def setup(tmp_path):
    enc_dir = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = _write_personas(tmp_path / "personas")
    return tmp_path, enc_dir, data


def _meta_train(tmp, enc, data, out, *extra):
    return main(["meta-train", "reward", "--data", str(data), "--out", str(out), "--encoder", str(enc),
                 "--steps", "4", "--val-every", "2", "--ckpt-every", "2", "--holdout-test", "2",
                 "--holdout-val", "2", "--k", "4", "--query", "8", "--meta-batch", "2", "--no-progress", *extra])


def test_meta_train_adapt_eval_end_to_end(setup):
    tmp, enc, data = setup
    init = tmp / "init"
    assert _meta_train(tmp, enc, data, init) == 0
    meta = json.loads((init / "metarlhf.json").read_text())
    split = json.loads((init / "split.json").read_text())
    assert meta["kind"] == "reward_init" and meta["steps"] == 4
    assert set(split["test"]).isdisjoint(split["train"]) and set(split["val"]).isdisjoint(split["train"])
    lines = (init / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and "val_acc" in json.loads(lines[0]) and "val_acc" in json.loads(lines[2])
    user = split["test"][0]
    out = tmp / "user_adapter"
    assert main(["adapt", "reward", "--data", str(data), "--user", user, "--k", "8", "--out", str(out),
                 "--init", str(init), "--encoder", str(enc)]) == 0
    m = json.loads((out / "metarlhf.json").read_text())
    assert m["kind"] == "reward" and m["k"] == 8 and m["steps"] == 3 and "final_loss" in m
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    res = tmp / "res" / "results.json"
    assert main(["eval", "reward", "--data", str(data), "--holdout", "2", "--k", "4", "8", "--out", str(res),
                 "--init", str(init), "--encoder", str(enc), "--seeds", "1", "--query", "10"]) == 0
    r = json.loads(res.read_text())
    assert set(r) == {"methods", "users", "query_per_user", "constant", "auc", "software"}
    assert set(r["auc"]) == set(r["methods"]) and all(v is None or 0.0 <= v <= 1.0
                                                      for m in r["auc"].values() for v in m.values())
    detail = json.loads(res.with_name("results.detail.json").read_text())
    for m, by_k in r["auc"].items():  # each figure is the mean of its per-draw values
        for k, v in by_k.items():
            draws = [a for per in detail["auc_per_user"].values() for a in per[m][k] if a is not None]
            assert draws and v == pytest.approx(sum(draws) / len(draws), abs=1e-4)  # both labels present
    per_draw = [c for cs in detail["constant_per_user"].values() for c in cs]
    assert len(per_draw) == 2 and r["constant"] == pytest.approx(sum(per_draw) / 2, abs=1e-4)
    assert all(0.5 <= c <= 1.0 for c in per_draw)  # thumbs only: the majority label is right at least half the time
    assert set(r["methods"]) == {"base", "linear", "scratch", "meta"}
    assert set(r["methods"]["meta"]) == {"4", "8"} and r["users"] == 2 and r["query_per_user"] == 10
    assert all(0.0 <= v <= 1.0 for m in r["methods"].values() for v in m.values())
    assert r["software"]["peft"] and r["software"]["python"].startswith("3.")
    assert res.with_suffix(".png").is_file()


def test_resume_continues_step_count(setup):
    tmp, enc, data = setup
    out = tmp / "init"
    assert _meta_train(tmp, enc, data, out, "--max-seconds", "0") == 0  # stops before any step
    state = json.loads((tmp / "init.ckpt" / "state.json").read_text())
    assert state["step"] == 0
    assert _meta_train(tmp, enc, data, out, "--resume") == 0
    assert json.loads((out / "metarlhf.json").read_text())["steps"] == 4
    # resuming a finished run with a different algorithm is refused
    assert _meta_train(tmp, enc, data, out, "--resume", "--algo", "fomaml") == 2
    # a fresh run into the same checkpoint directory starts its own metrics (it appended to the old ones)
    rows = lambda: [json.loads(line) for line in (tmp / "init.ckpt" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows()].count(0) == 2  # the first run's start, and its resume's: one file
    assert _meta_train(tmp, enc, data, out) == 0
    assert [r["step"] for r in rows()].count(0) == 1


def test_meta_train_subspace_adapt_eval(setup):
    """--inner subspace: PCA basis from the train users, init stores head.basis, users get a plain head."""
    from metarlhf.adapters import load_adapter

    tmp, enc, data = setup
    init = tmp / "init_sub"
    assert _meta_train(tmp, enc, data, init, "--inner", "subspace", "--basis-rank", "3", "--inner-steps", "4") == 0
    meta = json.loads((init / "metarlhf.json").read_text())
    assert meta["inner"] == "subspace" and meta["basis_rank"] == 3 and meta["inner_steps"] == 4
    t = load_adapter(init).tensors
    assert t["head.basis"].shape[0] == 3 and "head.z" not in t
    assert {"meta_sgd.log_lr.head.z", "meta_sgd.log_lr.head.bias"} <= set(t)
    assert float(t["head.basis"].abs().sum()) > 0  # the PCA start, not zeros
    user = json.loads((init / "split.json").read_text())["test"][0]
    out = tmp / "user_sub"
    assert main(["adapt", "reward", "--data", str(data), "--user", user, "--k", "8", "--out", str(out),
                 "--init", str(init), "--encoder", str(enc)]) == 0
    ut = load_adapter(out).tensors
    assert "head.basis" not in ut and ut["head.weight"].shape == t["head.weight"].shape
    res = tmp / "res_sub.json"
    assert main(["eval", "reward", "--data", str(data), "--holdout", "2", "--k", "4", "--out", str(res),
                 "--init", str(init), "--encoder", str(enc), "--seeds", "1", "--query", "10"]) == 0
    assert set(json.loads(res.read_text())["methods"]) == {"base", "linear", "scratch", "meta"}
    # a rank the train users cannot support is a clean error
    assert _meta_train(tmp, enc, data, tmp / "bad", "--inner", "subspace", "--basis-rank", "9") == 2


def test_subspace_warm_start_from_an_init(setup):
    """--init-from: LoRA of an earlier init, basis refitted on its features; provenance recorded."""
    from metarlhf.adapters import load_adapter

    tmp, enc, data = setup
    first = tmp / "first"
    assert _meta_train(tmp, enc, data, first) == 0
    second = tmp / "second"
    assert _meta_train(tmp, enc, data, second, "--inner", "subspace", "--basis-rank", "2",
                       "--init-from", str(first)) == 0
    meta = json.loads((second / "metarlhf.json").read_text())
    assert meta["warm_start"]["name"] == "meta-metasgd" and meta["warm_start"]["steps"] == 4
    a, b = load_adapter(first).tensors, load_adapter(second).tensors
    lora = next(k for k in a if "lora_A" in k)
    assert not torch.equal(a[lora], b[lora]) or meta["best_step"] == 0  # trained on from the first init
    # another split is refused before any training
    assert _meta_train(tmp, enc, data, tmp / "third", "--inner", "subspace", "--basis-rank", "2",
                       "--init-from", str(first), "--split-seed", "1") == 2


@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_second_order_meta_training_through_the_whole_encoder_runs(setup, algo):
    """--inner all differentiates the encoder's backward again: SDPA's fused CPU kernel cannot
    ("derivative ... not implemented"), so the encoder switches to plain attention."""
    tmp, enc, data = setup
    out = tmp / f"init_all_{algo}"
    assert _meta_train(tmp, enc, data, out, "--inner", "all", "--algo", algo, "--steps", "1") == 0
    assert json.loads((out / "metarlhf.json").read_text())["inner"] == "all"

"""Bad input refused up front (session 14 review): pickle weights, an --out of another
adapter kind, PPO settings that train to NaN, a file as the adapter root, duplicate users,
a pair with no preference."""

from __future__ import annotations

import json

import pytest
import torch

from metarlhf.adapters import Adapter, check_out, load_adapter, save_adapter
from metarlhf.cli import main
from metarlhf.data import parse_record
from metarlhf.errors import ConfigError, ModelError
from metarlhf.models import load_encoder, load_policy
from metarlhf.ppo.config import PPOConfig
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy


def _as_pickle(src, dst):
    """The same model directory with its weights as a pickle-based pytorch_model.bin only."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


@pytest.mark.parametrize("kind", ["policy", "encoder"])
def test_models_load_from_safetensors_only_never_from_pickle(tmp_path, kind):
    model, tok = tiny_policy() if kind == "policy" else tiny_encoder()
    good = save_tiny(model, tok, tmp_path / "good")
    assert (good / "model.safetensors").is_file()
    load = load_policy if kind == "policy" else load_encoder
    load(good)  # the safetensors directory loads
    bad = _as_pickle(good, tmp_path / "pickled")
    with pytest.raises(ModelError, match="never pickle"):
        load(bad)


def _adapter(kind: str) -> Adapter:
    return Adapter(tensors={"w": torch.zeros(2)}, config={"r": 8}, meta={"kind": kind, "base_model": "b"})


def test_an_adapter_of_another_kind_is_never_replaced(tmp_path):
    init = tmp_path / "init"
    save_adapter(init, _adapter("reward_init"), extra_files={"split.json": b"{}"})
    before = {p.name: p.read_bytes() for p in init.iterdir()}
    with pytest.raises(ConfigError, match="of kind 'reward'"):
        check_out(init, kind="reward")
    with pytest.raises(ConfigError):
        save_adapter(init, _adapter("reward"))
    assert {p.name: p.read_bytes() for p in init.iterdir()} == before  # untouched, split.json included
    check_out(init, kind="reward_init")  # the same kind may be replaced (a rerun)
    save_adapter(init, _adapter("reward_init"), extra_files={"split.json": b"{}"})
    assert load_adapter(init, verify=True).meta["kind"] == "reward_init"
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out(empty, kind="policy")


def test_adapt_reward_refuses_an_out_that_holds_a_policy_adapter(tmp_path, capsys):
    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"user_id": "u", "prompt": f"p{i}", "completion": f"c{i}", "label": i % 2})
                            + "\n" for i in range(6)))
    pol = tmp_path / "pol"
    save_adapter(pol, _adapter("policy"))
    before = (pol / "metarlhf.json").read_bytes()
    rc = main(["adapt", "reward", "--data", str(data), "--user", "u", "--k", "4", "--init", "scratch",
               "--encoder", str(enc), "--out", str(pol)])
    assert rc == 2 and "of kind 'reward'" in capsys.readouterr().err
    assert (pol / "metarlhf.json").read_bytes() == before


@pytest.mark.parametrize("bad", [{"lr": float("inf")}, {"kl_coef": float("nan")}, {"reward_clip": float("nan")},
                                 {"kl_horizon": 0}, {"lora_alpha": 0}, {"save_every": -1},
                                 {"missing_eos_penalty": float("-inf")}])
def test_ppo_config_refuses_values_that_train_to_nan_or_crash(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PPOConfig(**bad)
    PPOConfig(save_every=0, kl_horizon=1, lora_alpha=1)  # the edges are fine


def test_server_settings_refuse_a_file_as_adapter_root(tmp_path):
    from pydantic import ValidationError

    from server.settings import Settings

    f = tmp_path / "afile"
    f.write_text("x")
    for root in (f, f / "sub"):
        with pytest.raises(ValidationError, match="is a file, not a directory"):
            Settings(adapter_root=str(root))
    Settings(adapter_root=str(tmp_path / "new"))  # missing: created at start-up


def test_serve_with_a_file_as_adapter_root_exits_2_before_loading(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["serve", "--adapter-root", str(f)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_a_pair_with_the_same_text_twice_is_refused():
    with pytest.raises(ValueError, match="same text"):
        parse_record({"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "a"})
    assert parse_record({"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}).chosen == "a"


def test_eval_reward_refuses_a_users_file_that_lists_an_id_twice(tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("alice\nbob\nalice\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"user_id": "alice", "prompt": "p", "completion": "c", "label": 1}) + "\n")
    rc = main(["eval", "reward", "--data", str(data), "--users", str(users), "--k", "1",
               "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "more than once: alice" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_generate_refuses_a_system_message_without_a_chat(capsys):
    assert main(["generate", "--prompt", "Once", "--system", "be brief"]) == 2
    assert "--system goes with --message" in capsys.readouterr().err


def test_eval_policy_refuses_an_init_that_no_method_uses(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    rc = main(["eval", "policy", "--prompts", str(prompts), "--methods", "scratch", "--init", str(tmp_path / "x"),
               "--k", "2", "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "--init is the init of method 'meta'" in capsys.readouterr().err


def test_held_out_prompts_never_repeat_a_prompt_before_the_offset(tmp_path):
    from metarlhf.data import prompts_after

    f = tmp_path / "p.jsonl"
    texts = ["a", "b", "c", "a", "d", "d", "e", "f"]  # index 3 repeats 0; index 5 repeats 4
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    assert prompts_after(f, 3, 3) == ["d", "e", "f"]
    assert prompts_after(f, 3, 10) == ["d", "e", "f"]  # the file runs out
    assert prompts_after(f, 0, 4) == ["a", "b", "c", "d"]


def test_policy_eval_benchmark_honours_flag_equals_value(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("policy_eval_bench", Path(__file__).parents[1] / "benchmarks" /
                                                  "policy_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = {}

    def fake_cli(cmd):
        seen["cmd"] = cmd
        return 2

    monkeypatch.setattr("metarlhf.cli.main", fake_cli)
    assert bench.main(["--prompts=mine.jsonl", "--out=mine.json", "--k", "16"]) == 2
    # no default --prompts / --out appended after the user's (argparse keeps the last one)
    assert sum(a.startswith("--prompts") for a in seen["cmd"]) == 1
    assert sum(a.startswith("--out") for a in seen["cmd"]) == 1

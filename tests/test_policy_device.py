"""Policy adaptation and generation on the model's device: CPU plumbing here, CUDA under ``gpu``."""

import json

import pytest
import torch

from metarlhf import policy as P
from metarlhf.cli import main
from metarlhf.testing import save_tiny, tiny_policy, tiny_thumbs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_encode_pairs_places_the_batch_on_the_device():
    _, tok = tiny_policy()
    cpu = P.encode_pairs(tok, ["hi", "there"], ["a b", "c"])
    moved = P.encode_pairs(tok, ["hi", "there"], ["a b", "c"], device="meta")
    for name in ("input_ids", "attention_mask", "position_ids", "comp_mask"):
        assert getattr(moved, name).device.type == "meta"
        assert getattr(moved, name).shape == getattr(cpu, name).shape
        assert getattr(cpu, name).device.type == "cpu"
    assert moved.comp_len == cpu.comp_len
    back = cpu.to("cpu")
    assert torch.equal(back.input_ids, cpu.input_ids) and torch.equal(back.comp_mask, cpu.comp_mask)


def test_bf16_autocast_choice_per_device():
    assert P.use_bf16("bf16", "cpu") and P.use_bf16("bf16", "cuda")
    assert not P.use_bf16("fp32", "cpu") and not P.use_bf16("fp32", "cuda")
    if not torch.cuda.is_available():
        assert not P.use_bf16("auto", "cuda")
    assert not P.use_bf16("auto", "mps")


def test_bf16_auto_on_cuda_needs_native_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not P.use_bf16("auto", "cuda")  # emulated bf16 only (pre-Ampere): fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert P.use_bf16("auto", "cuda")
    with P.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with P.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")


def test_device_names():
    from metarlhf.errors import ConfigError
    from metarlhf.runtime import parse_device, resolve_device

    assert parse_device("auto") is None and parse_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, msg in (("tpu", "invalid device"), ("mps", "not supported"), ("", "invalid device")):
        with pytest.raises(ConfigError, match=msg):
            parse_device(bad)


@pytest.fixture
def feedback(tmp_path):
    data = tmp_path / "fb.jsonl"
    data.write_text("".join(json.dumps({"user_id": r.user_id, "prompt": r.prompt, "completion": r.completion,
                                        "label": r.label}) + "\n" for r in tiny_thumbs("alice")))
    model, tok = tiny_policy()
    return data, save_tiny(model, tok, tmp_path / "tiny")


def test_cli_refuses_an_absent_or_unknown_device(tmp_path, feedback, capsys):
    data, tiny = feedback
    common = ["--data", str(data), "--user", "alice", "--k", "4", "--out", str(tmp_path / "o"), "--init", "scratch",
              "--policy", str(tiny), "--steps", "1"]
    absent = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["adapt", "policy", *common, "--device", absent]) == 2
    assert f"'{absent}' is not available" in capsys.readouterr().err
    missing = ["--data", str(tmp_path / "missing.jsonl"), "--user", "alice", "--k", "4", "--out", str(tmp_path / "o")]
    assert main(["adapt", "policy", *missing, "--device", absent]) == 2  # the device is checked before the data
    assert "is not available" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(8)))
    assert main(["eval", "policy", "--prompts", str(prompts), "--out", str(tmp_path / "r.json"), "--policy", str(tiny),
                 "--device", absent]) == 2
    assert main(["meta-train", "policy", "--prompts", str(prompts), "--out", str(tmp_path / "m"),
                 "--policy", str(tiny), "--device", absent]) == 2
    assert capsys.readouterr().err.count("is not available") == 2
    assert main(["adapt", "policy", *common, "--device", "tpu"]) == 2
    assert "invalid device 'tpu'" in capsys.readouterr().err
    assert main(["adapt", "policy", *common, "--device", "mps"]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["adapt", "policy", *common, "--device", "cpu"]) == 0


# ------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("train_layers", [0, 1])
def test_adapt_policy_on_cuda_matches_cpu(train_layers):
    cfg = P.AdaptConfig(steps=4, lr=2e-2, precision="fp32", kl_weight=0.1, contrast_weight=1.0,
                        train_layers=train_layers)
    model, tok = tiny_policy()
    on_cpu = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=None, config=cfg)
    gmodel, _ = tiny_policy()
    on_gpu = P.adapt_policy(tiny_thumbs(), base=(gmodel.to("cuda"), tok), init=None, config=cfg)
    assert on_gpu.meta["losses"] == pytest.approx(on_cpu.meta["losses"], rel=1e-3, abs=1e-4)
    assert set(on_gpu.tensors) == set(on_cpu.tensors)
    for k, t in on_gpu.tensors.items():
        assert t.device.type == "cpu"
        torch.testing.assert_close(t, on_cpu.tensors[k], rtol=1e-3, atol=1e-4)
    assert next(gmodel.parameters()).device.type == "cuda" and not hasattr(gmodel, "peft_config")


@pytest.mark.gpu
@needs_cuda
def test_generate_and_bf16_adaptation_on_cuda():
    model, tok = tiny_policy()
    model = model.to("cuda")
    a = P.generate(model, tok, ["hi", "there"], max_new_tokens=5, seed=3)
    assert a == P.generate(model, tok, ["hi", "there"], max_new_tokens=5, seed=3) and len(a) == 2
    assert P.use_bf16("auto", "cuda") == torch.cuda.is_bf16_supported(including_emulation=False)
    ad = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=None, config=P.AdaptConfig(steps=3))  # auto: bf16
    assert ad.meta["config"]["precision"] == "auto" and all(map(lambda x: x == x, ad.meta["losses"]))
    fp32 = P.adapt_policy(tiny_thumbs(), base=(model, tok), init=None, config=P.AdaptConfig(steps=3, precision="fp32"))
    if P.use_bf16("auto", "cuda"):  # bf16 rounding shows in the losses
        assert ad.meta["losses"] != fp32.meta["losses"]


@pytest.mark.gpu
@needs_cuda
def test_cli_adapt_and_eval_policy_on_cuda(tmp_path, feedback):
    data, tiny = feedback
    assert main(["adapt", "policy", "--data", str(data), "--user", "alice", "--k", "4", "--out", str(tmp_path / "o"),
                 "--init", "scratch", "--policy", str(tiny), "--steps", "2", "--device", "cuda"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "res.json"
    assert main(["eval", "policy", "--users", "bullets", "--k", "4", "--prompts", str(prompts), "--offset", "0",
                 "--eval-prompts", "3", "--methods", "scratch", "--steps", "1", "--max-new-tokens", "4",
                 "--explore", "adaptive", "--policy", str(tiny), "--out", str(out), "--device", "cuda"]) == 0
    assert json.loads(out.read_text())["rows"][0]["adapt_s"] > 0

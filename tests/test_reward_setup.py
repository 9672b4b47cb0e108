"""Reward encoder set-up: first N layers, LoRA on some layers, standardised features."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_reward_meta_cli import _write_personas

from metarlhf.adapters import load_adapter, save_adapter
from metarlhf.cli import main
from metarlhf.data import Thumbs
from metarlhf.errors import AdapterError, ConfigError, ModelError
from metarlhf.reward import STATS_KEYS, RewardConfig, RewardModel, adapt_reward, load_reward_model
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy


def _recs(user="u"):
    return [Thumbs(user, "p", f"{w} {w} text", i % 2) for i, w in enumerate(["alpha", "beta", "gamma", "delta",
                                                                           "eps", "zeta"])]


def test_config_checks_and_old_adapters_read_with_defaults():
    with pytest.raises(ConfigError, match="lora_layers"):
        RewardConfig(encoder_layers=2, lora_layers=[2])
    with pytest.raises(ConfigError, match="lora_layers"):
        RewardConfig(lora_layers=[])
    with pytest.raises(ConfigError, match="encoder_layers"):
        RewardConfig(encoder_layers=0)
    assert RewardConfig(lora_layers=[3, 1, 3]).lora_layers == [1, 3]
    old = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "max_length": 128, "prompt_max_tokens": 16}
    assert RewardConfig.from_dict(old) == RewardConfig()
    new = RewardConfig(encoder_layers=1, lora_layers=[0], standardise=True)
    assert RewardConfig.from_dict(json.loads(json.dumps(new.__dict__))) == new
    assert "standardise" in RewardConfig().encoder_mismatch(new) or "encoder_layers" in RewardConfig().encoder_mismatch(new)
    assert new.encoder_mismatch(RewardConfig.from_dict(new.__dict__)) is None


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_encoder_layers_and_lora_layers(tmp_path, kind):
    model, tok = tiny_encoder(layers=3) if kind == "bert" else tiny_policy(layers=3)
    enc_dir = save_tiny(model, tok, tmp_path / kind)
    m = load_reward_model(enc_dir, adapter_dir=None, config=RewardConfig(encoder_layers=2, lora_layers=[1]))
    layers = m.peft.base_model.model.encoder.layer if kind == "bert" else m.peft.base_model.model.layers
    assert len(layers) == 2
    lora = [n for n in m.adapter_params() if "lora_" in n]
    assert len(lora) == 4 and all((".layer.1." if kind == "bert" else ".layers.1.") in n for n in lora)
    # the written adapter_config.json tells peft the same: LoRA on layer 1 only
    from peft import LoraConfig, get_peft_model

    cfg = m.make_adapter(m.fresh_params(0), {}).config
    assert cfg["layers_to_transform"] == [1]
    fresh, _ = tiny_encoder(layers=3) if kind == "bert" else tiny_policy(layers=3)
    peft_model = get_peft_model(fresh if kind == "bert" else fresh.model,
                                LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"}))
    targets = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(targets) == 2 and all((".layer.1." if kind == "bert" else ".layers.1.") in n for n in targets)
    assert "layers_to_transform" not in load_reward_model(enc_dir, adapter_dir=None).make_adapter({}, {}).config
    with pytest.raises(ModelError, match="has 3 layers; cannot keep 4"):
        load_reward_model(enc_dir, adapter_dir=None, config=RewardConfig(encoder_layers=4))
    with pytest.raises(ModelError, match="outside the encoder's 3 layers"):
        load_reward_model(enc_dir, adapter_dir=None, config=RewardConfig(lora_layers=[1, 5]))
    with pytest.raises(ModelError, match="encoder_layers=2"):  # a prebuilt encoder of another depth
        RewardModel(model if kind == "bert" else model.model, tok, "x", RewardConfig(encoder_layers=2))


def test_standardised_features_round_trip_through_an_adapter(tmp_path):
    enc, tok = tiny_policy()
    enc_dir = save_tiny(enc, tok, tmp_path / "dec")
    m = load_reward_model(enc_dir, adapter_dir=None, config=RewardConfig(standardise=True))
    recs = _recs()
    ids = m.encode_records(recs).ids
    m.fit_feature_stats(ids)
    with torch.no_grad():
        raw = torch.cat([m.pooled(*m.collate([x])) for x in ids])
        assert torch.allclose(m.feature_mean, raw.mean(0), atol=1e-5)
        assert torch.allclose(m.feature_std, raw.std(0), atol=1e-5)
        emb = m.embed_ids(ids)
        assert torch.allclose(emb, F.normalize((raw - raw.mean(0)) / raw.std(0), dim=-1), atol=1e-4)
        assert not torch.allclose(emb, F.normalize(raw, dim=-1), atol=1e-2)  # the standardisation does something
    ad = adapt_reward(recs, init="scratch", encoder=m, steps=5)
    assert set(STATS_KEYS) <= set(ad.tensors) and ad.meta["reward_config"]["standardise"] is True
    save_adapter(tmp_path / "user", ad)
    m2 = load_reward_model(enc_dir, adapter_dir=tmp_path / "user")
    assert m2.config.standardise and torch.equal(m2.feature_mean, m.feature_mean)
    m.set_params(m.params_from_tensors(ad.tensors, "x"))
    ps, cs = [r.prompt for r in recs], [r.completion for r in recs]
    assert torch.allclose(m.score(ps, cs), m2.score(ps, cs), atol=1e-5)
    # a plain model refuses it, and a standardised adapter without its statistics is refused
    pol, ptok = tiny_policy()
    plain = RewardModel(pol.model, ptok, m.base_model)
    with pytest.raises(AdapterError, match="standardise"):
        plain.load_adapter_dir(tmp_path / "user")
    broken = load_adapter(tmp_path / "user")
    del broken.tensors[STATS_KEYS[1]]
    save_adapter(tmp_path / "broken", broken)
    with pytest.raises(AdapterError, match="without"):
        load_reward_model(enc_dir, adapter_dir=tmp_path / "broken")


def test_shared_model_refuses_an_init_with_other_statistics(tmp_path):
    pol, tok = tiny_policy()
    m = RewardModel(pol.model, tok, "tiny-dec", RewardConfig(standardise=True))
    m.fit_feature_stats(m.encode_records(_recs()).ids)
    init = m.make_adapter(m.fresh_params(0), {"kind": "reward_init", "inner": "head", "inner_steps": 2},
                          log_lrs={"head.weight": torch.zeros(1, m.hidden_size), "head.bias": torch.zeros(1)})
    save_adapter(tmp_path / "init", init)
    assert adapt_reward(_recs(), init=tmp_path / "init", encoder=m).meta["steps"] == 2
    with torch.no_grad():
        m.feature_std.mul_(2)
    with pytest.raises(AdapterError, match="other feature statistics"):
        adapt_reward(_recs(), init=tmp_path / "init", encoder=m)


def test_meta_train_standardised_decoder_end_to_end(tmp_path, capsys):
    pol, tok = tiny_policy(layers=3)
    enc = save_tiny(pol, tok, tmp_path / "dec")
    data = _write_personas(tmp_path / "personas")
    common = ["--data", str(data), "--encoder", str(enc), "--steps", "4", "--val-every", "2", "--ckpt-every", "2",
              "--holdout-test", "2", "--holdout-val", "2", "--k", "4", "--query", "8", "--meta-batch", "2",
              "--no-progress", "--device", "cpu", "--encoder-layers", "2", "--lora-layers", "1", "--standardise",
              "--inner", "subspace", "--basis-rank", "3"]
    out = tmp_path / "init"
    assert main(["meta-train", "reward", "--out", str(out), "--max-seconds", "0", *common]) == 0
    first = load_adapter(out).tensors
    assert not torch.equal(first[STATS_KEYS[0]], torch.zeros_like(first[STATS_KEYS[0]]))
    assert not torch.equal(first[STATS_KEYS[1]], torch.ones_like(first[STATS_KEYS[1]]))
    assert main(["meta-train", "reward", "--out", str(out), "--resume", *common]) == 0  # stats from the checkpoint
    meta = json.loads((out / "metarlhf.json").read_text())
    assert meta["steps"] == 4
    for key in STATS_KEYS:
        assert torch.equal(load_adapter(out).tensors[key], first[key])
    assert meta["reward_config"] | {"target_modules": None} == RewardConfig(
        encoder_layers=2, lora_layers=[1], standardise=True, target_modules=None).__dict__
    t = load_adapter(out).tensors
    assert set(STATS_KEYS) <= set(t) and float(t[STATS_KEYS[1]].min()) > 0
    assert all(".layers.1." in k for k in t if "lora_" in k)
    user = json.loads((out / "split.json").read_text())["test"][0]
    assert main(["adapt", "reward", "--data", str(data), "--user", user, "--k", "8", "--out", str(tmp_path / "a"),
                 "--init", str(out), "--encoder", str(enc), "--device", "cpu"]) == 0
    assert torch.equal(load_adapter(tmp_path / "a").tensors[STATS_KEYS[0]], t[STATS_KEYS[0]])
    res = tmp_path / "r.json"
    assert main(["eval", "reward", "--data", str(data), "--holdout", "2", "--k", "4", "--out", str(res), "--init",
                 str(out), "--encoder", str(enc), "--seeds", "1", "--query", "10", "--device", "cpu"]) == 0
    assert set(json.loads(res.read_text())["methods"]) == {"base", "linear", "scratch", "meta"}
    capsys.readouterr()
    # LoRA layers outside the kept layers: exit 2 before anything is trained
    assert main(["meta-train", "reward", "--out", str(tmp_path / "bad"), *common, "--lora-layers", "2"]) == 2
    assert "lora_layers" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_resume_a_checkpoint_from_before_the_setup_options(tmp_path, capsys):
    """A checkpoint whose config lacks encoder_layers / lora_layers / standardise resumes with their defaults."""
    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = _write_personas(tmp_path / "personas")
    common = ["--data", str(data), "--encoder", str(enc), "--steps", "2", "--val-every", "1", "--holdout-test", "2",
              "--holdout-val", "2", "--k", "4", "--query", "8", "--meta-batch", "2", "--no-progress", "--device", "cpu",
              "--out", str(tmp_path / "init")]
    assert main(["meta-train", "reward", "--max-seconds", "0", *common]) == 0
    state = tmp_path / "init.ckpt" / "state.json"
    saved = json.loads(state.read_text())
    for key in ("encoder_layers", "lora_layers", "standardise"):
        del saved["config"][key]
    state.write_text(json.dumps(saved))
    assert main(["meta-train", "reward", "--resume", "--standardise", *common]) == 2  # not what it was made with
    assert "different configuration" in capsys.readouterr().err
    assert main(["meta-train", "reward", "--resume", *common]) == 0
    assert json.loads((tmp_path / "init" / "metarlhf.json").read_text())["steps"] == 2


def test_embedded_policy_as_the_encoder(tmp_path, monkeypatch):
    """``--encoder embedded-policy`` is the embedded SmolLM2's directory, named as that directory;
    a real directory of that name wins."""
    import metarlhf.models as models

    pol, tok = tiny_policy()
    pdir = save_tiny(pol, tok, tmp_path / "smollm2-135m-instruct")
    monkeypatch.setattr(models, "resolve_policy_dir", lambda model_dir=None: pdir)
    monkeypatch.chdir(tmp_path)
    m = load_reward_model("embedded-policy", adapter_dir=None)
    assert m.base_model == models.model_name(pdir, "x") and m.hidden_size == 32
    assert models.resolve_encoder_dir("embedded-policy") == pdir
    save_tiny(*tiny_encoder(hidden=64), tmp_path / "embedded-policy")
    assert load_reward_model("embedded-policy", adapter_dir=None).hidden_size == 64


def test_an_init_for_another_encoder_is_refused_before_loading(tmp_path):
    """The init's encoder is named in the error, before the (wrong) encoder is loaded."""
    pol, tok = tiny_policy()
    m = RewardModel(pol.model, tok, "tiny-dec")
    save_adapter(tmp_path / "init", m.make_adapter(m.fresh_params(0), {"kind": "reward_init"}))
    with pytest.raises(AdapterError, match="made for the reward encoder 'tiny-dec', not 'all-MiniLM-L6-v2'"):
        load_reward_model(None, adapter_dir=tmp_path / "init")

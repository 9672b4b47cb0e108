"""DefaultPersonalizer (what `metarlhf serve` uses) on tiny model directories."""

import pytest

from metarlhf.data import Thumbs
from metarlhf.jobs import DefaultPersonalizer, user_preference
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy


def test_default_personalizer_adapts_and_embeds(tmp_path):
    pdir = save_tiny(*tiny_policy(), tmp_path / "policy")
    edir = save_tiny(*tiny_encoder(), tmp_path / "encoder")
    p = DefaultPersonalizer(str(pdir), str(edir), reward_steps=1, policy_steps=1)
    p.policy_init = "scratch"  # the shipped init is for SmolLM2, not this tiny model
    assert p.reward_init == "scratch"  # the shipped reward init is MiniLM's: not for this encoder
    recs = [Thumbs("u", "q", "good", 1), Thumbs("u", "q", "bad", 0)]
    assert p.embed(["q"], ["a"]).shape == (1, p.embed_dim)
    assert user_preference(p, recs).shape == (p.embed_dim,)
    reward = p.adapt_reward(recs)
    policy = p.adapt_policy(recs, None)
    assert reward.meta["kind"] == "reward" and policy.meta["kind"] == "policy"
    assert policy.meta["base_model"] == p.policy_base


def test_default_personalizer_with_an_init_for_its_encoder(tmp_path):
    """``reward_init``: an init made for a standardised decoder encoder shapes the shared model
    (its layers, its feature statistics), and users adapt from it."""
    import torch

    from metarlhf.adapters import save_adapter
    from metarlhf.errors import ConfigError
    from metarlhf.reward import STATS_KEYS, RewardConfig, load_reward_model

    pol, tok = tiny_policy(layers=3)
    pdir = save_tiny(pol, tok, tmp_path / "policy")
    edir = save_tiny(pol.model, tok, tmp_path / "encoder")  # saved before any LoRA goes on it
    cfg = RewardConfig(encoder_layers=2, lora_layers=[1], standardise=True)
    setup = load_reward_model(edir, adapter_dir=None, config=cfg)
    setup.fit_feature_stats(setup.encode_records([Thumbs("u", "q", w, 1) for w in ("a b", "c d e", "f")]).ids)
    init = setup.make_adapter(setup.fresh_params(0), {"kind": "reward_init", "inner": "head", "inner_steps": 2},
                              log_lrs={"head.weight": torch.zeros(1, 32), "head.bias": torch.zeros(1)})
    save_adapter(tmp_path / "init", init)
    p = DefaultPersonalizer(str(pdir), str(edir), policy_steps=1, reward_init=str(tmp_path / "init"))
    assert p.reward_model.config.standardise and len(p.reward_model.peft.base_model.model.layers) == 2
    assert torch.equal(p.reward_model.feature_mean, setup.feature_mean)
    reward = p.adapt_reward([Thumbs("u", "q", "good", 1), Thumbs("u", "q", "bad", 0)])
    assert reward.meta["steps"] == 2 and torch.equal(reward.tensors[STATS_KEYS[1]], setup.feature_std)
    user = setup.make_adapter(setup.fresh_params(0), {"kind": "reward"})
    save_adapter(tmp_path / "user", user)
    with pytest.raises(ConfigError, match="not a reward init"):
        DefaultPersonalizer(str(pdir), str(edir), policy_steps=1, reward_init=str(tmp_path / "user"))

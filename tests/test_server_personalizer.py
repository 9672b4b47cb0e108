"""DefaultPersonalizer (what `metarlhf serve` uses) on tiny model directories."""

from metarlhf.data import Thumbs
from metarlhf.jobs import DefaultPersonalizer, user_preference
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy


def test_default_personalizer_adapts_and_embeds(tmp_path):
    pdir = save_tiny(*tiny_policy(), tmp_path / "policy")
    edir = save_tiny(*tiny_encoder(), tmp_path / "encoder")
    p = DefaultPersonalizer(str(pdir), str(edir), reward_steps=1, policy_steps=1)
    p.policy_init = "scratch"  # the shipped init is for SmolLM2, not this tiny model
    p.reward_init = "scratch"
    recs = [Thumbs("u", "q", "good", 1), Thumbs("u", "q", "bad", 0)]
    assert p.embed(["q"], ["a"]).shape == (1, p.embed_dim)
    assert user_preference(p, recs).shape == (p.embed_dim,)
    reward = p.adapt_reward(recs)
    policy = p.adapt_policy(recs, None)
    assert reward.meta["kind"] == "reward" and policy.meta["kind"] == "policy"
    assert policy.meta["base_model"] == p.policy_base

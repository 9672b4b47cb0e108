"""PPO trainer and CLI on tiny random models (seconds on CPU)."""

import json
import math
import re

import pytest
import torch

from metarlhf.cli import main
from metarlhf.errors import AdapterError, ConfigError, DataError, NotFoundError
from metarlhf.ppo import PPOConfig, PPOTrainer, resolve_device, resolve_reward, score_completions, train
from metarlhf.testing import save_tiny, tiny_policy

PROMPTS = ["hello", "write a story", "what is 2+2", "hi there"]


def share_of_a(prompts, completions):
    """Programmatic reward: the share of the letter 'a' in the completion."""
    return [c.count("a") / max(1, len(c)) for c in completions]


def distinct_chars(prompts, completions):
    """A dense reward (varies across samples from the start), for tests that need gradients."""
    return [float(len(set(c))) for c in completions]


def small_config(**kw):
    base = dict(steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8, save_every=0)
    base.update(kw)
    return PPOConfig(**base)


def test_ppo_learns_token_share():
    """Full fine-tuning of a tiny random model raises the share of one token within 30 steps."""
    model, tok = tiny_policy(seed=0)
    cfg = PPOConfig(steps=30, batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16, lr=3e-3,
                    kl_coef=0.0, lora=False, seed=0)
    trainer = PPOTrainer(model, tok, share_of_a, cfg)
    rewards = [trainer.step(PROMPTS * 4)["reward"] for _ in range(cfg.steps)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
    assert last > 10 * max(first, 0.005), rewards


def test_lora_ppo_changes_only_adapter_weights():
    model, tok = tiny_policy(seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PPOTrainer(model, tok, distinct_chars, small_config(lr=1e-2, lora=True))
    head_before = trainer.value_head.proj.weight.detach().clone()
    for _ in range(2):
        trainer.step(PROMPTS * 2)
    changed_lora, unchanged_base = 0, 0
    for n, p in trainer.model.named_parameters():
        if "lora_" in n:
            changed_lora += int(p.requires_grad)
            continue
        assert not p.requires_grad, n
        orig = n.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, before[orig]), f"base weight {n} changed"
        unchanged_base += 1
    assert changed_lora > 0 and unchanged_base == len(before)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices never moved from zero"
    assert not torch.equal(trainer.value_head.proj.weight, head_before)


def test_lora_reference_is_base_with_adapter_disabled():
    """Before any update (LoRA B = 0) the policy and the reference agree exactly: KL is 0."""
    model, tok = tiny_policy(seed=2)
    trainer = PPOTrainer(model, tok, share_of_a, small_config(lora=True))
    batch = trainer.rollout(PROMPTS)
    assert torch.allclose(batch.logprobs, batch.ref_logprobs, atol=1e-6)
    assert batch.mask.shape == batch.logprobs.shape == (4, batch.input_ids.shape[1] - batch.context_len)
    assert trainer.ref_model is None  # no second copy of the model


def test_full_finetune_keeps_a_frozen_reference():
    model, tok = tiny_policy(seed=3)
    trainer = PPOTrainer(model, tok, distinct_chars, small_config(lora=False, lr=1e-2))
    ref_before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.step(PROMPTS * 2)
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())
    assert any(not torch.equal(p, ref_before[n]) for n, p in trainer.model.named_parameters())


def test_critic_value_model_and_options():
    model, tok = tiny_policy(seed=4)
    cfg = small_config(value_model="critic", whiten_rewards=True, reward_clip=0.5, missing_eos_penalty=0.1,
                       adaptive_kl=True, kl_estimator="k3", ent_coef=0.01)
    trainer = PPOTrainer(model, tok, share_of_a, cfg)
    assert trainer.value_head is None and trainer.critic is not None
    assert all(p.requires_grad for p in trainer.critic.parameters())  # a full critic, not LoRA-frozen
    critic_before = {n: p.clone() for n, p in trainer.critic.named_parameters()}
    m = trainer.step(PROMPTS * 2)
    for key in ("reward", "kl", "entropy", "clipfrac", "vf_loss", "explained_variance", "tokens_per_s"):
        assert key in m and (math.isfinite(m[key]) or key == "explained_variance")
    assert m["kl_coef"] == cfg.kl_coef and trainer.kl_coef != cfg.kl_coef  # adapted after the step
    assert any(not torch.equal(p, critic_before[n]) for n, p in trainer.critic.named_parameters())


def test_reward_output_is_validated():
    with pytest.raises(DataError, match="batch item 1.*'b'"):
        score_completions(lambda p, c: [0.0, float("nan")], ["a", "b"], ["x", "y"])
    with pytest.raises(DataError, match="returned \\(3,\\) values for 2 prompts"):
        score_completions(lambda p, c: [0.0, 1.0, 2.0], ["a", "b"], ["x", "y"])
    with pytest.raises(DataError, match="raised ZeroDivisionError"):
        score_completions(lambda p, c: [1 / 0], ["a"], ["x"])
    assert score_completions(lambda p, c: torch.tensor([1.0, 2.0]), ["a", "b"], ["x", "y"]).tolist() == [1.0, 2.0]


def test_resolve_reward_specs(tmp_path):
    f = tmp_path / "rew.py"
    f.write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    fn = resolve_reward(f"python:{f}:length")
    assert fn(["p"], ["abc"]) == [3.0]
    with pytest.raises(ConfigError, match="cannot resolve reward"):
        resolve_reward("bogus")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_reward(f"python:{tmp_path}/nope.py:length")
    with pytest.raises(ConfigError, match="no function 'missing'"):
        resolve_reward(f"python:{f}:missing")
    with pytest.raises(NotFoundError, match="no usable reward adapter for user 'alice'"):
        resolve_reward("user:alice", adapters_root=tmp_path)
    (tmp_path / "users/default/bob/reward").mkdir(parents=True)
    (tmp_path / "users/default/bob/reward/CURRENT").write_text("v2\n")  # names a version that is missing
    with pytest.raises(NotFoundError, match="no usable reward adapter for user 'bob'"):
        resolve_reward("user:bob", adapters_root=tmp_path)
    with pytest.raises(NotFoundError, match="directory '/nonexistent/adapter' does not exist"):
        resolve_reward("user:/nonexistent/adapter")
    with pytest.raises(ConfigError, match="user id must"):
        resolve_reward("user:..", adapters_root=tmp_path)


def test_user_and_base_rewards_from_adapter_store(tmp_path, tiny_encoder):
    reward = pytest.importorskip("metarlhf.reward")
    from metarlhf.data import Thumbs
    from metarlhf.store import AdapterStore

    enc_dir = save_tiny(*tiny_encoder, tmp_path / "enc")
    records = [Thumbs("carol", "q", "yes indeed", 1), Thumbs("carol", "q", "no", 0)]
    adapter = reward.adapt_reward(records, init="scratch", encoder=str(enc_dir), steps=2)
    version = AdapterStore(tmp_path / "adapters").save("default", "carol", "reward", adapter)
    expected = reward.load_reward_model(str(enc_dir), adapter_dir=version.path).score(["q", "q"], ["yes indeed", "no"])
    for spec in ("user:carol", f"user:{version.path}"):  # store id, or any adapter dir (e.g. a cluster's)
        fn = resolve_reward(spec, adapters_root=tmp_path / "adapters", encoder_dir=str(enc_dir))
        scores = score_completions(fn, ["q", "q"], ["yes indeed", "no"])
        assert torch.allclose(scores, expected, atol=1e-5)
    # --reward base with another encoder and no init of its own: refused, never a silent zero reward
    with pytest.raises((AdapterError, ConfigError), match="pass --reward-init"):
        resolve_reward("base", adapters_root=tmp_path / "adapters", encoder_dir=str(enc_dir))
    # --reward base with an init of one's own (e.g. one made for another encoder) scores with that init
    rm = reward.load_reward_model(str(enc_dir))
    params = {k: (torch.randn_like(v) if k == "head.weight" else v) for k, v in rm.fresh_params(0).items()}
    init = rm.make_adapter(params, {"kind": "reward_init", "inner": "head", "inner_steps": 2},
                           log_lrs={"head.weight": torch.zeros(1, rm.hidden_size), "head.bias": torch.zeros(1)})
    from metarlhf.adapters import save_adapter

    save_adapter(tmp_path / "init", init)
    own = resolve_reward("base", adapters_root=tmp_path / "adapters", encoder_dir=str(enc_dir),
                         reward_init=tmp_path / "init")
    expected = reward.load_reward_model(str(enc_dir), adapter_dir=tmp_path / "init").score(["q", "q"], ["yes", "no"])
    assert expected.abs().max() > 0 and torch.allclose(score_completions(own, ["q", "q"], ["yes", "no"]), expected)
    with pytest.raises(ConfigError, match="not a reward init"):
        resolve_reward("base", encoder_dir=str(enc_dir), reward_init=version.path)  # a user adapter
    # an init in the store's meta/ is not the shipped init (found from the package): still refused
    save_adapter(tmp_path / "adapters" / "meta" / "reward", init)
    other = save_tiny(*tiny_policy(), tmp_path / "other-encoder")
    with pytest.raises(AdapterError, match="pass --reward-init"):
        resolve_reward("base", adapters_root=tmp_path / "adapters", encoder_dir=str(other))


def test_device_not_available():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda' is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    def run(steps, out, resume=False):
        model, tok = tiny_policy(seed=5)
        trainer = PPOTrainer(model, tok, share_of_a, small_config(steps=steps, lora=True, lr=1e-2, save_every=2))
        train(trainer, PROMPTS, out, resume=resume, progress=False)
        return trainer

    full = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b", resume=True)
    assert resumed.step_count == 4
    for (n, p), (_, q) in zip(full.trainable_parameters().items(), resumed.trainable_parameters().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    rows = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.fixture
def cli_setup(tmp_path):
    model, tok = tiny_policy(seed=6)
    policy_dir = save_tiny(model, tok, tmp_path / "policy")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    rew = tmp_path / "rew.py"
    rew.write_text(
        "def share(prompts, completions):\n    return [c.count('a') / max(1, len(c)) for c in completions]\n"
        "def nan_on_second(prompts, completions):\n    return [0.0] + [float('nan')] * (len(prompts) - 1)\n"
        "def too_few(prompts, completions):\n    return [0.0]\n"
    )
    common = ["ppo", "--prompts", str(prompts), "--policy", str(policy_dir), "--device", "cpu", "--no-progress",
              "--steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "6"]
    return tmp_path, common, rew


def test_cli_lora_run_writes_adapter_metrics_plot(cli_setup):
    tmp_path, common, rew = cli_setup
    out = tmp_path / "out"
    assert main(common + ["--reward", f"python:{rew}:share", "--out", str(out), "--eval-prompts",
                          str(tmp_path / "prompts.txt"), "--eval-every", "2", "--kl-bound", "1.0"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: held-out eval of the base policy
    assert "eval_reward" in rows[0] and "eval_reward" in rows[-1] and "reward" not in rows[0]
    for key in ("reward", "kl", "entropy", "clipfrac", "vf_loss", "explained_variance", "tokens_per_s"):
        assert key in rows[1]
    assert (out / "curves.png").stat().st_size > 1000
    from metarlhf.adapters import load_adapter

    adapter = load_adapter(out / "adapter", expect_kind="policy", expect_rank=8)
    assert any("lora_A" in k for k in adapter.tensors) and adapter.meta["steps"] == 2
    # and peft can load it onto the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    PeftModel.from_pretrained(base, out / "adapter")
    # resume to 3 steps continues from the checkpoint
    assert main(common + ["--steps", "3", "--reward", f"python:{rew}:share", "--out", str(out), "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_cli_full_run_writes_hf_model(cli_setup):
    tmp_path, common, rew = cli_setup
    out = tmp_path / "full"
    assert main(common + ["--reward", f"python:{rew}:share", "--out", str(out), "--full"]) == 0
    from transformers import AutoModelForCausalLM

    assert (out / "model/model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward", "bogus"], "cannot resolve reward 'bogus'"),
        (["--reward", "python:REW:nan_on_second"], "returned nan for batch item 1 \\(prompt"),
        (["--reward", "python:REW:too_few"], "returned \\(1,\\) values for 4 prompts"),
        (["--reward", "user:nobody"], "no usable reward adapter for user 'nobody'"),
        (["--reward", "base", "--reward-init", "NOPE"], "no reward init there"),
        (["--reward", "python:REW:share", "--reward-init", "NOPE"], "only applies to the 'base' reward"),
    ],
)
def test_cli_bad_input_exits_2(cli_setup, capsys, extra, message):
    tmp_path, common, rew = cli_setup
    extra = [e.replace("REW", str(rew)).replace("NOPE", str(tmp_path / "nope")) for e in extra]
    assert main(common + extra + ["--out", str(tmp_path / "o"), "--adapters-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err
    assert re.search(message, err), err


def test_cli_empty_prompts_and_missing_device(cli_setup, capsys):
    tmp_path, common, rew = cli_setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [a if a != str(tmp_path / "prompts.txt") else str(empty) for a in common]
    assert main(args + ["--reward", f"python:{rew}:share", "--out", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    if not torch.cuda.is_available():
        args = [a if a != "cpu" else "cuda" for a in common]
        assert main(args + ["--reward", f"python:{rew}:share", "--out", str(tmp_path / "o")]) == 2
        assert "'cuda' is not available" in capsys.readouterr().err
    assert main(common + ["--reward", f"python:{rew}:share", "--out", str(tmp_path / "o"),
                          "--mini-batch-size", "8"]) == 2
    assert "mini_batch_size" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ppo_step_on_cuda_with_bf16_autocast():
    model, tok = tiny_policy(seed=7)
    trainer = PPOTrainer(model, tok, distinct_chars, small_config(lora=True), device="cuda")
    assert trainer.autocast_dtype == torch.bfloat16
    m = trainer.step(PROMPTS * 2)
    assert math.isfinite(m["reward"]) and math.isfinite(m["pg_loss"])
    assert next(trainer.model.parameters()).device.type == "cuda"


def test_rollouts_sample_exactly_the_distribution_ppo_scores():
    """A policy whose generation_config carries a repetition penalty (or min_new_tokens...):
    generate applied it, the PPO log-probs did not, so ratios and KL were off-policy."""
    import torch.nn.functional as F
    from transformers import GenerationConfig

    model, tok = tiny_policy(seed=0)
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.min_new_tokens = 4
    tr = PPOTrainer(model, tok, lambda p, c: [0.0] * len(p), small_config(batch_size=4, mini_batch_size=2,
                                                                          max_new_tokens=10))
    prompts = ["hi", "write a story about cats", "2+2", "x"]
    enc = tr.encode_prompts(prompts)
    ctx = enc["input_ids"].shape[1]
    torch.manual_seed(1)
    b = tr.rollout(prompts)
    assert model.generation_config.repetition_penalty == 1.3  # the policy's own settings are kept for saving
    plain = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tr.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    g = tr.model.generate(**enc, generation_config=plain, do_sample=True, max_new_tokens=10, temperature=1.0, top_k=0,
                          top_p=1.0, output_scores=True, return_dict_in_generate=True, repetition_penalty=1.0,
                          min_new_tokens=0)
    assert torch.equal(g.sequences[:, ctx:], b.input_ids[:, ctx:])
    sampled = torch.gather(F.log_softmax(torch.stack(g.scores, 1).float(), -1), 2,
                           b.input_ids[:, ctx:].unsqueeze(-1)).squeeze(-1) * b.mask
    assert (b.logprobs - sampled).abs().max() < 1e-4


@pytest.mark.parametrize("bad", [{"missing_eos_penalty": -5.0}, {"adaptive_kl": True, "kl_coef": 0.0}])
def test_ppo_settings_that_reward_truncation_or_freeze_beta_are_refused(bad):
    with pytest.raises(ConfigError):
        PPOConfig(**bad)

"""Throughput of metarlhf PPO against TRL's PPO trainer (``trl.experimental.ppo``), same process.

Both train the same random Llama policy (full fine-tuning) from the same weights, with
the same reward model (a random ``LlamaForSequenceClassification`` on the same
tokenizer), batch size, minibatch size, PPO epochs, response length, sampling
settings (temperature 1, top_k 0, top_p 1), KL coefficient and learning rate.
TRL's value model is a separate critic (its only option); metarlhf is measured twice:
with its default value head (``value_model="head"``) and with a separate critic
(``value_model="critic"``), which matches TRL's compute exactly.

    tokens/s = batch_size * response_length / seconds per PPO step

(the nominal generated tokens; neither side stops early in practice on a random model).
The first ``--warmup`` steps of each trainer are not timed. TRL is a benchmark-only
extra: run with the separate venv, ``.venv-bench/bin/python benchmarks/ppo_vs_trl.py``.
On a GPU: ``--device cuda``; ``--precision`` fp32 (default) or bf16 applies to both
(metarlhf's ``precision``, TRL's ``bf16``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402


def build_models(hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from metarlhf.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 32), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=True, num_labels=1,
    )
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(seed + 1)
    reward = LlamaForSequenceClassification(cfg).eval()
    return cfg, tok, policy, reward


def prompts_list(n: int) -> list[str]:
    topics = ["the weather", "a cat", "python code", "the moon", "cooking rice", "a short poem", "history", "music"]
    return [f"Tell me about {topics[i % len(topics)]} (#{i})." for i in range(n)]


def make_reward_fn(reward_model, tok):
    """Our reward callable: the same sequence-classification model on chat prompt + completion
    (on the reward model's device)."""

    def reward_fn(prompts, completions):
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) + c
            for p, c in zip(prompts, completions, strict=True)
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(reward_model.device) for k, v in enc.items()}
        with torch.no_grad():
            return reward_model(**enc).logits[:, 0]

    return reward_fn


def run_ours(policy, tok, reward_model, a, value_model: str) -> dict:
    import copy

    from metarlhf.ppo import PPOConfig, PPOTrainer

    cfg = PPOConfig(
        steps=a.steps, batch_size=a.batch_size, mini_batch_size=a.mini_batch_size, ppo_epochs=a.ppo_epochs,
        max_new_tokens=a.response_length, temperature=1.0, lr=a.lr, kl_coef=a.kl_coef, lora=False,
        value_model=value_model, seed=a.seed, max_grad_norm=1e9, max_prompt_tokens=512, precision=a.precision,
    )
    trainer = PPOTrainer(copy.deepcopy(policy), tok, make_reward_fn(reward_model.to(a.device), tok), cfg,
                         device=a.device)
    prompts = prompts_list(a.batch_size * (a.steps + a.warmup))
    times, rewards, gen_tokens = [], [], []
    for i in range(a.warmup + a.steps):
        batch = prompts[i * a.batch_size : (i + 1) * a.batch_size]
        t0 = time.perf_counter()
        m = trainer.step(batch)
        sync(a.device)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
            rewards.append(m["reward"])
            gen_tokens.append(m["tokens"])
    return {"step_times_s": times, "reward": rewards, "masked_tokens_per_step": gen_tokens}


def run_trl(policy, tok, reward_model, a) -> dict:
    import copy

    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    prompts = prompts_list(a.batch_size * (a.steps + a.warmup))
    ids = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
        for p in prompts
    ]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    ds = Dataset.from_dict({"input_ids": ids})
    torch.manual_seed(a.seed + 2)
    value = LlamaForSequenceClassification(policy.config)
    # same start as ours: value trunk = policy trunk, zero value head
    value.model.load_state_dict(policy.model.state_dict())
    torch.nn.init.zeros_(value.score.weight)

    times: list[float] = []

    class Timer(TrainerCallback):
        """Wall time between consecutive PPO steps (the first interval starts at train begin)."""

        def __init__(self):
            self.last = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()
            return control

        def on_step_end(self, args, state, control, **kw):
            sync(a.device)
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now
            return control

    timer = Timer()
    out = tempfile.mkdtemp(prefix="trl-ppo-")
    cfg = PPOConfig(
        output_dir=out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=a.batch_size // a.mini_batch_size, num_ppo_epochs=a.ppo_epochs,
        response_length=a.response_length, temperature=1.0, learning_rate=a.lr, kl_coef=a.kl_coef,
        total_episodes=a.batch_size * (a.steps + a.warmup + 1), local_rollout_forward_batch_size=a.batch_size,
        stop_token="eos", report_to="none", save_strategy="no", num_sample_generations=0,
        use_cpu=a.device == "cpu", bf16=a.precision == "bf16", fp16=False, seed=a.seed, disable_tqdm=True,
        logging_steps=1000, max_grad_norm=1e9, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=copy.deepcopy(policy), ref_model=None, reward_model=reward_model,
        train_dataset=ds, value_model=value, eval_dataset=ds, callbacks=[timer],
    )
    trainer.train()
    return {"step_times_s": times[a.warmup : a.warmup + a.steps]}


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock step times are complete."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summarise(name: str, r: dict, a) -> dict:
    med = statistics.median(r["step_times_s"])
    r.update({"median_step_s": med, "mean_step_s": statistics.mean(r["step_times_s"]),
              "tokens_per_s": a.batch_size * a.response_length / med})
    print(f"{name:14s} median step {med:.3f}s  mean {r['mean_step_s']:.3f}s  tokens/s {r['tokens_per_s']:.1f}")
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both trainers)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both trainers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/ppo_vs_trl.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lock = "flock /tmp/metarlhf-cpu.lock " if a.device == "cpu" else ""
    command = lock + shlex.join([Path(sys.executable).relative_to(Path.cwd()).as_posix()
                                                             if Path(sys.executable).is_relative_to(Path.cwd())
                                                             else sys.executable, *sys.argv])
    print("command:", command)
    import transformers
    import trl

    from metarlhf.runtime import describe_device

    cfg, tok, policy, reward_model = build_models(a.hidden, a.layers, a.seed)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"policy: random Llama hidden={a.hidden} layers={a.layers} vocab={cfg.vocab_size} params={n_params}")
    results = {}
    results["metarlhf_head"] = summarise("metarlhf/head", run_ours(policy, tok, reward_model, a, "head"), a)
    results["metarlhf_critic"] = summarise("metarlhf/critic", run_ours(policy, tok, reward_model, a, "critic"), a)
    results["trl"] = summarise("trl", run_trl(policy, tok, reward_model, a), a)
    ratio_head = results["metarlhf_head"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    ratio_critic = results["metarlhf_critic"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"throughput ratio metarlhf/TRL: head {ratio_head:.2f}x, critic (same compute as TRL) {ratio_critic:.2f}x")
    report = {
        "command": command,
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "policy_params": n_params,
        "device": describe_device(a.device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "python": platform.python_version()},
        "results": results,
        "ratio_head_vs_trl": ratio_head,
        "ratio_critic_vs_trl": ratio_critic,
        "target_ratio": 1.5,
    }
    from metarlhf.io import atomic_write_json

    atomic_write_json(a.out, report)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

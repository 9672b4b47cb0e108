"""Regression tests of CLI / engine / PPO / policy fixes: shipped reward init found from the
package (never the working directory), safe tiny temperatures, typed errors for text a
tokenizer cannot take, base-model identity of inits and PPO checkpoints, output-path and
count validation, ``generate --policy``, ``--allow-heldout``, ``--train-layers`` bounds and
``--skip-invalid``."""

import json

import pytest
import torch

import metarlhf.models as models
from metarlhf.adapters import save_adapter
from metarlhf.cli import main
from metarlhf.engine import GenerationRequest, MultiAdapterEngine, SamplingParams, sample_token
from metarlhf.errors import ConfigError, DataError, ModelError
from metarlhf.models import DEFAULT_POLICY_NAME, model_name
from metarlhf.ppo import PPOConfig, PPOTrainer, resolve_reward, score_completions, train
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy, tiny_thumbs

PROMPTS = ["hello there", "the cat sat on", "a b c", "what is two plus two?"]


def _share_of_a(prompts, completions):
    return [c.count("a") / max(1, len(c)) for c in completions]


def _reward_init(enc_dir, path):
    """A reward init (random head) made for the tiny encoder at ``enc_dir``."""
    from metarlhf.reward import load_reward_model

    rm = load_reward_model(str(enc_dir), adapter_dir=None)
    params = {k: (torch.randn_like(v) if k == "head.weight" else v) for k, v in rm.fresh_params(0).items()}
    init = rm.make_adapter(params, {"kind": "reward_init", "inner": "head", "inner_steps": 2},
                           log_lrs={"head.weight": torch.zeros(1, rm.hidden_size), "head.bias": torch.zeros(1)})
    save_adapter(path, init)
    return path


# ------------------------------------------------------------------ 1. shipped reward init
def test_base_reward_finds_the_shipped_init_from_the_package_not_the_cwd(tmp_path, monkeypatch):
    from metarlhf.reward import load_reward_model

    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    repo_adapters = tmp_path / "repo" / "adapters"
    _reward_init(enc, repo_adapters / "meta" / "reward")
    monkeypatch.setattr(models, "REPO_ADAPTERS_DIR", repo_adapters)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no adapters/ here
    fn = resolve_reward("base", encoder_dir=str(enc))
    expected = load_reward_model(str(enc), adapter_dir=repo_adapters / "meta" / "reward").score(
        ["q", "q"], ["yes", "no"])
    got = score_completions(fn, ["q", "q"], ["yes", "no"])
    assert expected.abs().max() > 0 and torch.allclose(got, expected, atol=1e-5)


def test_base_reward_without_an_init_is_an_error_not_a_zero_reward(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "REPO_ADAPTERS_DIR", tmp_path / "no-adapters")
    with pytest.raises(ConfigError, match="pass --reward-init"):
        resolve_reward("base")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    assert main(["ppo", "--prompts", str(prompts), "--reward", "base", "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--policy", str(tmp_path / "never-loaded")]) == 2
    assert "no shipped one" in capsys.readouterr().err


def test_base_reward_with_the_shipped_init_of_another_encoder_is_refused(tmp_path):
    if not (models.shipped_init_dir("reward") / "metarlhf.json").is_file():
        pytest.skip("no shipped reward init")
    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    with pytest.raises(Exception, match="pass --reward-init"):  # never a silent zero head
        resolve_reward("base", encoder_dir=str(enc))


# ------------------------------------------------------------------ 2. engine
@pytest.mark.parametrize("t", [1e-300, 1e-45, 1e-38, 1e-30, 5e-324])
def test_sample_token_is_greedy_in_the_limit_of_tiny_temperatures(t):
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    assert sample_token(logits, t, 1.0, torch.Generator().manual_seed(0)) == 1
    assert sample_token(logits, t, 0.5, torch.Generator().manual_seed(0)) == 1


def test_sample_token_huge_temperature_is_a_valid_draw():
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    draws = {sample_token(logits, 1e300, 1.0, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws <= {0, 1, 2, 3} and len(draws) > 1


@pytest.fixture(scope="module")
def engine():
    model, tok = tiny_policy()
    return MultiAdapterEngine(model, tok, "tiny-llama")


def test_engine_generates_with_tiny_temperatures(engine):
    greedy = engine.generate_one(GenerationRequest(prompt="hello", params=SamplingParams(max_new_tokens=5)))
    for t in (1e-300, 1e-45):
        res = engine.generate_one(GenerationRequest(
            prompt="hello", params=SamplingParams(max_new_tokens=5, temperature=t, seed=1)))
        assert res.token_ids == greedy.token_ids


def test_text_the_tokenizer_cannot_take_is_a_config_error_per_request(engine):
    with pytest.raises(ConfigError, match="prompt is not valid Unicode text"):
        GenerationRequest(prompt="hi\ud800")
    with pytest.raises(ConfigError, match=r"messages\[0\].content is not valid Unicode text"):
        GenerationRequest(messages=[{"role": "user", "content": "x\udcff"}])
    ok = GenerationRequest(prompt="hello", params=SamplingParams(max_new_tokens=2))
    bad = GenerationRequest(prompt="hello", params=SamplingParams(max_new_tokens=2))
    bad.prompt = "he\ud800llo"  # mutated after validation: still refused, before the batch
    res = engine.generate([ok, bad])
    assert res[0].finish_reason != "error" and res[0].completion_tokens > 0
    assert res[1].finish_reason == "error" and isinstance(res[1].error, ConfigError)


# ------------------------------------------------------------------ 7 + 8. generate CLI
@pytest.fixture
def policy_dir(tmp_path):
    return save_tiny(*tiny_policy(), tmp_path / "pol")


def test_generate_accepts_policy_and_model_dir(policy_dir, capsys):
    assert main(["generate", "--policy", str(policy_dir), "--prompt", "abc", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--model-dir", str(policy_dir), "--prompt", "abc", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--policy", str(policy_dir), "--prompt", "abc", "--max-new-tokens", "2",
                 "--temperature", "1e-300"]) == 0


def test_generate_with_undecodable_argv_bytes_exits_2(policy_dir, capsys):
    # Python decodes the byte 0xff of argv as the lone surrogate \udcff (surrogateescape).
    assert main(["generate", "--policy", str(policy_dir), "--prompt", "hi\udcff"]) == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err and "not valid Unicode text" in err


# ------------------------------------------------------------------ 3. base identity and shapes
def _feedback(tmp_path, extra_lines=()):
    data = tmp_path / "fb.jsonl"
    lines = [json.dumps({"user_id": r.user_id, "prompt": r.prompt, "completion": r.completion, "label": r.label})
             for r in tiny_thumbs("alice")]
    data.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return data


def test_adapt_policy_init_for_another_hidden_size_exits_2_naming_both_shapes(tmp_path, capsys):
    from test_engine import make_adapter

    small = save_tiny(*tiny_policy(hidden=32), tmp_path / "a" / "pol")
    wide = save_tiny(*tiny_policy(hidden=64), tmp_path / "b" / "pol")  # same directory name
    init = make_adapter(tmp_path / "init", tiny_policy(hidden=32)[0], seed=1,
                        base=model_name(small, DEFAULT_POLICY_NAME))
    rc = main(["adapt", "policy", "--data", str(_feedback(tmp_path)), "--user", "alice", "--k", "4",
               "--out", str(tmp_path / "out"), "--init", init, "--policy", str(wide), "--steps", "1",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "metarlhf: error:" in err
    assert "(8, 32)" in err and "(8, 64)" in err


def _ppo(model_tok, steps):
    model, tok = model_tok
    cfg = PPOConfig(steps=steps, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, lora=True)
    return PPOTrainer(model, tok, _share_of_a, cfg)


def test_ppo_resume_refuses_another_base(tmp_path, caplog):
    out = tmp_path / "run"
    train(_ppo(tiny_policy(seed=1), 1), PROMPTS, out, progress=False, base_model_name="pol")
    saved = json.loads((out / "checkpoint" / "trainer.json").read_text())["base_model"]
    assert saved["name"] == "pol" and saved["hidden_size"] == 32 and saved["num_hidden_layers"] == 2
    with pytest.raises(ConfigError, match="'pol2'"):  # same shapes, another model
        train(_ppo(tiny_policy(seed=2), 2), PROMPTS, out, resume=True, progress=False, base_model_name="pol2")
    with pytest.raises(ConfigError, match="hidden_size=64"):  # same name, another architecture
        train(_ppo(tiny_policy(hidden=64), 2), PROMPTS, out, resume=True, progress=False, base_model_name="pol")
    # a checkpoint from before the base was recorded: a warning, and shapes are still checked
    state_file = out / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    del state["base_model"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ModelError, match=r"shape \(8, 32\).*\(8, 64\)"):
        train(_ppo(tiny_policy(hidden=64), 2), PROMPTS, out, resume=True, progress=False, base_model_name="pol")
    with caplog.at_level("WARNING"):
        res = train(_ppo(tiny_policy(seed=1), 2), PROMPTS, out, resume=True, progress=False, base_model_name="pol")
    assert res["steps"] == 2 and "does not record its base model" in caplog.text


# ------------------------------------------------------------------ 4. output paths, OSError
def test_ppo_out_that_is_a_file_exits_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    rew = tmp_path / "rew.py"
    rew.write_text("def f(p, c):\n    return [0.0] * len(p)\n")
    for out in (afile, afile / "sub"):
        assert main(["ppo", "--prompts", str(prompts), "--reward", f"python:{rew}:f", "--out", str(out),
                     "--device", "cpu", "--policy", str(tmp_path / "never-loaded")]) == 2
        assert "is not a directory" in capsys.readouterr().err
    assert afile.read_text() == ""


def test_cli_maps_os_errors_to_exit_2(monkeypatch, capsys):
    import metarlhf.commands.generate as gen

    def boom(args):
        raise FileExistsError(17, "File exists", "/some/out")

    monkeypatch.setattr(gen, "run", boom)
    assert main(["generate", "--prompt", "x"]) == 2
    assert "metarlhf: error: cannot use '/some/out': file exists" in capsys.readouterr().err


# ------------------------------------------------------------------ 5 + 6. eval reward counts and --out
@pytest.mark.parametrize("extra", [["--holdout", "0"], ["--holdout", "-1"], ["--users", "u.txt", "--steps", "-2"],
                                   ["--holdout", "2", "--k", "0"], ["--holdout", "2", "--seeds", "0"],
                                   ["--holdout", "2", "--query", "0"]])
def test_eval_reward_counts_are_validated_by_argparse(extra, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "reward", "--data", "d", "--out", "o.json", *extra])
    assert e.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_eval_reward_refuses_png_out_and_bad_counts_up_front(tmp_path, capsys):
    from metarlhf.evaluate_reward import evaluate_reward

    users = tmp_path / "u.txt"
    users.write_text("alice\n")
    assert main(["eval", "reward", "--data", str(tmp_path / "never-read"), "--users", str(users),
                 "--out", str(tmp_path / "ev.png")]) == 2
    assert "cannot end in .png" in capsys.readouterr().err
    for kw, msg in [({"holdout": 0}, "--holdout must be >= 1"), ({"steps": -2}, "--steps must be >= 0"),
                    ({"users": []}, "no users"), ({"holdout": 2, "out": "x.PNG"}, "cannot end in .png")]:
        kw = {"out": tmp_path / "ev.json", **kw}
        with pytest.raises(ConfigError, match=msg):
            evaluate_reward(tmp_path / "never-read", **kw)


# ------------------------------------------------------------------ suspected items
def test_meta_train_policy_refuses_heldout_users_without_the_flag(tmp_path, capsys):
    assert main(["meta-train", "policy", "--prompts", str(tmp_path / "never-read"), "--out", str(tmp_path / "o"),
                 "--users", "bullets,numbered", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "held-out user(s) numbered" in err and "--allow-heldout" in err


def test_train_layers_above_the_layer_count_is_refused(tmp_path, policy_dir, capsys):
    rc = main(["adapt", "policy", "--data", str(_feedback(tmp_path)), "--user", "alice", "--k", "4",
               "--out", str(tmp_path / "out"), "--init", "scratch", "--policy", str(policy_dir),
               "--train-layers", "9", "--steps", "1", "--device", "cpu"])
    assert rc == 2 and "only 2 decoder layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skip_invalid_skips_malformed_lines_with_a_count(tmp_path, caplog):
    from metarlhf.commands import support_records

    data = _feedback(tmp_path, extra_lines=["{not json"])
    with pytest.raises(DataError):
        support_records(str(data), "alice", 4)
    with caplog.at_level("WARNING"):
        assert len(support_records(str(data), "alice", 4, skip_invalid=True)) == 4
    assert "skipped 1 malformed line" in caplog.text


def test_skip_invalid_flag_on_adapt_policy(tmp_path, policy_dir, capsys):
    data = _feedback(tmp_path, extra_lines=["{not json"])
    common = ["adapt", "policy", "--data", str(data), "--user", "alice", "--k", "4", "--init", "scratch",
              "--policy", str(policy_dir), "--steps", "1", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    assert main([*common, "--out", str(tmp_path / "b"), "--skip-invalid"]) == 0

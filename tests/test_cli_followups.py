"""Follow-ups of the CLI review: every command that writes an adapter or a PPO run checks
its ``--out`` before any data or model is read; ``meta-train reward --skip-invalid``; one
helper for the shipped inits; PPO's ``--temperature`` validated."""

import gzip
import json
import math

import pytest
import torch
from test_reward_meta_cli import _write_personas

import metarlhf.models as models
from metarlhf.cli import main
from metarlhf.errors import ConfigError, DataError
from metarlhf.ppo import PPOConfig
from metarlhf.ppo.functional import entropy_from_logits, tempered_logits
from metarlhf.testing import save_tiny, tiny_encoder


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any policy or encoder fails the test: the command had to stop before."""

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before --out was checked")

    monkeypatch.setattr(models, "load_policy", fail)
    monkeypatch.setattr(models, "load_encoder", fail)


def _foreign_dir(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    return d


# ------------------------------------------------------------------ 1. --out checked first
def _adapter_commands(t):
    """Commands writing an adapter; their data and models do not exist (never reached)."""
    return {
        "adapt reward": ["adapt", "reward", "--data", str(t / "no-data"), "--user", "u", "--k", "1",
                         "--encoder", str(t / "no-encoder")],
        "adapt policy": ["adapt", "policy", "--data", str(t / "no-data"), "--user", "u", "--k", "1",
                         "--policy", str(t / "no-policy")],
        "meta-train reward": ["meta-train", "reward", "--data", str(t / "no-data"), "--encoder", str(t / "no-encoder")],
        "meta-train policy": ["meta-train", "policy", "--prompts", str(t / "no-prompts"),
                              "--policy", str(t / "no-policy")],
    }


@pytest.mark.parametrize("command", ["adapt reward", "adapt policy", "meta-train reward", "meta-train policy"])
def test_out_holding_other_files_is_refused_before_anything_is_read(command, tmp_path, capsys, no_model_load):
    out = _foreign_dir(tmp_path)
    argv = _adapter_commands(tmp_path)[command] + ["--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"refusing to replace {str(out)!r}" in err and "it holds other files" in err, err
    assert (out / "notes.txt").read_text() == "keep me" and [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["adapt reward", "meta-train policy"])
def test_out_that_is_a_file_or_under_one_is_refused_first(command, tmp_path, capsys, no_model_load):
    (tmp_path / "f").write_text("x")
    for out, message in [(tmp_path / "f", "it is a file"), (tmp_path / "f" / "sub", "is a file, not a directory")]:
        assert main(_adapter_commands(tmp_path)[command] + ["--out", str(out), "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err


def test_a_good_out_gets_past_the_check(tmp_path, capsys, no_model_load):
    """The same command with a free --out goes on, and stops at the missing data instead."""
    argv = _adapter_commands(tmp_path)["adapt reward"] + ["--out", str(tmp_path / "free"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no-data" in err and "refusing" not in err


@pytest.mark.parametrize(
    "layout, extra, message",
    [
        ({"adapter/notes.txt": "x"}, [], "refusing to replace '{out}/adapter'"),
        ({"checkpoint/notes.txt": "x"}, [], "refusing to replace '{out}/checkpoint'"),
        ({"curves.png/x": "x"}, [], "cannot write the file '{out}/curves.png'"),
        ({"model": "x"}, ["--full"], "refusing to replace '{out}/model': it is a file"),
    ],
)
def test_ppo_checks_what_it_will_write_in_out_first(layout, extra, message, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    for rel, text in layout.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    argv = ["ppo", "--prompts", str(tmp_path / "no-prompts"), "--reward", f"python:{tmp_path / 'no.py'}:f",
            "--policy", str(tmp_path / "no-policy"), "--device", "cpu", "--out", str(out), *extra]
    assert main(argv) == 2
    assert message.format(out=out) in capsys.readouterr().err


# ------------------------------------------------------------------ 2. --skip-invalid


def _personas(root, n_users=6, n=12):
    """test_reward_meta_cli's persona-format users, with one bad line (line 4) in user0."""
    _write_personas(root, n_users=n_users, n=n)
    with gzip.open(root / "user0.jsonl.gz", "rt") as f:
        lines = f.read().splitlines()
    lines.insert(3, "{not json")
    with gzip.open(root / "user0.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    return root


def test_user_support_skips_invalid_lines_when_asked(tmp_path, caplog):
    from metarlhf.commands import support_records
    from metarlhf.data import user_support

    data = _personas(tmp_path / "p")
    with pytest.raises(DataError, match="user0.jsonl.gz:4"):
        user_support(data, "user0", 4)
    with caplog.at_level("WARNING"):
        support = user_support(data, "user0", 4, skip_invalid=True)
    assert len(support) == 4 and "skipped 1 malformed line" in caplog.text
    assert support_records(str(data), "user0", 4, skip_invalid=True) == support  # the CLI's is the same


def test_meta_train_reward_skip_invalid(tmp_path, capsys):
    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = _personas(tmp_path / "p")
    argv = ["meta-train", "reward", "--data", str(data), "--encoder", str(enc), "--steps", "1", "--val-every", "1",
            "--holdout-test", "1", "--holdout-val", "1", "--k", "2", "--query", "4", "--meta-batch", "1",
            "--no-progress", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "user0.jsonl.gz:4" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--skip-invalid"]) == 0
    assert json.loads((tmp_path / "b" / "metarlhf.json").read_text())["kind"] == "reward_init"


# ------------------------------------------------------------------ 3. shipped inits
def test_shipped_reward_init_comes_from_the_one_helper():
    from metarlhf.reward import SHIPPED_INIT_DIR

    assert SHIPPED_INIT_DIR == models.shipped_init_dir("reward")
    assert (SHIPPED_INIT_DIR / "metarlhf.json").is_file()  # the repository's, wherever the cwd is


# ------------------------------------------------------------------ 4. PPO temperature
@pytest.mark.parametrize("t", [math.inf, -math.inf, math.nan, 0.0, -1.0])
def test_ppo_temperature_must_be_finite_and_positive(t):
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0.05"):
        PPOConfig(temperature=t)


@pytest.mark.parametrize("t", ["inf", "nan", "0"])
def test_ppo_cli_refuses_a_bad_temperature_before_loading(t, tmp_path, capsys, no_model_load):
    argv = ["ppo", "--prompts", str(tmp_path / "no-prompts"), "--reward", "python:x.py:f", "--temperature", t,
            "--policy", str(tmp_path / "no-policy"), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "temperature must be a finite number >= 0.05" in capsys.readouterr().err


TINY = [1e-300, 5e-324, 1e-45, 1e-38, 1e-30]


@pytest.mark.parametrize("t", TINY)
def test_tempered_logits_tiny_temperatures_are_the_greedy_limit(t):
    logits = torch.tensor([[1.0, 3.0, 2.5, -1.0], [50.0, -50.0, 0.0, 49.0]], requires_grad=True)
    logp = torch.log_softmax(tempered_logits(logits, t), dim=-1)
    assert not logp.isnan().any()
    assert logp[0, 1] == 0 and logp[1, 0] == 0  # all the mass on the argmax
    assert entropy_from_logits(tempered_logits(logits, t)).tolist() == [0.0, 0.0]
    (logp[0, 1] + logp[1, 0]).backward()
    assert torch.isfinite(logits.grad).all()


def test_tempered_logits_is_logits_over_temperature_up_to_a_shift():
    logits = torch.randn(3, 7) * 5
    for t in (0.7, 1.0, 2.0):
        assert torch.allclose(torch.log_softmax(tempered_logits(logits, t), -1), torch.log_softmax(logits / t, -1),
                              atol=1e-5)


@pytest.mark.parametrize("t", [1e-45, 1e-30, 0.01])
def test_ppo_refuses_near_greedy_temperatures(t):
    # near 0 the sampled policy is greedy and the KL to the reference blows up once their
    # top tokens differ (about 1/t after a few updates), so PPO refuses such temperatures
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0.05"):
        PPOConfig(temperature=t)
    PPOConfig(temperature=0.05)


# ------------------------------------------------------------------ ppo --out holds only a PPO run's files
def test_ppo_out_with_foreign_files_is_refused_and_an_earlier_run_is_not(tmp_path):
    from dataclasses import asdict

    from metarlhf.ppo.trainer import check_out_dir

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "metrics.jsonl").write_text("my data\n")
    (thesis / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="thesis.tex"):
        check_out_dir(thesis, lora=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"name": "not ppo"}))
    with pytest.raises(ConfigError, match="not a PPO run's config"):
        check_out_dir(other, lora=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(PPOConfig())))
    (run / "metrics.jsonl").write_text("{}\n")
    assert check_out_dir(run, lora=True) == run
    assert (thesis / "metrics.jsonl").read_text() == "my data\n"

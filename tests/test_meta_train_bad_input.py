"""Bad input to ``meta-train policy`` / ``meta-train reward``: exit 2 with a clear message,
before any model is loaded where that is possible, and nothing already stored is lost."""

import gzip
import json
import math
import random
import shutil

import pytest

from metarlhf import policy as P
from metarlhf.cli import main
from metarlhf.errors import ConfigError
from metarlhf.meta import MetaTrainConfig
from metarlhf.simusers import get_users
from metarlhf.testing import save_tiny, tiny_encoder, tiny_policy


def _snapshot(root):
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: the checks under test must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    import metarlhf.commands.policy as cp
    import metarlhf.reward as R

    monkeypatch.setattr(cp, "_base", refuse)
    monkeypatch.setattr(R, "load_reward_model", refuse)


# ------------------------------------------------------------------ meta-train policy

POLICY_ARGS = ["--meta-steps", "1", "--inner-steps", "1", "--pool-prompts", "2", "--support-prompts", "1",
               "--query-prompts", "1", "--max-new-tokens", "2", "--checkpoint-every", "1", "--device", "cpu",
               "--users", "bullets"]


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """A tiny policy dir, a prompts file, and the work dir of one finished run (to copy)."""
    root = tmp_path_factory.mktemp("policy")
    tiny = save_tiny(*tiny_policy(), root / "tiny")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"question {i}?\n" for i in range(4)))
    work = root / "work"
    assert main(["meta-train", "policy", "--prompts", str(prompts), "--out", str(root / "init"),
                 "--work", str(work), "--policy", str(tiny), *POLICY_ARGS]) == 0
    assert (work / "pool.jsonl").is_file() and (work / "checkpoint" / "params.safetensors").is_file()
    return root, tiny, prompts, work


def _policy(root, tiny, prompts, work, *extra, out=None):
    return main(["meta-train", "policy", "--prompts", str(prompts), "--out", str(out or root / "o"),
                 "--work", str(work), "--policy", str(tiny), *POLICY_ARGS, *extra])


def _copy_work(policy_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(policy_run[3], work)
    return work


@pytest.mark.parametrize("foreign", ["tasks/notes.txt", "notes.txt", "checkpoint/notes.txt"])
def test_policy_work_dir_with_foreign_files_is_refused_before_the_model_loads(policy_run, tmp_path, capsys,
                                                                            monkeypatch, foreign):
    root, tiny, prompts, _ = policy_run
    work = tmp_path / "myproj"
    (work / foreign).parent.mkdir(parents=True, exist_ok=True)
    (work / foreign).write_text("precious\n")
    (work / "metrics.jsonl").write_text("my own metrics\n")
    before = _snapshot(work)
    _no_model_load(monkeypatch)
    assert _policy(root, tiny, prompts, work, out=tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err and "myproj" in err
    assert _snapshot(work) == before and not (tmp_path / "o").exists()


def test_policy_library_refuses_a_foreign_work_dir(tmp_path):
    work = tmp_path / "myproj"
    (work / "tasks").mkdir(parents=True)
    (work / "tasks" / "notes.txt").write_text("precious\n")
    with pytest.raises(ConfigError, match="myproj"):
        P.meta_train_policy(["a", "b"], get_users(["bullets"]), tmp_path / "o", work=work,
                            config=P.MetaConfig(meta_steps=1, pool_prompts=2, support_prompts=1, query_prompts=1),
                            base=tiny_policy(), progress=False)
    assert (work / "tasks" / "notes.txt").read_text() == "precious\n"


def test_policy_work_dir_nested_with_out_is_refused(policy_run, tmp_path, monkeypatch):
    root, tiny, prompts, _ = policy_run
    _no_model_load(monkeypatch)
    assert _policy(root, tiny, prompts, tmp_path / "o", out=tmp_path / "o") == 2
    assert _policy(root, tiny, prompts, tmp_path / "o" / "work", out=tmp_path / "o") == 2
    assert _policy(root, tiny, prompts, tmp_path / "w", out=tmp_path / "w" / "init") == 2
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_policy_work_dir_of_an_earlier_run_is_accepted(policy_run, tmp_path):
    root, tiny, prompts, _ = policy_run
    work = _copy_work(policy_run, tmp_path)
    assert _policy(root, tiny, prompts, work, "--resume", "--meta-steps", "2", out=tmp_path / "o") == 0
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_policy_resume_on_other_prompts_is_refused_before_the_model_loads(policy_run, tmp_path, capsys, monkeypatch):
    root, tiny, prompts, _ = policy_run
    work = _copy_work(policy_run, tmp_path)
    before = _snapshot(work)
    _no_model_load(monkeypatch)
    assert _policy(root, tiny, prompts, work, "--resume", "--meta-steps", "2", "--offset", "1",
                   out=tmp_path / "o") == 2
    assert "other prompts" in capsys.readouterr().err
    assert _snapshot(work) == before and not (tmp_path / "o").exists()
    init = json.loads((root / "init" / "metarlhf.json").read_text())
    assert init["source"] == {"prompts": str(prompts), "offset": 0} and len(init["prompt_digests"]) == 2


def test_policy_corrupted_pool_is_a_data_error_and_kept(policy_run, tmp_path, capsys):
    root, tiny, prompts, _ = policy_run
    work = _copy_work(policy_run, tmp_path)
    pool = work / "pool.jsonl"
    pool.write_text(pool.read_text().splitlines()[0] + "\n{not json\n")
    before = _snapshot(work)
    assert _policy(root, tiny, prompts, work, out=tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err and "pool.jsonl" in err
    assert _snapshot(work) == before
    pool.write_text("[]\n")  # valid JSON, not a pool entry
    assert _policy(root, tiny, prompts, work, out=tmp_path / "o") == 2
    assert "pool.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [
    ("checkpoint/params.safetensors", "truncate"),
    ("checkpoint/state.json", b"{\"step\": "),
    ("checkpoint/state.json", b"[]"),
    ("checkpoint/state.json", b"{\"step\": \"x\", \"algo\": \"reptile\"}"),
    ("metrics.jsonl", b"{oops\n"),
])
def test_policy_resume_from_corrupted_checkpoint_is_refused_and_kept(policy_run, tmp_path, capsys, bad):
    root, tiny, prompts, _ = policy_run
    work = _copy_work(policy_run, tmp_path)
    name, data = bad
    path = work / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if data == "truncate" else data)
    before = _snapshot(work)
    assert _policy(root, tiny, prompts, work, "--resume", "--meta-steps", "2", out=tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err and path.name in err
    assert _snapshot(work) == before and not (tmp_path / "o").exists()


def test_policy_too_few_prompts_is_refused_before_the_model_loads(policy_run, tmp_path, capsys, monkeypatch):
    root, tiny, prompts, _ = policy_run
    _no_model_load(monkeypatch)
    assert _policy(root, tiny, prompts, tmp_path / "w", "--pool-prompts", "9", out=tmp_path / "o") == 2
    assert "pool_prompts" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("opt", [("--outer-lr", "inf"), ("--outer-lr", "nan"), ("--outer-lr", "-1"),
                                 ("--lr", "nan"), ("--lr", "0"), ("--reptile-eps", "nan")])
def test_policy_bad_rates_are_refused_before_the_model_loads(policy_run, tmp_path, capsys, monkeypatch, opt):
    root, tiny, prompts, _ = policy_run
    _no_model_load(monkeypatch)
    assert _policy(root, tiny, prompts, tmp_path / "w", *opt, out=tmp_path / "o") == 2
    assert "metarlhf: error:" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{"outer_lr": math.inf}, {"sample_temperature": 0.0},
                                {"sample_temperature": math.nan}, {"sample_temperature": -1.0}])
def test_policy_meta_config_rejects_non_finite_and_non_positive(kw):
    with pytest.raises(ConfigError):
        P.MetaConfig(**kw)


# ------------------------------------------------------------------ meta-train reward


def _write_personas(root, n_users=6, n=12, seed=0):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["cats", "dogs", "rain", "tea", "chess", "art"]
    for u in range(n_users):
        liked = set(rng.sample(words, 3))
        lines = []
        for i in range(n):
            yes = i % 2 == 0
            st = f"I like {rng.choice(sorted(liked) if yes else sorted(set(words) - liked))}"
            lines.append(json.dumps({"question": f'Is the following statement something you would say?\n"{st}"',
                                     "statement": st, "answer_matching_behavior": " Yes" if yes else " No",
                                     "answer_not_matching_behavior": " No" if yes else " Yes"}))
        with gzip.open(root / f"user{u}.jsonl.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    return root


REWARD_ARGS = ["--steps", "1", "--val-every", "1", "--ckpt-every", "1", "--holdout-test", "1", "--holdout-val", "1",
               "--k", "4", "--query", "4", "--meta-batch", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A tiny encoder dir, persona data, and the checkpoint dir of one finished run (to copy)."""
    root = tmp_path_factory.mktemp("reward")
    enc = save_tiny(*tiny_encoder(), root / "enc")
    data = _write_personas(root / "personas")
    ckpt = root / "ckpt"
    assert main(["meta-train", "reward", "--data", str(data), "--out", str(root / "init"), "--encoder", str(enc),
                 "--checkpoint-dir", str(ckpt), *REWARD_ARGS]) == 0
    assert (ckpt / "state.json").is_file() and (ckpt / "state.safetensors").is_file()
    return root, enc, data, ckpt


def _reward(reward_run, out, ckpt, *extra):
    _, enc, data, _ = reward_run
    return main(["meta-train", "reward", "--data", str(data), "--out", str(out), "--encoder", str(enc),
                 "--checkpoint-dir", str(ckpt), *REWARD_ARGS, *extra])


def test_reward_checkpoint_dir_with_foreign_files_is_refused_before_the_model_loads(reward_run, tmp_path, capsys,
                                                                                  monkeypatch):
    ckpt = tmp_path / "myproj"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("precious\n")
    (ckpt / "state.json").write_text('{"mine": true}\n')
    (ckpt / "metrics.jsonl").write_text("my own metrics\n")
    before = _snapshot(ckpt)
    _no_model_load(monkeypatch)
    assert _reward(reward_run, tmp_path / "o", ckpt) == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err and "myproj" in err
    assert _snapshot(ckpt) == before and not (tmp_path / "o").exists()


def test_reward_checkpoint_dir_nested_with_out_is_refused(reward_run, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    assert _reward(reward_run, tmp_path / "o", tmp_path / "o") == 2
    assert _reward(reward_run, tmp_path / "o", tmp_path / "o" / "ckpt") == 2
    assert not (tmp_path / "o").exists()


def test_reward_checkpoint_dir_of_an_earlier_run_is_accepted(reward_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reward_run[3], ckpt)
    assert _reward(reward_run, tmp_path / "o", ckpt, "--resume", "--steps", "2") == 0
    assert json.loads((tmp_path / "o" / "metarlhf.json").read_text())["steps"] == 2


def test_reward_resume_on_changed_data_is_refused_and_kept(reward_run, tmp_path, capsys):
    root, enc, data, _ = reward_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reward_run[3], ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert len(state["data_sha256"]) == 64
    other = _write_personas(tmp_path / "personas", seed=1)  # the same users, other records
    before = _snapshot(ckpt)
    assert main(["meta-train", "reward", "--data", str(other), "--out", str(tmp_path / "o"), "--encoder", str(enc),
                 "--checkpoint-dir", str(ckpt), *REWARD_ARGS, "--resume", "--steps", "2"]) == 2
    assert "other records" in capsys.readouterr().err
    (other / "user5.jsonl.gz").unlink()  # one user fewer: another split
    assert main(["meta-train", "reward", "--data", str(other), "--out", str(tmp_path / "o"), "--encoder", str(enc),
                 "--checkpoint-dir", str(ckpt), *REWARD_ARGS, "--resume", "--steps", "2"]) == 2
    assert "split" in capsys.readouterr().err
    assert _snapshot(ckpt) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [
    ("state.safetensors", "truncate"),
    ("state.json", b"{\"step\": "),
    ("state.json", b"[]"),
    ("state.json", b"{\"step\": 1}"),
])
def test_reward_resume_from_corrupted_checkpoint_is_refused_and_kept(reward_run, tmp_path, capsys, bad):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reward_run[3], ckpt)
    name, data = bad
    path = ckpt / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if data == "truncate" else data)
    before = _snapshot(ckpt)
    assert _reward(reward_run, tmp_path / "o", ckpt, "--resume", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "metarlhf: error:" in err and name in err
    assert _snapshot(ckpt) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("opt", [("--inner-lr-head", "0"), ("--inner-lr-head", "-1"), ("--inner-lr-bias", "nan"),
                                 ("--meta-lr", "-1"), ("--meta-lr", "nan"), ("--meta-lr", "inf"),
                                 ("--inner-lr-z", "0"), ("--max-seconds", "-1"), ("--max-seconds", "nan"),
                                 ("--inner-lr-r", "nan"), ("--resid-l2", "inf")])
def test_reward_bad_rates_are_refused_before_the_model_loads(reward_run, tmp_path, capsys, monkeypatch, opt):
    _no_model_load(monkeypatch)
    assert _reward(reward_run, tmp_path / "o", tmp_path / "ckpt", *opt) == 2
    assert "metarlhf: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("kw", [{"inner_lr_head": 0.0}, {"inner_lr_bias": -1.0}, {"inner_lr_lora": math.nan},
                                {"inner_lr_z": math.inf}, {"meta_lr": -1.0}, {"meta_lr": math.nan},
                                {"lr_meta_lr": 0.0}, {"inner_lr_r": -0.5}, {"inner_lr_r": math.nan},
                                {"resid_l2": math.inf}, {"max_seconds": -1.0}, {"max_seconds": math.nan}])
def test_meta_train_config_rejects_bad_rates(kw):
    with pytest.raises(ConfigError):
        MetaTrainConfig(**kw)


def test_meta_train_config_accepts_the_edges():
    MetaTrainConfig(inner_lr_r=0.0, max_seconds=0.0)  # no residual; stop before any step (checkpoint only)
    MetaTrainConfig(inner="subspace", inner_lr_r=0.5, max_seconds=None)


def test_old_policy_checkpoints_resume_and_are_checked_through_their_pool(policy_run, tmp_path, capsys):
    """A checkpoint written before prompts_sha256 / users were recorded still resumes on the
    same prompts, and is refused on others (its pool.jsonl tells)."""
    root, tiny, prompts, _ = policy_run
    work = _copy_work(policy_run, tmp_path)
    state_file = work / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["prompts_sha256"], state["users"]
    state_file.write_text(json.dumps(state))
    assert _policy(root, tiny, prompts, work, "--resume", "--meta-steps", "2", "--offset", "1",
                   out=tmp_path / "o") == 2
    assert "pool.jsonl differs" in capsys.readouterr().err
    assert _policy(root, tiny, prompts, work, "--resume", "--meta-steps", "2", out=tmp_path / "o") == 0


def test_old_reward_checkpoints_without_a_data_digest_resume(reward_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reward_run[3], ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    del state["data_sha256"]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert _reward(reward_run, tmp_path / "o", ckpt, "--resume", "--steps", "2") == 0

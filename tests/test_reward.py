"""Reward model: losses, batched scoring, adaptation, adapter format and bad input."""

import json
import math

import pytest
import torch
from test_reward_meta_cli import _write_personas

from metarlhf.adapters import load_adapter, save_adapter
from metarlhf.cli import main
from metarlhf.data import Pair, Thumbs
from metarlhf.errors import AdapterError, DataError
from metarlhf.reward import (
    RewardModel,
    adapt_reward,
    bradley_terry_loss,
    load_reward_model,
    logistic_loss,
    records_accuracy,
    records_auc,
    records_loss,
)
from metarlhf.testing import save_tiny, tiny_encoder


def test_losses_match_hand_computed_values():
    s = torch.tensor([0.0, 2.0])
    y = torch.tensor([1.0, 0.0])
    ref = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert logistic_loss(s, y).item() == pytest.approx(ref, abs=1e-6)
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    ref = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 2
    assert bradley_terry_loss(c, r).item() == pytest.approx(ref, abs=1e-6)


@pytest.fixture
def model():
    enc, tok = tiny_encoder()
    return RewardModel(enc, tok, "tiny")


def _recs():
    return [Thumbs("u", "Do you like it?", f"I like {w}", 1) for w in ("cats", "tea", "chess", "art")] + [
        Thumbs("u", "Do you like it?", f"I hate {w}", 0) for w in ("cats", "tea", "chess", "art")]


def test_mixed_records_loss_and_accuracy(model):
    recs = _recs()[:2] + [Pair("u", "q", "good answer", "bad answer")]
    enc = model.encode_records(recs)
    assert len(enc.ids) == 4 and enc.n_records == 3
    scores = torch.tensor([1.0, -1.0, 2.0, 0.5])
    ref = (2 * logistic_loss(scores[:2], torch.tensor([1.0, 1.0])) + bradley_terry_loss(scores[2:3], scores[3:4])) / 3
    assert records_loss(scores, enc).item() == pytest.approx(ref.item())
    assert records_accuracy(scores, enc) == pytest.approx(2 / 3)


def test_score_and_embed_are_batched_and_consistent(model):
    ps = ["p"] * 5
    cs = [f"completion number {i}" * (i + 1) for i in range(5)]
    with torch.no_grad():
        model.head.weight.normal_()
    s1, s2 = model.score(ps, cs, batch_size=2), model.score(ps, cs, batch_size=32)
    assert s1.shape == (5,) and not s1.requires_grad
    assert torch.allclose(s1, s2, atol=1e-5)
    e = model.embed(ps, cs)
    assert e.shape == (5, model.hidden_size)
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(model.head_scores(dict(model.named_parameters()), e), s1, atol=1e-5)


def test_long_inputs_are_truncated(model):
    ids = model.encode_texts(["word " * 500], ["other " * 500])[0]
    assert len(ids) <= model.config.max_length


def _init_dir(model, tmp_path, lr=10.0):
    params = model.adapter_params()
    log_lrs = {"head.weight": torch.full_like(params["head.weight"], math.log(lr)),
               "head.bias": torch.zeros_like(params["head.bias"])}  # bias lr 1
    a = model.make_adapter(params, {"kind": "reward_init", "inner": "head", "inner_steps": 3}, log_lrs=log_lrs)
    return save_adapter(tmp_path / "init", a)


def test_adapt_reward_fits_records_and_does_not_touch_shared_model(model, tmp_path):
    init = _init_dir(model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = _recs()
    ad = adapt_reward(recs, init=init, encoder=model, steps=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ad.meta["kind"] == "reward" and ad.meta["k"] == 8 and ad.meta["steps"] == 10
    assert ad.meta["final_loss"] < ad.meta["losses"][0] - 0.05
    assert "head.weight" in ad.tensors and any(k.endswith("lora_A.weight") for k in ad.tensors)
    # the adapter's scores separate this user's ups from downs
    m2 = RewardModel(*tiny_encoder(), "tiny")
    m2.set_params(m2.params_from_tensors(ad.tensors, "x"))
    scores = m2.score([r.prompt for r in recs], [r.completion for r in recs])
    assert records_accuracy(scores, m2.encode_records(recs)) == 1.0
    # scratch: LoRA and head both move, same step budget
    sc = adapt_reward(recs, init="scratch", encoder=model, steps=3)
    assert sc.meta["init"] == "scratch" and sc.meta["steps"] == 3
    b = next(k for k in sc.tensors if k.endswith("lora_B.weight"))
    assert sc.tensors[b].abs().sum() > 0 and sc.tensors["head.weight"].abs().sum() > 0


def test_pairs_are_learned_with_bradley_terry(model, tmp_path):
    init = _init_dir(model, tmp_path, lr=10.0)
    recs = [Pair("u", "q", f"polite answer {i}", f"rude answer {i}") for i in range(4)]
    ad = adapt_reward(recs, init=init, encoder=model, steps=5)
    assert ad.meta["final_loss"] < math.log(2) - 0.05


def test_saved_adapter_loads_with_load_reward_model(model, tmp_path):
    enc_dir = save_tiny(*tiny_encoder(), tmp_path / "enc")
    m = load_reward_model(enc_dir, adapter_dir=None)
    init = _init_dir(m, tmp_path)
    ad = adapt_reward(_recs(), init=init, encoder=m)
    save_adapter(tmp_path / "user", ad)
    loaded = load_adapter(tmp_path / "user", expect_kind="reward")
    assert loaded.config["r"] == 8 and loaded.config["peft_type"] == "LORA"
    m2 = load_reward_model(enc_dir, adapter_dir=tmp_path / "user")
    m.set_params(m.params_from_tensors(ad.tensors, "x"))
    recs = _recs()
    ps, cs = [r.prompt for r in recs], [r.completion for r in recs]
    assert torch.allclose(m.score(ps, cs), m2.score(ps, cs), atol=1e-5)


def test_decoder_model_works_as_reward_encoder(tmp_path):
    """A local causal-LM directory (Llama naming) replaces MiniLM without flags: the LoRA
    goes on q_proj / v_proj, and adaptation fits the records."""
    from metarlhf.reward import RewardConfig, resolve_targets
    from metarlhf.testing import tiny_policy

    pol, tok = tiny_policy()
    enc_dir = save_tiny(pol, tok, tmp_path / "dec")
    m = load_reward_model(enc_dir, adapter_dir=None)
    assert sorted(m.config.target_modules) == ["q_proj", "v_proj"]
    recs = _recs()
    ad = adapt_reward(recs, init="scratch", encoder=m, steps=30)
    assert sorted(ad.config["target_modules"]) == ["q_proj", "v_proj"]
    assert ad.meta["final_loss"] < ad.meta["losses"][0] - 0.05
    # explicit targets the encoder lacks are an error, not silently swapped
    from metarlhf.errors import ModelError

    with pytest.raises(ModelError, match="no Linear modules named"):
        resolve_targets(RewardConfig(target_modules=["key"]), pol)


def test_adapter_for_another_encoder_is_refused(model, tmp_path):
    init = _init_dir(model, tmp_path)
    other = RewardModel(*tiny_encoder(hidden=64), "tiny")  # same name, other shape
    with pytest.raises(AdapterError, match="shape"):
        adapt_reward(_recs(), init=init, encoder=other)
    with pytest.raises(DataError):
        adapt_reward([], init=init, encoder=model)
    with pytest.raises(AdapterError, match="no reward init"):
        adapt_reward(_recs(), init=tmp_path / "nope", encoder=model)


# ---------------------------------------------------------------- CLI bad input


@pytest.fixture
def cli_env(tmp_path):
    enc = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = _write_personas(tmp_path / "personas", n_users=3, n=12)
    m = load_reward_model(enc, adapter_dir=None)
    init = _init_dir(m, tmp_path)
    return tmp_path, enc, data, init


def _no_partial(tmp_path, name):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}")]


def _err(capsys):
    return capsys.readouterr().err


def test_cli_bad_inputs_exit_2_without_output(cli_env, capsys):
    tmp, enc, data, init = cli_env
    base = ["--encoder", str(enc), "--init", str(init)]
    # malformed data
    bad = tmp / "bad.jsonl"
    bad.write_text('{"user_id": "u", "prompt": "p", "completion": "c", "label": 1}\nnot json\n')
    assert main(["adapt", "reward", "--data", str(bad), "--user", "u", "--k", "1", "--out", str(tmp / "o"), *base]) == 2
    assert "bad.jsonl:2" in _err(capsys)
    _no_partial(tmp, "o")
    # user with no records
    assert main(["adapt", "reward", "--data", str(data), "--user", "ghost", "--k", "2", "--out", str(tmp / "o"),
                 *base]) == 2
    assert "no records" in _err(capsys)
    # K larger than the user has
    assert main(["adapt", "reward", "--data", str(data), "--user", "user0", "--k", "99", "--out", str(tmp / "o"),
                 *base]) == 2
    assert "K=99" in _err(capsys)
    _no_partial(tmp, "o")
    assert main(["eval", "reward", "--data", str(data), "--holdout", "1", "--k", "50", "--out",
                 str(tmp / "r" / "res.json"), *base]) == 2
    assert "K=50" in _err(capsys)
    assert not (tmp / "r" / "res.json").exists()
    # unknown algorithm (argparse: exit 2)
    with pytest.raises(SystemExit) as e:
        main(["meta-train", "reward", "--data", str(data), "--out", str(tmp / "m"), "--algo", "adam"])
    assert e.value.code == 2
    _no_partial(tmp, "m")
    # missing model directory
    assert main(["adapt", "reward", "--data", str(data), "--user", "user0", "--k", "2", "--out", str(tmp / "o"),
                 "--encoder", str(tmp / "missing"), "--init", str(init)]) == 2
    assert "does not exist" in _err(capsys)
    # incompatible model directory (another hidden size): the init does not fit it
    other = save_tiny(*tiny_encoder(hidden=64), tmp / "other" / "enc")  # same name, other shape
    assert main(["adapt", "reward", "--data", str(data), "--user", "user0", "--k", "2", "--out", str(tmp / "o"),
                 "--encoder", str(other), "--init", str(init)]) == 2
    assert "shape" in _err(capsys)
    # a directory that is not a model
    (tmp / "notamodel").mkdir()
    assert main(["meta-train", "reward", "--data", str(data), "--out", str(tmp / "m"), "--encoder",
                 str(tmp / "notamodel"), "--holdout-test", "1", "--holdout-val", "0", "--k", "4", "--no-progress"]) == 2
    assert "config.json" in _err(capsys)
    _no_partial(tmp, "o")
    _no_partial(tmp, "m")


def test_cli_adapt_writes_peft_adapter(cli_env, capsys):
    tmp, enc, data, init = cli_env
    assert main(["adapt", "reward", "--data", str(data), "--user", "user1", "--k", "4", "--out", str(tmp / "o"),
                 "--encoder", str(enc), "--init", str(init)]) == 0
    cfg = json.loads((tmp / "o" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["query", "value"]
    meta = json.loads((tmp / "o" / "metarlhf.json").read_text())
    assert {"base_model", "init", "k", "steps", "final_loss"} <= set(meta) and meta["k"] == 4


def test_constant_accuracy_is_the_majority_thumbs_label_and_never_ranks_a_pair():
    from metarlhf.evaluate_reward import constant_accuracy

    up, down = Thumbs("u", "p", "c", 1), Thumbs("u", "p", "c", 0)
    pair = Pair("u", "p", "a", "b")
    assert constant_accuracy([down, down, down, up]) == 0.75
    assert constant_accuracy([up, up, down]) == pytest.approx(2 / 3)
    assert constant_accuracy([up, down, pair, pair]) == 0.25
    assert constant_accuracy([]) == 0.0


def test_records_auc_orders_records_whatever_the_offset():
    from metarlhf.reward import EncodedRecords

    thumbs = EncodedRecords([[1]] * 4, torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                            torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    ordered = torch.tensor([3.0, 1.0, 2.0, 0.0])  # both ups above both downs
    assert records_auc(ordered, thumbs) == 1.0 and records_auc(ordered - 10, thumbs) == 1.0
    assert records_accuracy(ordered - 10, thumbs) == 0.5  # the offset fools accuracy, not the AUC
    assert records_auc(torch.tensor([2.5, 2.0, 0.0, 3.0]), thumbs) == 0.25  # 1 of the 4 (up, down) pairs
    assert records_auc(torch.zeros(4), thumbs) == 0.5  # a constant: every pair a tie
    one_label = thumbs.subset(thumbs=torch.tensor([0, 2]))
    assert records_auc(ordered, one_label) is None
    mixed = EncodedRecords([[1]] * 4, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), torch.tensor([2]),
                           torch.tensor([3]))
    # thumbs part 1.0 (2 records), pair part 0.0 (1 record): weighted by record counts
    assert records_auc(torch.tensor([1.0, 0.0, 0.0, 1.0]), mixed) == pytest.approx(2 / 3)
    assert records_auc(torch.tensor([1.0, 0.0, 0.5, 0.5]), mixed) == pytest.approx((2 * 1.0 + 0.5) / 3)  # tied pair
    ups_only_and_a_pair = mixed.subset(thumbs=torch.tensor([0]))  # one label: the pair alone decides
    assert records_auc(torch.tensor([1.0, 0.0, 2.0, 1.0]), ups_only_and_a_pair) == 1.0
    # ties among thumbs: average ranks, as the brute-force count over (up, down) pairs gives
    g = torch.Generator().manual_seed(0)
    many = EncodedRecords([[1]] * 40, torch.arange(40), (torch.rand(40, generator=g) > 0.6).float(),
                          torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    sc = torch.randint(0, 5, (40,), generator=g).float()
    lab = many.thumb_labels > 0.5
    d = sc[lab][:, None] - sc[~lab][None, :]
    assert records_auc(sc, many) == pytest.approx(((d > 0).float() + 0.5 * (d == 0).float()).mean().item())

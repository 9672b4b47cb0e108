"""The reward model's commands on a chosen device: CPU plumbing here, CUDA under ``gpu``."""

import json

import pytest
import torch
from test_reward_meta_cli import _write_personas

from metarlhf.adapters import load_adapter
from metarlhf.cli import main
from metarlhf.data import Pair, Thumbs
from metarlhf.evaluate_reward import pair_features
from metarlhf.reward import RewardModel, records_accuracy, records_loss
from metarlhf.testing import save_tiny, tiny_encoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def setup(tmp_path):
    enc_dir = save_tiny(*tiny_encoder(), tmp_path / "enc")
    data = _write_personas(tmp_path / "personas")
    return tmp_path, enc_dir, data


def _meta_train(enc, data, out, *extra):
    return main(["meta-train", "reward", "--data", str(data), "--out", str(out), "--encoder", str(enc),
                 "--steps", "4", "--val-every", "2", "--ckpt-every", "2", "--holdout-test", "2",
                 "--holdout-val", "2", "--k", "4", "--query", "8", "--meta-batch", "2", "--no-progress", *extra])


def _records():
    return [Thumbs("u", "p", "good", 1), Thumbs("u", "p", "bad", 0), Pair("u", "p", "good", "bad")]


def test_losses_and_features_follow_the_scores_device():
    """Labels are built on the CPU with the records; the losses move them to the scores' device."""
    enc, tok = tiny_encoder()
    model = RewardModel(enc, tok, "tiny")
    er = model.encode_records(_records())
    scores = torch.tensor([2.0, -1.0])
    cpu_loss = records_loss(scores, er)
    assert records_accuracy(scores, er) == 1.0
    on_meta = records_loss(scores.to("meta"), er)  # no device mismatch: labels follow the scores
    assert on_meta.device.type == "meta" and on_meta.shape == cpu_loss.shape
    x, y = pair_features(torch.zeros(2, 4, device="meta"), er)
    assert x.device.type == "meta" and y.device.type == "meta" and x.shape == (4, 4) and y.shape == (4,)


def test_cli_refuses_an_absent_device_before_reading_anything(setup, capsys):
    tmp, enc, data = setup
    absent = "cuda:99" if torch.cuda.is_available() else "cuda"
    missing = tmp / "no-such-data"
    assert _meta_train(enc, missing, tmp / "init", "--device", absent) == 2
    assert f"'{absent}' is not available" in capsys.readouterr().err
    assert not (tmp / "init").exists() and not (tmp / "init.ckpt").exists()
    assert main(["adapt", "reward", "--data", str(missing), "--user", "u", "--k", "4", "--out", str(tmp / "a"),
                 "--device", absent]) == 2
    assert "is not available" in capsys.readouterr().err and not (tmp / "a").exists()
    assert main(["eval", "reward", "--data", str(missing), "--holdout", "2", "--out", str(tmp / "r.json"),
                 "--device", "tpu"]) == 2
    assert "invalid device 'tpu'" in capsys.readouterr().err and not (tmp / "r.json").exists()


def test_cli_on_an_explicit_cpu_device(setup, capsys):
    tmp, enc, data = setup
    init = tmp / "init"
    assert _meta_train(enc, data, init, "--device", "cpu", "--inner", "subspace", "--basis-rank", "3",
                       "--inner-lr-r", "1") == 0
    user = json.loads((init / "split.json").read_text())["test"][0]
    assert main(["adapt", "reward", "--data", str(data), "--user", user, "--k", "8", "--out", str(tmp / "a"),
                 "--init", str(init), "--encoder", str(enc), "--device", "cpu"]) == 0
    res = tmp / "res.json"
    assert main(["eval", "reward", "--data", str(data), "--holdout", "2", "--k", "4", "--out", str(res),
                 "--init", str(init), "--encoder", str(enc), "--seeds", "1", "--query", "10", "--device", "cpu"]) == 0
    assert json.loads((tmp / "res.detail.json").read_text())["device"] == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_reward_meta_train_adapt_eval_on_cuda_match_cpu(setup):
    """The same run on CUDA and on the CPU: same steps, close numbers, CPU tensors on disk."""
    tmp, enc, data = setup
    extra = ("--inner", "subspace", "--basis-rank", "3", "--inner-lr-r", "1", "--algo", "metasgd")
    for dev in ("cpu", "cuda"):
        assert _meta_train(enc, data, tmp / f"init_{dev}", "--device", dev, *extra) == 0
    # resume on CUDA reads the checkpoint (Adam state included) onto the device
    assert _meta_train(enc, data, tmp / "init_cuda", "--device", "cuda", "--resume", "--steps", "6", *extra) == 0
    cpu_t = load_adapter(tmp / "init_cpu").tensors
    assert json.loads((tmp / "init_cuda" / "metarlhf.json").read_text())["steps"] == 6
    user = json.loads((tmp / "init_cpu" / "split.json").read_text())["test"][0]
    outs = {}
    for dev in ("cpu", "cuda"):
        assert main(["adapt", "reward", "--data", str(data), "--user", user, "--k", "8", "--out", str(tmp / f"a_{dev}"),
                     "--init", str(tmp / "init_cpu"), "--encoder", str(enc), "--device", dev]) == 0
        outs[dev] = load_adapter(tmp / f"a_{dev}")
    assert outs["cuda"].meta["losses"] == pytest.approx(outs["cpu"].meta["losses"], rel=1e-3, abs=1e-4)
    for k, t in outs["cuda"].tensors.items():
        assert t.device.type == "cpu"
        torch.testing.assert_close(t, outs["cpu"].tensors[k], rtol=1e-3, atol=1e-4)
    assert set(cpu_t) == set(load_adapter(tmp / "init_cuda").tensors)
    for dev in ("cpu", "cuda"):
        assert main(["eval", "reward", "--data", str(data), "--holdout", "2", "--k", "4", "8",
                     "--out", str(tmp / f"r_{dev}.json"), "--init", str(tmp / "init_cpu"), "--encoder", str(enc),
                     "--seeds", "1", "--query", "10", "--device", dev]) == 0
    r = {dev: json.loads((tmp / f"r_{dev}.json").read_text())["methods"] for dev in ("cpu", "cuda")}
    for m in ("base", "linear", "meta"):  # scratch's Adam may flip a borderline record; the others are exact maps
        for k in ("4", "8"):
            assert r["cuda"][m][k] == pytest.approx(r["cpu"][m][k], abs=0.051)
    assert json.loads((tmp / "r_cuda.detail.json").read_text())["device"] != "cpu"

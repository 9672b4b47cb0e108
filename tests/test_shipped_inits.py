"""The inits shipped in adapters/meta/ read back whole and describe themselves truthfully (files only, no model)."""

import json
import re
from pathlib import Path

import pytest

from metarlhf.adapters import load_adapter
from metarlhf.reward import LR_PREFIX, RewardConfig

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "adapters" / "meta"
KINDS = {"reward": "reward_init", "reward-smollm2": "reward_init", "policy": "policy_init"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_shipped_init_reads_back_and_its_config_names_the_layers_it_holds(name):
    ad = load_adapter(META / name, expect_kind=KINDS[name])  # checks the sha256 too
    assert ad.meta["base_model"]
    if KINDS[name] == "reward_init":
        assert int(ad.meta["inner_steps"]) >= 1
    lora = [k for k in ad.tensors if ".lora_A." in k and not k.startswith(LR_PREFIX)]
    assert lora and all(ad.tensors[k].shape[0] == ad.config["r"] for k in lora)
    layers = {int(m.group(1)) for k in lora if (m := re.search(r"\.layers?\.(\d+)\.", k))}
    if "reward_config" in ad.meta and RewardConfig.from_dict(ad.meta["reward_config"]).lora_layers is not None:
        # peft builds LoRA where adapter_config.json says: it must say the layers the tensors are for
        assert ad.config["layers_to_transform"] == sorted(layers) == ad.meta["reward_config"]["lora_layers"]
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        lc = LoraConfig(**{k: v for k, v in ad.config.items() if k != "peft_type"})
        assert all(check_target_module_exists(lc, k.split(".lora_A.")[0].removeprefix("base_model.model.")) for k in lora)
        assert not check_target_module_exists(lc, "layers.0.self_attn.q_proj")
    else:  # every layer (policy inits are saved by peft itself, with the key set to null)
        assert ad.config.get("layers_to_transform") is None


def test_smollm2_reward_init_uses_the_inner_steps_it_was_meta_trained_with_and_quotes_its_runs():
    meta = load_adapter(META / "reward-smollm2").meta
    assert meta["inner_steps"] == meta["meta_config"]["inner_steps"] == 20  # session 10's choice, trained in
    assert meta["warm_start"]["best_step"] == 300  # it continues session 9's init
    schedule = json.loads((ROOT / "benchmarks/results/reward_inner_schedule_smollm2.json").read_text())
    best = max(schedule["acc"], key=lambda v: sum(schedule["acc"][v].values()))  # session 10's rule on validation
    assert best == "steps=20"
    val = json.loads((ROOT / "benchmarks/results/reward_smol_cont.json").read_text())
    assert val["meta_train"]["best_val"] == meta["val_acc"] and val["meta_train"]["steps"] == meta["steps"]
    assert val["val"]["inner_steps"] == 20
    for group in ("val", "test"):  # eval reward's runs of this init read its 20 steps from the metadata
        detail = json.loads((ROOT / f"benchmarks/results/reward_smol_cont_{group}.detail.json").read_text())
        assert detail["steps"] == 20 and detail["encoder"] == meta["base_model"]

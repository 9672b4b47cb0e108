"""The inits shipped in adapters/meta/ read back whole and describe themselves truthfully (files only, no model)."""

import re
from pathlib import Path

import pytest

from metarlhf.adapters import load_adapter
from metarlhf.reward import RewardConfig

META = Path(__file__).resolve().parents[1] / "adapters" / "meta"
KINDS = {"reward": "reward_init", "reward-smollm2": "reward_init", "policy": "policy_init"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_shipped_init_reads_back_and_its_config_names_the_layers_it_holds(name):
    ad = load_adapter(META / name, expect_kind=KINDS[name])  # checks the sha256 too
    assert ad.meta["base_model"] and int(ad.meta["inner_steps"] if "inner_steps" in ad.meta else 1) >= 1
    lora = [k for k in ad.tensors if ".lora_A." in k and not k.startswith("metarlhf")]
    assert lora and all(ad.tensors[k].shape[0] == ad.config["r"] for k in lora)
    layers = {int(m.group(1)) for k in lora if (m := re.search(r"\.layers?\.(\d+)\.", k))}
    if "reward_config" in ad.meta and RewardConfig.from_dict(ad.meta["reward_config"]).lora_layers is not None:
        # peft builds LoRA where adapter_config.json says: it must say the layers the tensors are for
        assert ad.config["layers_to_transform"] == sorted(layers) == ad.meta["reward_config"]["lora_layers"]
    else:  # every layer (policy inits are saved by peft itself, with the key set to null)
        assert ad.config.get("layers_to_transform") is None


def test_smollm2_reward_init_records_its_inner_step_choice():
    meta = load_adapter(META / "reward-smollm2").meta
    choice = meta["inner_steps_choice"]
    assert meta["inner_steps"] == choice["chosen"] != meta["meta_config"]["inner_steps"] == choice["meta_trained_with"]
    best = max(choice["val_acc"], key=lambda t: sum(choice["val_acc"][t]))
    assert int(best) == choice["chosen"]

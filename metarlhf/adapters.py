"""The on-disk adapter format, shared by reward and policy adapters.

An adapter is a directory in peft's format plus one metadata file::

    adapter_config.json        peft LoraConfig (what peft.PeftModel.from_pretrained reads)
    adapter_model.safetensors  tensors, peft key names (plus extra keys, e.g. a reward head)
    metarlhf.json              metadata: kind, base model, init, K, steps, losses, sha256, ...

The directory is built under a temp name and renamed into place (see
:func:`metarlhf.io.atomic_dir`), so a reader never sees a partial adapter. Saving over
an existing path replaces it only if it is empty or itself an adapter directory (its
``metarlhf.json`` and nothing but adapter files); anything else is refused. The
metadata records the sha256 of the safetensors file, checked on every load (an
adapter without one is refused). Only safetensors and JSON are read back: nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarlhf.errors import AdapterError
from metarlhf.io import atomic_dir, check_output_dir, load_tensors, save_tensors, sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "metarlhf.json"
FORMAT_VERSION = 1
#: The files an adapter or init directory holds (meta-train adds split.json and metrics.jsonl).
KNOWN_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, META_FILE, "split.json", "metrics.jsonl"})


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


def is_adapter_dir(path: str | os.PathLike, extra_names: Iterable[str] = ()) -> bool:
    """Whether ``path`` is a directory :func:`save_adapter` wrote: a ``metarlhf.json`` and
    nothing but adapter files (:data:`KNOWN_FILES` or ``extra_names``)."""
    path = Path(path)
    if path.is_symlink() or not (path / META_FILE).is_file():
        return False
    allowed = KNOWN_FILES | set(extra_names)
    return all(p.name in allowed and p.is_file() and not p.is_symlink() for p in path.iterdir())


def _stored_kind(path: Path) -> str | None:
    try:
        return _read_json_object(path / META_FILE).get("kind")
    except (AdapterError, OSError):
        return None


def _replaceable(path: Path, extra_names: Iterable[str], kind: str | None) -> bool:
    if not any(path.iterdir()):
        return True  # an empty one holds nothing to lose
    return is_adapter_dir(path, extra_names) and (kind is None or _stored_kind(path) == kind)


def _what(kind: str | None) -> str:
    return "an adapter directory" if kind is None else f"an adapter directory of kind {kind!r}"


def check_out(path: str | os.PathLike, extra_names: Iterable[str] = (), kind: str | None = None) -> None:
    """Raise :class:`~metarlhf.errors.ConfigError` if :func:`save_adapter` would refuse ``path``.

    For commands to check ``--out`` before a long run: ``path`` must be missing, empty or
    an adapter directory (see :func:`is_adapter_dir`), and not inside a file. With ``kind``
    (what will be written there), an adapter directory of another kind is refused too:
    ``adapt reward --out`` naming a meta-trained init or a policy adapter must not replace it.
    """
    check_output_dir(path, lambda p: _replaceable(p, extra_names, kind), what=_what(kind))


def save_adapter(path: str | os.PathLike, adapter: Adapter, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``adapter`` to directory ``path`` atomically (replacing an older adapter there).

    ``extra_files`` (name -> bytes) are written into the same directory, inside the
    same atomic swap (e.g. a reward init's ``split.json``). Raises
    :class:`~metarlhf.errors.ConfigError` if ``path`` exists and is neither empty nor
    an adapter directory (see :func:`is_adapter_dir`) of the same ``kind`` as ``adapter``
    (its metadata's ``kind``, where it has one): nothing else is ever replaced.
    """
    path = Path(path)
    extra_files = extra_files or {}
    for name in extra_files:
        if "/" in name or name.startswith(".") or name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE):
            raise AdapterError(f"invalid extra file name {name!r}")
    meta = dict(adapter.meta)
    meta.setdefault("created_at", time.time())
    meta["format_version"] = FORMAT_VERSION
    kind = meta.get("kind")
    with atomic_dir(path, lambda p: _replaceable(p, extra_files, kind), what=_what(kind)) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, adapter.tensors, metadata={"format": "pt"})
        meta["sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
    adapter.meta = meta
    return path


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; AdapterError if unreadable, not UTF-8/JSON, or not an object.

    ``FileNotFoundError`` passes through for the caller to word.
    """
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
        raise AdapterError(f"{path}: unreadable: {e}") from e
    if not isinstance(obj, dict):
        raise AdapterError(f"{path}: unreadable: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict of adapter directory ``path`` (AdapterError if missing or malformed)."""
    path = Path(path)
    try:
        return _read_json_object(path / META_FILE)
    except FileNotFoundError as e:
        raise AdapterError(f"{path}: not an adapter directory (no {META_FILE})") from e


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
        config = _read_json_object(path / CONFIG_FILE)
    except FileNotFoundError as e:
        raise AdapterError(f"{path}: missing {CONFIG_FILE}") from e
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{path}: missing {WEIGHTS_FILE}")
    if verify:
        want = meta.get("sha256")
        if not isinstance(want, str) or not want:
            # save_adapter has always recorded it: without one the file cannot be checked
            raise AdapterError(f"{path}/{META_FILE}: no sha256 of {WEIGHTS_FILE}, cannot verify it")
        try:
            got = sha256_file(weights)
        except OSError as e:
            raise AdapterError(f"{path}/{WEIGHTS_FILE}: unreadable: {e}") from e
        if got != want:
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

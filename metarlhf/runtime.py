"""Process-level settings: the compute device, and malloc tuning for long CPU runs (the CLI
applies it at start-up)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

from metarlhf.errors import ConfigError

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_malloc(trim_bytes: int = 1 << 30, top_pad_bytes: int = 1 << 28) -> bool:
    """Keep freed memory in the heap instead of handing it back to the OS (Linux glibc).

    A training step frees and re-allocates the same large activation buffers (the LM
    head's logits alone are ~100 MB). By default glibc serves blocks above its mmap
    threshold (at most 32 MB) with fresh ``mmap`` calls and trims freed heap, so every
    step page-faults its buffers in again. A long-lived process partly escapes this, as the
    threshold rises after frees; a fresh ``metarlhf adapt policy`` process does not. Here:
    no mmap for allocations (``M_MMAP_MAX=0``), trim only above ``trim_bytes``, and grow
    the heap in ``top_pad_bytes`` steps. Measured on the 2-core CPU, cold K=16 ``adapt
    policy``: 59.7 s and 4.6M minor page faults before, 49.6 s and 0.73M after.

    Returns True when applied; False (nothing changed) off glibc, or with
    ``METARLHF_TUNE_MALLOC=0`` in the environment.
    """
    if os.environ.get("METARLHF_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_bytes), (_M_TOP_PAD, top_pad_bytes))
    return all(mallopt(option, value) == 1 for option, value in settings)


def parse_device(device: str) -> Any:
    """Check a device name without looking for the hardware: ``auto`` (returned as None),
    ``cpu``, ``cuda`` or ``cuda:N`` (as a ``torch.device``); anything else is a ConfigError."""
    if device == "auto":
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r} (use auto, cpu, cuda or cuda:N): {e}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_device(device: str = "auto") -> Any:
    """``auto`` -> CUDA if available else CPU, as a ``torch.device``. A CUDA device that is
    absent, or any other device type, is a ConfigError (the CLI's exit code 2)."""
    import torch

    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} is not available: no CUDA device on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} is not available: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def unwrap_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model: Any) -> Any:
    """The ``torch.device`` holding ``model``'s parameters (inputs are moved there)."""
    return next(model.parameters()).device


def describe_device(device: Any) -> str:
    """A device for reports (``auto`` resolved): the GPU's name on CUDA, else ``cpu``."""
    import torch

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else "unknown"."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def software_versions() -> dict[str, str]:
    """What decides the numbers of a sampled benchmark, for its results: the versions of Python
    and of the libraries (sampling, kernels), and the CPU's model and the vector kernels torch
    picked for it. The same seed and versions on another CPU draw other samples (the session 7
    policy evaluation reproduced to the answer on one machine and not on another)."""
    import platform
    from importlib import metadata

    import metarlhf

    out = {"python": platform.python_version(), "metarlhf": metarlhf.__version__}
    for dist in ("torch", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["cpu"] = cpu_model()
    try:
        import torch

        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512
        out["torch_threads"] = str(torch.get_num_threads())
    except (ImportError, AttributeError):
        out["cpu_capability"] = "unknown"
    return out

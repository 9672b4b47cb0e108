"""Helpers for the server benchmarks: start/kill the real server (``metarlhf serve``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEY = "sk-benchmark-key-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``metarlhf serve`` in a child process on 127.0.0.1 (embedded default models)."""

    def __init__(self, adapter_root: Path, port: int | None = None, log: Path | None = None, **env: str) -> None:
        self.adapter_root = Path(adapter_root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or (self.adapter_root / "server.log")
        self.env = {**os.environ, "METARLHF_API_KEYS": json.dumps({KEY: "bench"}), "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", **{f"METARLHF_{k.upper()}": str(v) for k, v in env.items()}}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        """Start and wait for /readyz; returns the start-up seconds."""
        t0 = time.perf_counter()
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "a")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metarlhf.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--adapter-root", str(self.adapter_root), "--log-level", "warning"],
            cwd=ROOT, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s; see {self.log}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill9()


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def write_result(name: str, result: dict) -> Path:
    """Write ``result`` as ``benchmarks/results/<name>`` (temp file, fsync, rename)."""
    from metarlhf.io import atomic_write_bytes

    path = RESULTS / name
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    return path

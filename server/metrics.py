"""A tiny Prometheus registry: counters, gauges (callables) and latency histograms."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self, prefix: str = "metarlhf") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._help: dict[str, str] = {}
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, help_: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._help[name] = help_
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, help_: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._help[name] = help_
            h = self._hist[name].get(key)
            if h is None:
                h = self._hist[name][key] = [[0] * len(BUCKETS), 0.0, 0]
            for i, b in enumerate(BUCKETS):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self._gauges[name] = (help_, fn)

    def render(self) -> str:
        p = self.prefix
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                lines += [f"# HELP {p}_{name} {self._help[name]}", f"# TYPE {p}_{name} counter"]
                lines += [f"{p}_{name}{_labels(dict(k))} {v:g}" for k, v in sorted(series.items())]
            for name, series in sorted(self._hist.items()):
                lines += [f"# HELP {p}_{name} {self._help[name]}", f"# TYPE {p}_{name} histogram"]
                for k, (counts, total, n) in sorted(series.items()):
                    lab = dict(k)
                    for b, c in zip(BUCKETS, counts, strict=True):
                        lines.append(f"{p}_{name}_bucket{_labels({**lab, 'le': f'{b:g}'})} {c}")
                    lines.append(f"{p}_{name}_bucket{_labels({**lab, 'le': '+Inf'})} {n}")
                    lines.append(f"{p}_{name}_sum{_labels(lab)} {total:.6f}")
                    lines.append(f"{p}_{name}_count{_labels(lab)} {n}")
        for name, (help_, fn) in sorted(self._gauges.items()):
            try:
                value = float(fn())
            except Exception:  # noqa: BLE001 - a broken gauge must not break /metrics
                continue
            lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value:g}"]
        return "\n".join(lines) + "\n"

import subprocess
import sys

import pytest

from metarlhf.runtime import tune_malloc

PROBE = """
import resource, sys
from metarlhf.runtime import tune_malloc
applied = tune_malloc() if sys.argv[1] == "1" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    b = bytearray(64 << 20)  # zero-filled: every page is touched
    del b
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tuned: bool) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tune_malloc_stops_refaulting_freed_buffers():
    _, default = _faults(False)
    applied, tuned = _faults(True)
    assert applied == 1
    # untuned: each 64 MB buffer is a fresh mmap (16k page faults each time); tuned: reused from the heap
    assert default > 10 * (64 << 20) // 4096
    assert tuned < default / 5


def test_tune_malloc_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("METARLHF_TUNE_MALLOC", "0")
    assert tune_malloc() is False


def test_software_versions_name_the_cpu_and_its_kernels():
    import torch

    from metarlhf.runtime import cpu_model, software_versions

    sw = software_versions()
    assert sw["torch"] == torch.__version__
    assert sw["cpu"] == cpu_model() and sw["cpu"]
    assert sw["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert int(sw["torch_threads"]) == torch.get_num_threads()

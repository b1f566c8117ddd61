"""space.allocator: with freed memory retained, re-allocating a large tensor takes no new pages."""
import os
import platform
import subprocess
import sys

import pytest

from space.config import TrainConfig

PROBE = """
import resource, sys
import torch
from space.allocator import retain_freed_memory
if sys.argv[1] == "heap":
    assert retain_freed_memory()
faults = []
for _ in range(30):  # a training step's pattern: the same large tensor, allocated and freed again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2 ** 20 // 4).fill_(1.0)  # 64 MiB: 16384 pages of 4 KiB to fault in when fresh
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-10:]))
"""


def _faults_of_the_last_ten_allocations(mode: str) -> int:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}  # 4 KiB pages: 16384 faults to touch 64 MiB afresh
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_retained_memory_is_reused_without_page_faults():
    default, heap = _faults_of_the_last_ten_allocations("default"), _faults_of_the_last_ten_allocations("heap")
    # malloc's own behaviour: each freed 64 MiB goes back to the kernel and is faulted in afresh,
    # 4 KiB at a time, unless the kernel backs every large mapping with huge pages (THP 'always').
    if default < 10 * 16384 * 0.9:
        pytest.skip(f"{default} faults for 640 MiB: this kernel maps them with huge pages; nothing to save")
    # Retained: torch's aligned allocations leave a few freed blocks unused at first (the heap grew
    # by six blocks here), then they are reused without a fault.
    assert heap < 2000, heap


def test_cpu_allocator_is_checked():
    assert TrainConfig().cpu_allocator == "heap"
    with pytest.raises(ValueError, match="train.cpu_allocator"):
        TrainConfig(cpu_allocator="jemalloc")


DENORMALS = """
import sys
import torch
from space.allocator import flush_denormals
if sys.argv[1] == "flush" and not flush_denormals():
    print("unsupported")
    raise SystemExit
torch.set_num_threads(2)
# 1e-40 is denormal in float32; 2**20 elements are split between both threads of the pool.
y = torch.full((2 ** 20,), 1e-30) * 1e-10
print(int((y != 0).sum()))
"""


def _denormals_left(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", DENORMALS, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_flush_denormals_reaches_the_worker_threads():
    assert _denormals_left("none") == str(2 ** 20)  # the control: denormals are computed as such
    left = _denormals_left("flush")
    if left == "unsupported":
        pytest.skip("this CPU has no flush-to-zero mode")
    assert left == "0", left  # set before the pool started, so every thread flushes


def test_flush_denormal_is_checked():
    assert TrainConfig().flush_denormal is False
    with pytest.raises(ValueError, match="train.flush_denormal"):
        TrainConfig(flush_denormal="yes")

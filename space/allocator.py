"""CPU process settings for training: keep freed memory (:func:`retain_freed_memory`), and
optionally flush denormal floats to zero (:func:`flush_denormals`, at the end of this module).

Keep freed memory in the process: on CPU, page faults otherwise take half a large training step.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages
from the kernel and gives them back when the tensor is freed. SPACE at 128 x 128 allocates
hundreds of MiB per step in such tensors (the B*N glimpses and their activations: 200 MiB each
at G = 16, batch 12), so every step touches gigabytes of new pages, and the kernel's page-fault
handling costs as much as the arithmetic (benchmarks/bench_speed.py ``--malloc default`` against
``--malloc heap``, README "Speed and memory"). :func:`retain_freed_memory` tells malloc to serve
everything from its heap and not to give freed memory back, so that from the second step on the
same pages are reused. The price: the process keeps its peak memory until it exits (a training
process reaches it every step anyway), and torch's aligned allocations leave some freed blocks
unused before the heap settles: at G = 16, batch 12, the peak resident set rose from 7.3 to
8.8 GiB, where it stayed, while a step took 6.3 s instead of 11 s. Values are unaffected (where
memory comes from does not change any arithmetic). At the default experiment's 64 x 64 the
tensors are small enough for malloc to reuse them by itself: no change.

Only glibc (Linux) has these settings; elsewhere the call does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2 ** 31 - 1  # the largest int: free memory at the heap's top is kept up to 2 GiB


def retain_freed_memory() -> bool:
    """Serve all allocations from malloc's heap (no mmap) and keep freed memory; True if applied."""
    if not sys.platform.startswith("linux"):
        log.info("cpu_allocator 'heap' needs glibc's mallopt; on %s the allocator stays as it is", sys.platform)
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("cpu_allocator 'heap': this C library has no mallopt; the allocator stays as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not applied:
        log.info("cpu_allocator 'heap': mallopt refused the settings; the allocator stays as it is")
    return applied


def flush_denormals() -> bool:
    """Flush denormal floats to zero in this process's CPU arithmetic (``train.flush_denormal``).

    A small relaxed-Bernoulli temperature (the Atari configurations' tau 0.1) drives gradients
    into the denormal range (below 1.2e-38 in float32), where x86 CPUs compute many times slower:
    the default experiment trained with ``model.tau_end_value=0.1`` slowed down from step 1350 on,
    and at its step-1500 checkpoint a training step took 2.3 s on one thread, 0.6 s with denormals
    flushed. It changes values (those tiny numbers become 0), so it is off by default.

    The setting is per thread and threads inherit it when they are created, so call this before
    torch starts its worker threads (the first parallel operation): later, only the calling thread
    would flush. Returns False where the CPU has no such mode.
    """
    import torch

    applied = torch.set_flush_denormal(True)
    if not applied:
        log.info("train.flush_denormal: this CPU has no flush-to-zero mode; denormals stay")
    return applied

"""Keep freed CPU memory for reuse: training frees and re-allocates the same activations every step.

glibc's malloc hands large freed blocks back to the operating system (it trims the top of the heap
once more than a few tens of MB are free, and serves big requests with fresh ``mmap`` calls). A CPU
training step frees nearly all its activations after the backward pass and asks for them again in
the next forward, so every step then pays for the same memory again in page faults, thousands of
them a step, a share of the step's time that varies with the heap's history (count them with
``resource.getrusage().ru_minflt`` around the steps; ``bench/bench.py`` times the effect). With the
two thresholds below the faults drop to zero after the first steps and step times stop wandering.

The cost: up to ``trim_threshold`` bytes of freed memory stay mapped (resident) for the next step
instead of going back to the system. The peak resident size does not change, since training reaches
it anyway. PyTorch's CUDA caching allocator makes the same trade for GPU memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB free at the top of the heap (a step's activations fit)
MMAP_THRESHOLD = 256 << 20  # blocks below 256 MiB come from the heap, so they can be reused

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks for reuse (process-wide, once); True when it took effect.

    Does nothing (returns False) where the C library is not glibc, e.g. on macOS or Windows.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False

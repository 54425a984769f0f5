"""Process-wide tuning, opt-in: :func:`tune` is called by the entry points (app, CLI, bench), never by the library.

nanoGPT's rule: the model and the trainer change no process-wide setting; the script that runs
them decides threads, the allocator and cuDNN's autotuner. ResViz's entry points call :func:`tune`
once at start-up, and a job's worker calls it for its own thread count.

Keep freed CPU memory for reuse: training frees and re-allocates the same activations every step.

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
import os
import sys
from dataclasses import dataclass

import torch

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB free at the top of the heap (a step's activations fit)
MMAP_THRESHOLD = 256 << 20  # blocks below 256 MiB come from the heap, so they can be reused

_applied: bool | None = None


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune` applied (None: left alone)."""

    threads: int | None = None
    keep_freed_memory: bool | None = None  # True when glibc took the setting
    cudnn_benchmark: bool | None = None


def tune(*, threads: int | None = None, keep_freed_memory: bool = False, cudnn_benchmark: bool | None = None) -> Tuning:
    """Apply process-wide settings; each argument left at its default changes nothing.

    Args:
        threads: torch intra-op threads (``torch.set_num_threads``: the calling thread and threads
            started after it). None or 0: leave torch's setting.
        keep_freed_memory: ask glibc to keep freed blocks for reuse (:func:`keep_freed_memory`; CPU training).
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` (fixed shapes: cuDNN times its
            algorithms once and keeps the fastest).
    """
    if threads:
        torch.set_num_threads(threads)
    kept = _keep_freed_memory() if keep_freed_memory else None
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return Tuning(threads=threads or None, keep_freed_memory=kept, cudnn_benchmark=cudnn_benchmark)


def default_threads() -> int:
    """Usable cores minus one (at least 1): on a small box the web server keeps a core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks for reuse (process-wide, once); True when it took effect.

    Does nothing (returns False) where the C library is not glibc, e.g. on macOS or Windows.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _applied


_keep_freed_memory = keep_freed_memory  # for tune(), whose argument has the same name


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False

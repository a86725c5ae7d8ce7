"""Host memory: keep freed blocks for the next step instead of handing them back to the OS.

glibc's malloc serves requests over 32 MB (and, adaptively, smaller ones) with fresh ``mmap`` pages
and unmaps them on free, so every large activation of every training step is new memory whose
first write page-faults it in page by page. The default CPU step, which encodes both views in one
call, has ~160,000 such faults per step; keeping freed blocks took it from 150 to 180 img/s
(``benchmarks/results/cpu_step_profile.md``). With mmap and heap trimming off, the next step's
tensors of the same sizes reuse the freed blocks, as the jemalloc / tcmalloc that PyTorch's CPU
tuning guide recommends do; the process keeps its peak footprint (so do forked loader workers).
The ``dilemma`` command sets this for every sub-command; in a loop of your own, call
``keep_freed_memory()`` once. Linux with glibc only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and heap trimming; True when both were set."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # glibc only (musl, macOS, Windows: nothing to do)
            return False
        libc = ctypes.CDLL("libc.so.6")
        # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (man mallopt)
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError, ValueError):
        return False

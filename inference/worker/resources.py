"""What a worker process takes from its machine: threads (its share of the core budget) and
how its C library treats freed memory.  No torch: ONNX Runtime workers use it too."""

from __future__ import annotations

import ctypes
import os


def worker_threads(cpu_cores: int) -> int:
    """The core budget's size: the configured number (`cpu_cores`), else one per core this
    process may use."""
    if cpu_cores > 0:
        return cpu_cores
    return max(1, len(os.sched_getaffinity(0)))


#: glibc `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap and are reused, not mapped and unmapped each time.
MMAP_THRESHOLD_BYTES = 128 * 1024 * 1024
#: Freed memory kept for reuse before any is given back to the system.
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc reuse the model's big activation buffers instead of unmapping them.

    By default glibc serves allocations over a (moving) threshold with fresh `mmap`s and unmaps
    them on free, so every forward pass of a batch faults its activations in page by page again.
    Measured on the 2-core dev machine, EfficientNet-Lite0 per image: batch 1 11 ms, batch 8
    17-19 ms with ~7,000 page faults per image; with these settings batch 8 takes 9 ms and no
    faults.  (The CycleGAN generator at 256×256, batch 4: 477 → 341 ms per image.)  PyTorch's
    CPU tuning guide suggests jemalloc or tcmalloc for the same reason; this needs no extra
    library.  Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):
        return False

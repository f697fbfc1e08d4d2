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


#: Allocations from this size on are mapped on their own and unmapped when freed.
RETURN_FROM_BYTES = 1024 * 1024


def return_freed_memory() -> bool:
    """Give big freed blocks back to the system at once: a worker's default from its start (a
    torch model's worker switches to keeping freed memory when it loads: `keep_freed_memory`).

    glibc's threshold for mapping a block on its own moves up (to 32 MB) as mapped blocks are
    freed, after which Pillow's 16 MB blocks of a decoded photo come from the heap of the
    decoder thread that made them, and stay there when freed: each decoder thread's heap kept
    a photo's worth.  Measured (caption worker, DECODE_MEMORY_MB=64): a peak of 596 MB against
    a need of 377.  A fixed threshold keeps photos and ONNX Runtime's shrinking arena mapped
    and unmapped; the page faults cost a decode a few milliseconds.  Set from the start, not
    after the load: building the sessions under glibc's moving threshold left the workers
    60 MB bigger (it costs the captioner's start 0.17 s).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, RETURN_FROM_BYTES))
    except (OSError, AttributeError):
        return False


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

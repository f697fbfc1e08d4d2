"""Each worker's memory ceiling: what its model needs, plus its decoding, plus headroom.

The watchdog (`inference.service.supervisor`) kills a worker whose resident memory passes its
ceiling.  Unless a `*_MAX_MEMORY_MB` setting names one, the ceiling follows the worker:

    ceiling = need + DECODE_MEMORY_MB + headroom

where *need* is what the worker reported once its models were loaded (its resident size plus
what running them at the task's largest input was measured to take: `inference.runtime.needs`),
and the decode budget bounds what its decoding may hold at once (`inference.worker.decoding`).
So a legal request never meets the ceiling, and a worker that grows past it — a leak, an input
that escaped the decoder's checks — is restarted long before the host runs out.

Where the need is not known (INFERENCE_RUNTIME=torch, a GPU, Torch Hub models: no export measured
them) or decoding is unbounded (DECODE_MEMORY_MB=0), the task's fixed `fallback_memory_mb`
applies: the generous ceilings from before these measurements existed.
"""

from __future__ import annotations

import math

from config import Settings
from inference.tasks import TaskSpec

_MB = 1024 * 1024

#: On top of need + decode budget: allocator fragmentation, a batch's preprocessed inputs and
#: results, the interpreter's own growth.  A fraction of the need, at least `HEADROOM_MIN_MB`.
HEADROOM_FRACTION = 0.25
HEADROOM_MIN_MB = 64


def memory_ceiling_mb(spec: TaskSpec, settings: Settings, need_bytes: int | None) -> int:
    """The task's worker ceiling in MB (0: none)."""
    configured = spec.memory_limit_mb(settings)
    if configured is not None:
        return configured
    if not need_bytes or settings.decode_memory_mb <= 0:
        return spec.fallback_memory_mb
    need_mb = need_bytes / _MB
    headroom_mb = max(HEADROOM_MIN_MB, HEADROOM_FRACTION * need_mb)
    return math.ceil(need_mb + settings.decode_memory_mb + headroom_mb)

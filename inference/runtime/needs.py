"""What a loaded model needs in memory, measured, so that a worker's ceiling can follow it.

The export process (`inference.runtime.export`) runs each runtime's pipeline once on the task's
*largest* input — the most images a batch stacks, the photo shape that preprocesses to the most
pixels, every option at its most expensive — and records how far the process's peak resident
memory rose above where it stood (`working_memory` in the sidecar).  A worker then needs its
resident memory once the model is loaded plus that rise (`WorkingMemory.for_elements`, scaled
to its own largest input when its size settings differ from the export's: a convolutional
network's activations grow with its input's pixels).

Torch-free: the worker and the service read it; only the export process measures torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from config import Settings
from inference.tasks import get_task

#: Aspect ratios tried for the largest input: the preprocessing caps the long side (CycleGAN at
#: 4 × its short side, the captioner at its size), so the largest tensor is at one of these.
ASPECTS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: Runs measured: a second run on the same input may still grow an arena.
MEASURED_RUNS = 2


def largest_input(pipeline: Any, task: str, settings: Settings) -> tuple[list[Any], list[dict[str, Any]]]:
    """The inputs and options of the task's most memory-hungry run of `pipeline` on the CPU."""
    spec = get_task(task)
    # Photos whose short side is the size the model works at (its draft size), at each aspect:
    # the preprocessing's own caps then decide which comes out largest.
    short_side = max(pipeline.draft_size or (256, 256))
    candidates = [pipeline.preprocess(Image.new("RGB", (round(short_side * aspect), short_side))) for aspect in ASPECTS]
    biggest = max(candidates, key=lambda tensor: input_elements([tensor]))
    count = spec.max_batch_size(settings, "cpu") if pipeline.fixed_input_size else 1
    options = {option.name: option.maximum for option in spec.options}
    return [biggest] * count, [dict(options) for _ in range(count)]


def input_elements(inputs: list[Any]) -> int:
    """Numbers fed to the model (numpy arrays or torch tensors)."""
    return sum(int(x.size if isinstance(getattr(x, "size", None), int) else x.numel()) for x in inputs)


@dataclass(frozen=True)
class WorkingMemory:
    """One measurement: the peak rise in bytes over a run of `elements` input numbers."""

    bytes: int
    elements: int

    def for_elements(self, elements: int) -> int:
        """The rise for a largest input of `elements` numbers: proportional (a smaller ZEBRA_SIZE
        or CAPTION_SIZE than the export's, a smaller batch, needs proportionally less)."""
        if self.elements <= 0:
            return self.bytes
        return round(self.bytes * elements / self.elements)

    def to_json(self) -> dict[str, int]:
        return {"bytes": self.bytes, "elements": self.elements}

    @classmethod
    def from_json(cls, data: Any) -> WorkingMemory | None:
        try:
            return cls(int(data["bytes"]), int(data["elements"]))
        except (TypeError, KeyError, ValueError):
            return None


def measure_working_memory(pipeline: Any, task: str, settings: Settings, *, before: Callable[[], None] | None = None) -> WorkingMemory:
    """Run `pipeline` on its largest input `MEASURED_RUNS` times; the peak rise of this process.

    `before` (e.g. returning freed heap to the system) runs first, so the starting point is what
    the process holds, not what it happens to have kept from earlier work.
    """
    inputs, options = largest_input(pipeline, task, settings)
    if before is not None:
        before()
    start = resident_bytes()
    reset_peak()
    for _ in range(MEASURED_RUNS):
        pipeline.run(inputs, options)
    return WorkingMemory(max(0, peak_bytes() - start), input_elements(inputs))


# --- a process's memory, from /proc (Linux) ----------------------------------------------------


class ProcFieldMissing(OSError):
    """The /proc file was read but has no such line (an older kernel)."""


def proc_kb(field: str, *, file: str = "status", pid: int | None = None) -> int:
    """The "Field:  N kB" line of `/proc/PID/FILE`, of this process unless `pid` is given; an
    `OSError` where it cannot be read, `ProcFieldMissing` where it has no such line."""
    path = f"/proc/{pid or 'self'}/{file}"
    with open(path, encoding="ascii") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ProcFieldMissing(f"{path} has no {field} line.")


def resident_bytes() -> int:
    return proc_kb("VmRSS") * 1024


def peak_bytes() -> int:
    """The peak resident size since the process started or since `reset_peak`."""
    return proc_kb("VmHWM") * 1024


def reset_peak(pid: int | None = None) -> None:
    """Start the peak resident size (VmHWM) of this process, or of a child `pid`, again from
    its current one (Linux 4.0+)."""
    with open(f"/proc/{pid or os.getpid()}/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")

"""`python -m inference memory`: what the local service costs in memory, process by process (issue 14).

    python -m inference memory [--weights-dir DIR] [--runtime torch] [--burst 4] [--json]

Starts the service and loads the three models one after the other (each worker's start-up time,
from its process start to its model ready, is then its own), then reports the proportional set
size (`Pss:` of `/proc/PID/smaps_rollup`: shared pages counted once, split between the processes
that map them) of the main process, of each worker and their total; then again after a burst of
`--burst` requests of every task at once (phone-size photos included: decoding buffers and
activations are what grows), followed by one request per task with the largest image the
limits let through (`largest_legal_png`: a PNG, which has no draft mode, as many pixels as
MAX_IMAGE_PIXELS and DECODE_MEMORY_MB allow, at the 4:1 shape that gives CycleGAN its largest
input).  With each worker: the runtime it reports it runs, the memory it said it needs once
loaded, the ceiling the watchdog holds it to (`inference.service.ceilings`) and its peak
resident size during the burst (`VmHWM`, reset once the models are loaded), which must stay
under the ceiling for the ceiling to be right.

Linux only (`/proc`).  Zebra and caption need their weights (`--weights-dir`, or WEIGHTS_DIR).
The figures are a measurement: the exit status is 0 unless a model cannot load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from config import Settings
from config.settings import RUNTIMES
from inference.bench import DEFAULT_IMAGES, BenchInput, bench_inputs, positive_count, with_room_for
from inference.bench_modes import with_runtime
from inference.errors import InferenceError, ModelUnavailable
from inference.decode_cost import decode_cost
from inference.images import ImageLimits
from inference.runtime.needs import ProcFieldMissing, proc_kb, reset_peak
from inference.service import TASKS, InferenceService

_KB = 1024
_MB = 1024 * 1024


@dataclass(frozen=True)
class ProcessMemory:
    #: "main" or the task whose worker it is.
    role: str
    pid: int
    pss_mb: float


@dataclass(frozen=True)
class MemorySnapshot:
    #: "models loaded" | "after a burst"
    label: str
    processes: list[ProcessMemory]
    total_mb: float


@dataclass(frozen=True)
class WorkerFacts:
    task: str
    model: str
    #: What runs its model, as the worker reports it.
    runtime: str
    #: Seconds from the worker's process start to its model ready.
    startup_s: float
    #: What it said it needs with its model loaded (0: not measured), its ceiling (0: none) and
    #: its peak resident size during the burst; MB.
    need_mb: float = 0.0
    ceiling_mb: int = 0
    peak_rss_mb: float = 0.0


@dataclass(frozen=True)
class MemoryReport:
    #: INFERENCE_RUNTIME of the run.
    runtime_setting: str
    cpu_cores: int
    burst: int
    workers: list[WorkerFacts]
    snapshots: list[MemorySnapshot]
    #: task → requests of the burst that failed.
    burst_errors: dict[str, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def format(self) -> str:
        lines = [
            f"memory: proportional set size (MB), INFERENCE_RUNTIME={self.runtime_setting}, {self.cpu_cores} cores, "
            f"burst of {self.burst} requests per task",
            "",
            f"{'process':10}{'runtime':>14}{'start-up s':>12}" + "".join(f"{s.label:>18}" for s in self.snapshots),
        ]
        facts = {worker.task: worker for worker in self.workers}
        for index, process in enumerate(self.snapshots[0].processes):
            worker = facts.get(process.role)
            runtime, startup = (worker.runtime, f"{worker.startup_s:.1f}") if worker else ("", "")
            pss = "".join(f"{snapshot.processes[index].pss_mb:18.1f}" for snapshot in self.snapshots)
            lines.append(f"{process.role:10}{runtime:>14}{startup:>12}{pss}")
        lines.append(f"{'total':36}" + "".join(f"{snapshot.total_mb:18.1f}" for snapshot in self.snapshots))
        lines += ["", f"{'resident (MB)':14}{'need':>10}{'ceiling':>10}{'peak':>10}"]
        for worker in self.workers:
            need = f"{worker.need_mb:.0f}" if worker.need_mb else "-"
            lines.append(f"{worker.task:14}{need:>10}{worker.ceiling_mb or '-':>10}{worker.peak_rss_mb:10.0f}")
        pids = ", ".join(f"{process.role} {process.pid}" for process in self.snapshots[0].processes)
        lines += ["", f"pids: {pids}", f"failed requests in the burst: {self.burst_errors}"]
        return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("memory", help="memory of the service's processes, models loaded and after a burst")
    parser.add_argument("--weights-dir", type=Path, default=None, help="where the weights are (default WEIGHTS_DIR)")
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default=None, help="what runs the models (default INFERENCE_RUNTIME: auto)"
    )
    parser.add_argument("--burst", type=positive_count, default=4, help="requests of each task in the burst (default 4)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of JPEG photos for the burst")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_memory_command)


def run_memory_command(args: argparse.Namespace, settings: Settings) -> int:
    settings = with_runtime(settings, args)
    # Made here, before the service starts, on the main thread: made in an executor thread, its
    # freed buffers stayed in that thread's malloc arena and counted as the main process's.
    largest = largest_legal_png(settings)
    report = asyncio.run(measure_memory(settings, bench_inputs(args.images), args.burst, largest))
    print(report.to_json() if args.json else report.format())
    return 0


# --- measuring ------------------------------------------------------------------------------------


def pss_bytes(pid: int) -> int:
    """The process's proportional set size, from `/proc/PID/smaps_rollup` (Linux 4.14+)."""
    return _proc_kb(pid, "smaps_rollup", "Pss") * _KB


async def measure_memory(settings: Settings, inputs: list[BenchInput], burst: int, largest: bytes) -> MemoryReport:
    for task in TASKS:  # room for the whole burst in every queue: this measures memory, not refusals
        settings = with_room_for(settings, task, burst)
    async with InferenceService(settings) as service:
        for task in TASKS:  # one at a time: each start-up time is the worker's own
            [state] = await service.warm_up(task)
            if state.state != "ready":
                raise ModelUnavailable(f"The {task} model did not load: {state.error or state.state}")
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(None, snapshot, "models loaded", process_ids(service))
        for task in TASKS:  # the peaks below are the burst's, not the loads'
            reset_peak(process_ids(service)[task])
        burst_inputs = [inputs[number % len(inputs)].data for number in range(burst)] + [largest]
        tickets = [service.submit(task, data) for task in TASKS for data in burst_inputs]
        outcomes = await asyncio.gather(*tickets, return_exceptions=True)
        errors = {task: 0 for task in TASKS}
        for number, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                errors[TASKS[number // len(burst_inputs)]] += 1
        pids = process_ids(service)
        after = await loop.run_in_executor(None, snapshot, "after a burst", pids)
        states = {state.task: state for state in service.models()}
        stats = service.stats()
        workers = [
            WorkerFacts(
                task,
                states[task].model,
                states[task].runtime or settings.inference_runtime,
                stats[task].worker_startup_s or 0.0,
                need_mb=stats[task].worker_memory_need_mb or 0.0,
                ceiling_mb=stats[task].worker_memory_ceiling_mb,
                peak_rss_mb=peak_resident_bytes(pids[task]) / _MB,
            )
            for task in TASKS
        ]
    return MemoryReport(settings.inference_runtime, stats.cpu_cores, burst, workers, [loaded, after], errors)


def process_ids(service: InferenceService) -> dict[str, int]:
    """"main" and each task → its process id (on the loop: the service's state lives there)."""
    pids = {"main": os.getpid()}
    for task in TASKS:
        pid = service.stats()[task].worker_pid
        if pid is None:
            raise InferenceError(f"The {task} worker is not running.")
        pids[task] = pid
    return pids


def peak_resident_bytes(pid: int) -> int:
    """The process's peak resident size since it started or its last `reset_peak` (`VmHWM`)."""
    return _proc_kb(pid, "status", "VmHWM") * _KB


def _proc_kb(pid: int, file: str, field: str) -> int:
    """A "Field:  N kB" line of `/proc/PID/FILE`, or an `InferenceError` saying why not."""
    try:
        return proc_kb(field, file=file, pid=pid)
    except ProcFieldMissing as error:
        raise InferenceError(str(error)) from None
    except OSError as error:
        raise InferenceError(f"Cannot read the memory of process {pid}: {error.strerror or error}.") from None


#: The largest legal image's shape: CycleGAN keeps its long side up to 4 × its short side.
LARGEST_ASPECT = 4


def largest_legal_png(settings: Settings) -> bytes:
    """An RGB PNG with as many pixels as the limits let through (MAX_IMAGE_PIXELS, and what
    DECODE_MEMORY_MB lets one image cost), 4:1: the worst legal image for every task's memory."""
    limits = ImageLimits.from_settings(settings)
    pixels = limits.max_pixels
    if limits.max_decode_bytes:
        probe = Image.new("RGB", (LARGEST_ASPECT * 64, 64))  # the cost per pixel of an RGB PNG
        pixels = min(pixels, limits.max_decode_bytes * probe.width * probe.height // decode_cost(probe))
    height = math.isqrt(pixels // LARGEST_ASPECT)
    width = LARGEST_ASPECT * height
    # A smooth gradient: compresses to a few MB, well under MAX_IMAGE_BYTES, yet decodes in full.
    row = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
    pixels_array = np.broadcast_to(row[None, :, None], (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels_array), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def snapshot(label: str, pids: dict[str, int]) -> MemorySnapshot:
    """The PSS of these processes now.  Reads `/proc`: call it off the event loop."""
    processes = [ProcessMemory(role, pid, pss_bytes(pid) / _MB) for role, pid in pids.items()]
    return MemorySnapshot(label, processes, sum(process.pss_mb for process in processes))

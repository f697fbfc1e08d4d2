"""`python -m inference memory`: what the local service costs in memory, process by process (issue 14).

    python -m inference memory [--weights-dir DIR] [--runtime torch] [--burst 4] [--json]

Starts the service and loads the three models one after the other (each worker's start-up time,
from its process start to its model ready, is then its own), then reports the proportional set
size (`Pss:` of `/proc/PID/smaps_rollup`: shared pages counted once, split between the processes
that map them) of the main process, of each worker and their total; then again after a burst of
`--burst` requests of every task at once (phone-size photos included: decoding buffers and
activations are what grows).  With each worker: the runtime it reports it runs.

Linux only (`/proc`).  Zebra and caption need their weights (`--weights-dir`, or WEIGHTS_DIR).
The figures are a measurement: the exit status is 0 unless a model cannot load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from config import Settings
from config.settings import RUNTIMES
from inference.bench import DEFAULT_IMAGES, BenchInput, bench_inputs, positive_count, with_room_for
from inference.bench_modes import with_runtime
from inference.errors import InferenceError, ModelUnavailable
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
    report = asyncio.run(measure_memory(settings, bench_inputs(args.images), args.burst))
    print(report.to_json() if args.json else report.format())
    return 0


# --- measuring ------------------------------------------------------------------------------------


def pss_bytes(pid: int) -> int:
    """The process's proportional set size, from `/proc/PID/smaps_rollup` (Linux 4.14+)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * _KB
    except OSError as error:
        raise InferenceError(f"Cannot read the memory of process {pid}: {error.strerror or error}.") from None
    raise InferenceError(f"/proc/{pid}/smaps_rollup has no Pss line.")


async def measure_memory(settings: Settings, inputs: list[BenchInput], burst: int) -> MemoryReport:
    for task in TASKS:  # room for the whole burst in every queue: this measures memory, not refusals
        settings = with_room_for(settings, task, burst)
    async with InferenceService(settings) as service:
        for task in TASKS:  # one at a time: each start-up time is the worker's own
            [state] = await service.warm_up(task)
            if state.state != "ready":
                raise ModelUnavailable(f"The {task} model did not load: {state.error or state.state}")
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(None, snapshot, "models loaded", process_ids(service))
        tickets = [
            service.submit(task, inputs[number % len(inputs)].data) for task in TASKS for number in range(burst)
        ]
        outcomes = await asyncio.gather(*tickets, return_exceptions=True)
        errors = {task: 0 for task in TASKS}
        for number, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                errors[TASKS[number // burst]] += 1
        after = await loop.run_in_executor(None, snapshot, "after a burst", process_ids(service))
        states = {state.task: state for state in service.models()}
        stats = service.stats()
        workers = [
            WorkerFacts(
                task,
                states[task].model,
                states[task].runtime or settings.inference_runtime,
                stats[task].worker_startup_s or 0.0,
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


def snapshot(label: str, pids: dict[str, int]) -> MemorySnapshot:
    """The PSS of these processes now.  Reads `/proc`: call it off the event loop."""
    processes = [ProcessMemory(role, pid, pss_bytes(pid) / _MB) for role, pid in pids.items()]
    return MemorySnapshot(label, processes, sum(process.pss_mb for process in processes))

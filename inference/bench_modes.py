"""`python -m inference bench --runtime … | --compare-runtime | --mix`: what runs the models, and
classify's latency beside the heavy tasks (issue 9).

    python -m inference bench --task caption --compare-runtime   # INFERENCE_RUNTIME vs torch
    python -m inference bench --mix --weights-dir DIR             # classify alone, then beside zebra+caption

- `--runtime auto|onnx|torch` sets INFERENCE_RUNTIME for the run (the workers read it from the
  settings); every report prints the runtime each worker reports it ran.
- `--compare-runtime`: the same service load twice, with the runtime (default `auto`) and with
  `torch`, each in a fresh service; prints the throughput ratio.  Targets: classify ≥ 1.4×,
  caption ≥ 1.2×.
- `--mix`: classify's latency with its load alone, then the same load while zebra and caption
  requests are kept queued (`HEAVY_BACKLOG` of each outstanding all along), in one service;
  prints the p99 ratio.  Target ≤ 3×.  Needs the zebra and caption weights (`--weights-dir`).

The figures are measurements, not tests: the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from config import Settings
from config.settings import RUNTIMES
from inference.bench import BenchInput, RunFigures, measure_service, with_room_for
from inference.errors import Busy, InferenceError, ModelUnavailable
from inference.service import InferenceBackend
from inference.service.factory import create_service

#: Throughput of the default runtime ÷ torch's, per task: the issue's targets.
RUNTIME_TARGETS = {"classify": 1.4, "caption": 1.2}
#: Classify's p99 beside the heavy tasks ÷ alone: at most this.
MIX_P99_TARGET = 3.0
#: Requests of each heavy task kept outstanding during the mixed run.
HEAVY_BACKLOG = 4
HEAVY_TASKS = ("zebra", "caption")
#: Seconds the heavy requests may take to reach their models before the mixed run gives up.
HEAVY_START_TIMEOUT_S = 60.0


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default=None, help="what runs the models (default INFERENCE_RUNTIME: auto)"
    )
    parser.add_argument(
        "--compare-runtime", action="store_true",
        help="the same load with the runtime (default auto) and with torch: the throughput ratio",
    )
    parser.add_argument(
        "--mix", action="store_true",
        help="classify latency alone, then with zebra and caption requests kept queued (needs their weights)",
    )
    parser.add_argument("--weights-dir", type=Path, default=None, help="where the weights are (default WEIGHTS_DIR)")


def with_runtime(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings with `--runtime` and `--weights-dir` applied: the workers read them there."""
    if getattr(args, "runtime", None) is not None:
        settings = settings.replace(inference_runtime=args.runtime)
    if getattr(args, "weights_dir", None) is not None:
        settings = settings.replace(weights_dir=args.weights_dir)
    return settings


def reported_runtime(service: InferenceBackend, task: str, setting: str) -> str:
    """The runtime `task`'s worker reports it runs, or the setting where it reports none."""
    state = next((state for state in service.models() if state.task == task), None)
    return state.runtime if state is not None and state.runtime else setting


def run_mode(args: argparse.Namespace, settings: Settings, inputs: list[BenchInput]) -> int:
    report: RuntimeComparison | MixReport
    if args.compare_runtime:
        report = asyncio.run(compare_runtimes(settings, args.task, inputs, args.requests, args.concurrency))
    else:
        report = asyncio.run(run_mix(settings, inputs, args.requests, args.concurrency))
    print(json.dumps(asdict(report)) if args.json else report.format())
    return 0


# --- --compare-runtime ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeRun:
    #: INFERENCE_RUNTIME for this run, and what the worker reports it ran.
    setting: str
    reported: str
    figures: RunFigures


@dataclass(frozen=True)
class RuntimeComparison:
    task: str
    requests: int
    concurrency: int
    runs: list[RuntimeRun]
    #: The first run's throughput ÷ the torch run's.
    ratio: float
    targets: dict[str, bool]

    def format(self) -> str:
        lines = [
            f"bench {self.task} --compare-runtime: {self.requests} requests, concurrency {self.concurrency}",
            "",
            f"{'INFERENCE_RUNTIME':20}{'ran':>14}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}",
        ]
        for run in self.runs:
            f = run.figures
            lines.append(
                f"{run.setting:20}{run.reported:>14}{f.throughput:9.2f}{f.p50_ms:9.1f}{f.p95_ms:9.1f}{f.p99_ms:9.1f}"
                f"{f.errors:8d}"
            )
        lines += ["", f"{self.runs[0].setting} / torch throughput: {self.ratio:.2f}×", _targets(self.targets)]
        return "\n".join(lines)


async def compare_runtimes(
    settings: Settings, task: str, inputs: list[BenchInput], requests: int, concurrency: int
) -> RuntimeComparison:
    runs = []
    for setting in (settings.inference_runtime, "torch"):
        # A fresh service per runtime: each worker loads its model once, with that setting.
        run_settings = with_room_for(settings.replace(inference_runtime=setting), task, concurrency)
        async with create_service(run_settings) as service:
            figures = await measure_service(service, task, inputs, requests, concurrency)
            runs.append(RuntimeRun(setting, reported_runtime(service, task, setting), figures))
    ratio = runs[0].figures.throughput / runs[1].figures.throughput
    targets = {"no errors": all(run.figures.errors == 0 for run in runs)}
    if task in RUNTIME_TARGETS:
        targets[f"throughput >= {RUNTIME_TARGETS[task]:g} x torch"] = ratio >= RUNTIME_TARGETS[task]
    return RuntimeComparison(task, requests, concurrency, runs, ratio, targets)


# --- --mix ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixReport:
    requests: int
    concurrency: int
    cpu_cores: int
    #: task → the runtime its worker reports.
    runtimes: dict[str, str]
    alone: RunFigures
    mixed: RunFigures
    #: Classify's p99 beside the heavy tasks ÷ alone.
    p99_ratio: float
    #: Heavy requests answered while the mixed classify load ran (zebra, caption).
    heavy_answered: dict[str, int]
    targets: dict[str, bool]

    def format(self) -> str:
        runtimes = ", ".join(f"{task} {runtime}" for task, runtime in self.runtimes.items())
        lines = [
            f"bench --mix: classify, {self.requests} requests, concurrency {self.concurrency}; "
            f"{HEAVY_BACKLOG} zebra and {HEAVY_BACKLOG} caption requests kept queued; {self.cpu_cores} cores shared",
            f"runtimes: {runtimes}",
            "",
            f"{'classify':28}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}",
        ]
        for label, run in (("alone", self.alone), ("beside zebra + caption", self.mixed)):
            lines.append(
                f"{label:28}{run.throughput:8.2f}{run.p50_ms:9.1f}{run.p95_ms:9.1f}{run.p99_ms:9.1f}{run.errors:8d}"
            )
        answered = ", ".join(f"{task} {count}" for task, count in self.heavy_answered.items())
        lines += [
            "",
            f"classify p99 beside the heavy tasks / alone: {self.p99_ratio:.2f}×",
            f"heavy requests answered meanwhile: {answered}",
            _targets(self.targets),
        ]
        return "\n".join(lines)


async def run_mix(settings: Settings, inputs: list[BenchInput], requests: int, concurrency: int) -> MixReport:
    settings = with_room_for(settings, "classify", concurrency)
    async with create_service(settings) as service:
        states = await service.warm_up("classify", *HEAVY_TASKS)
        unavailable = [state for state in states if state.state != "ready"]
        if unavailable:
            reasons = "; ".join(f"{state.task}: {state.error or state.state}" for state in unavailable)
            raise ModelUnavailable(f"bench --mix needs all three models ({reasons}); see --weights-dir.")
        alone = await measure_service(service, "classify", inputs, requests, concurrency)
        answered = {task: 0 for task in HEAVY_TASKS}
        stop = asyncio.Event()
        heavy = [
            asyncio.ensure_future(_keep_queued(service, task, inputs, number, stop, answered))
            for task in HEAVY_TASKS
            for number in range(HEAVY_BACKLOG)
        ]
        try:
            # The heavy tasks are on their models before classify's load starts.
            async with asyncio.timeout(HEAVY_START_TIMEOUT_S):
                while not any(service.stats()[task].running for task in HEAVY_TASKS):
                    await asyncio.sleep(0.01)
            mixed = await measure_service(service, "classify", inputs, requests, concurrency)
        finally:
            stop.set()
            for client in heavy:
                client.cancel()
            await asyncio.gather(*heavy, return_exceptions=True)
        runtimes = {task: reported_runtime(service, task, settings.inference_runtime) for task in ("classify", *HEAVY_TASKS)}
        cpu_cores = getattr(service.stats(), "cpu_cores", 0)
    ratio = mixed.p99_ms / alone.p99_ms
    targets = {
        f"classify p99 beside zebra + caption <= {MIX_P99_TARGET:g} x alone": ratio <= MIX_P99_TARGET,
        "no errors": alone.errors == mixed.errors == 0,
    }
    return MixReport(requests, concurrency, cpu_cores, runtimes, alone, mixed, ratio, answered, targets)


async def _keep_queued(
    service: InferenceBackend, task: str, inputs: list[BenchInput], number: int, stop: asyncio.Event,
    answered: dict[str, int],
) -> None:
    """One heavy client: a request of `task` always outstanding until `stop` (cancelling the
    client cancels its request: the service drops it)."""
    turn = number
    while not stop.is_set():
        try:
            await service.submit(task, inputs[turn % len(inputs)].data, user=f"{task}-{number}")
            answered[task] += 1
        except Busy as busy:
            await asyncio.sleep(min(busy.retry_after, 0.5))
        except InferenceError:
            await asyncio.sleep(0.1)
        turn += len(HEAVY_TASKS) * HEAVY_BACKLOG


def _targets(targets: dict[str, bool]) -> str:
    return "targets: " + "; ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in targets.items())

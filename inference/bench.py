"""`python -m inference bench`: the worker queue under load, against a naive baseline.

    python -m inference bench [--task classify] [--requests 64] [--concurrency 16] [--backend ray] [--json]

Two measurements in one run, on the same inputs (the bundled sample photos and phone-size 4000×3000
JPEGs made from them, cycled) with the same decoding, preprocessing and torch thread count:

- the service: `--concurrency` clients, each awaiting one request at a time, through
  `InferenceService` (worker process, dynamic batching), or with `--backend ray` the Ray Serve
  deployments of a local Ray instance (`RAY_ADDRESS`: a cluster's);
- the naive baseline: one request at a time, in this process, batch size 1, run right on the
  event loop — what a bot without a worker queue does.

For each: throughput, p50/p95/p99 latency, and the largest event-loop lag seen while it ran
(a ticker task that sleeps `LAG_TICK_S` and measures how late it wakes up).  The targets of the
issue are checked and printed; the exit status is 0 either way (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from config import Settings
from config.settings import BACKENDS
from inference.errors import InferenceError
from inference.service import TASKS, InferenceBackend
from inference.service.factory import create_service
from inference.service.types import percentile
from inference.tasks import get_task

#: The sample photos bundled with the package (package data), so `bench` works wherever it is installed.
DEFAULT_IMAGES = Path(__file__).resolve().parent / "samples"
PHONE_SIZE = (4000, 3000)
PHONE_JPEG_QUALITY = 90
LAG_TICK_S = 0.005
#: Requests run before measuring, so that first-call costs (allocations, lazy init) are excluded.
WARMUP_REQUESTS = 4


@dataclass(frozen=True)
class BenchInput:
    name: str
    data: bytes
    size: tuple[int, int]


@dataclass(frozen=True)
class RunFigures:
    requests: int
    errors: int
    seconds: float
    throughput: float  # requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_loop_lag_ms: float


@dataclass(frozen=True)
class BenchReport:
    task: str
    requests: int
    concurrency: int
    inputs: list[str]
    #: The core budget (`cpu_cores`): the service's one task gets all of it, so does the baseline.
    cpu_cores: int
    max_batch_size: int
    max_batch_wait_ms: float
    service: RunFigures
    baseline: RunFigures
    #: service throughput ÷ baseline throughput
    speedup: float
    #: 2 × concurrency ÷ service throughput, in ms: the p99 target
    p99_limit_ms: float
    batch_sizes: dict[int, int]
    targets: dict[str, bool]
    #: What ran the model: the runtime its worker reports (INFERENCE_RUNTIME until it reports one).
    runtime: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --- the command ----------------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="measure the worker queue against a naive baseline")
    parser.add_argument("--task", choices=TASKS, default="classify", help="which model (default classify)")
    parser.add_argument("--requests", type=positive_count, default=64, help="requests per run (default 64)")
    parser.add_argument("--concurrency", type=positive_count, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of JPEG photos")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--backend", choices=BACKENDS, default=None, help="the service's backend (default INFERENCE_BACKEND: local)"
    )
    from inference.bench_modes import add_runtime_arguments  # on use: that module builds on this one

    add_runtime_arguments(parser)  # --runtime, --compare-runtime, --mix
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace, settings: Settings) -> int:
    inputs = bench_inputs(args.images)
    if args.backend is not None:  # the same load through worker processes or Ray Serve
        settings = settings.replace(inference_backend=args.backend)
    from inference.bench_modes import run_mode, with_runtime

    settings = with_runtime(settings, args)
    if args.compare_runtime or args.mix:
        return run_mode(args, settings, inputs)
    report = asyncio.run(run_bench(settings, args.task, inputs, args.requests, args.concurrency))
    print(report.to_json() if args.json else format_report(report))
    return 0



def positive_count(text: str) -> int:
    """argparse `type` of a count: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# --- inputs -----------------------------------------------------------------------------------------


def bench_inputs(folder: Path) -> list[BenchInput]:
    """Every JPEG photo of `folder`, each followed by a phone-size 4000×3000 version of it."""
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")) if folder.is_dir() else []
    if not photos:
        raise InferenceError(f"No JPEG photos in {folder} to benchmark with (use --images DIR).")
    inputs = []
    for path in photos:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            inputs.append(BenchInput(path.name, data, size))
            inputs.append(phone_size_jpeg(image, path.stem))
    return inputs


def phone_size_jpeg(image: Image.Image, stem: str) -> BenchInput:
    size = PHONE_SIZE if image.width >= image.height else PHONE_SIZE[::-1]
    large = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    large.save(buffer, format="JPEG", quality=PHONE_JPEG_QUALITY)
    return BenchInput(f"{stem}-{size[0]}x{size[1]}.jpg", buffer.getvalue(), size)


# --- measuring --------------------------------------------------------------------------------------


class LoopLagMonitor:
    """A ticker on the event loop: how late does a short sleep wake up, at worst?"""

    def __init__(self, tick_s: float = LAG_TICK_S) -> None:
        self.tick_s = tick_s
        self.max_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self.max_lag_s = max(self.max_lag_s, time.perf_counter() - before - self.tick_s)


def figures(latencies: list[float], errors: int, seconds: float, max_lag_s: float) -> RunFigures:
    done = latencies or [math.nan]
    return RunFigures(
        requests=len(latencies) + errors,
        errors=errors,
        seconds=seconds,
        throughput=len(latencies) / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(done, 0.50) * 1000,
        p95_ms=percentile(done, 0.95) * 1000,
        p99_ms=percentile(done, 0.99) * 1000,
        max_loop_lag_ms=max_lag_s * 1000,
    )


async def call_task(service: InferenceBackend, task: str, data: bytes, user: object) -> Any:
    return await service.submit(task, data, user=user)


async def measure_service(
    service: InferenceBackend, task: str, inputs: list[BenchInput], requests: int, concurrency: int
) -> RunFigures:
    await service.warm_up(task)
    # One full-size burst first: the worker's first batches allocate what later ones reuse.
    await asyncio.gather(
        *(call_task(service, task, inputs[i % len(inputs)].data, None) for i in range(concurrency)),
        return_exceptions=True,
    )
    numbers = iter(range(requests))
    latencies: list[float] = []
    errors = 0

    async def client(client_id: int) -> None:
        nonlocal errors
        for number in numbers:  # shared iterator: each request is taken by exactly one client
            data = inputs[number % len(inputs)].data
            started = time.perf_counter()
            try:
                await call_task(service, task, data, f"client-{client_id}")
            except InferenceError:
                errors += 1
            else:
                latencies.append(time.perf_counter() - started)

    async with LoopLagMonitor() as monitor:
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    return figures(latencies, errors, seconds, monitor.max_lag_s)


class NaiveBaseline:
    """One request at a time, in this process, batch size 1, on the event loop: the naive bot."""

    def __init__(self, settings: Settings, task: str, inputs: list[BenchInput]) -> None:
        import torch

        from inference.images import ImageLimits
        from inference.registry import load_pipeline, resolve_device
        from inference.worker import worker_threads

        torch.set_num_threads(worker_threads(settings.cpu_cores))  # as many as the worker gets
        self.pipeline = load_pipeline(task, settings, resolve_device(settings.device))
        self.limits = ImageLimits.from_settings(settings)
        self.inputs = inputs
        self._next_inputs = itertools.cycle(inputs)
        self.latencies: list[float] = []
        self.errors = 0
        self.seconds = 0.0
        self.max_lag_s = 0.0

    def handle(self, data: bytes) -> Any:
        from inference.images import decode_image

        image = decode_image(data, self.limits, draft_size=self.pipeline.draft_size)
        return self.pipeline.run([self.pipeline.preprocess(image)], [{}])[0]

    def warm_up(self) -> None:
        for item in self.inputs[:WARMUP_REQUESTS]:
            self.handle(item.data)

    async def measure(self, requests: int) -> None:
        """Run `requests` more requests (the inputs in turn); the figures add up over calls."""
        async with LoopLagMonitor() as monitor:
            started = time.perf_counter()
            for item in itertools.islice(self._next_inputs, requests):
                began = time.perf_counter()
                try:
                    self.handle(item.data)
                except InferenceError:
                    self.errors += 1
                else:
                    self.latencies.append(time.perf_counter() - began)
                await asyncio.sleep(0)  # lets the ticker see how long the loop was blocked
            self.seconds += time.perf_counter() - started
        self.max_lag_s = max(self.max_lag_s, monitor.max_lag_s)

    def figures(self) -> RunFigures:
        return figures(self.latencies, self.errors, self.seconds, self.max_lag_s)


async def run_bench(
    settings: Settings, task: str, inputs: list[BenchInput], requests: int, concurrency: int
) -> BenchReport:
    from inference.bench_modes import reported_runtime
    from inference.worker import worker_threads

    naive = NaiveBaseline(settings, task, inputs)
    naive.warm_up()
    # The baseline runs half before and half after the service, so that a change in the
    # machine's load during the run weighs on both alike.
    await naive.measure(requests // 2)
    async with create_service(with_room_for(settings, task, concurrency)) as service:
        result = await measure_service(service, task, inputs, requests, concurrency)
        stats = service.stats()[task]
        runtime = reported_runtime(service, task, settings.inference_runtime)
    await naive.measure(requests - requests // 2)
    baseline = naive.figures()
    speedup = result.throughput / baseline.throughput
    p99_limit_ms = 2 * concurrency / result.throughput * 1000
    return BenchReport(
        task=task,
        requests=requests,
        concurrency=concurrency,
        inputs=[f"{item.name} ({item.size[0]}×{item.size[1]}, {len(item.data) / 1e6:.2f} MB)" for item in inputs],
        cpu_cores=worker_threads(settings.cpu_cores),
        max_batch_size=settings.max_batch_size,
        max_batch_wait_ms=settings.max_batch_wait_ms,
        service=result,
        baseline=baseline,
        speedup=speedup,
        p99_limit_ms=p99_limit_ms,
        batch_sizes=stats.batch_sizes,
        targets={
            "throughput >= 1.1 x baseline": speedup >= 1.1,
            "max loop lag <= 50 ms": result.max_loop_lag_ms <= 50.0,
            "p99 <= 2 x concurrency / throughput": result.p99_ms <= p99_limit_ms,
            "no errors": result.errors == 0,
        },
        runtime=runtime,
    )


def with_room_for(settings: Settings, task: str, concurrency: int) -> Settings:
    """The settings with the task's queue limit raised to at least `concurrency`: the bench
    measures how fast the queue drains, not how it refuses (a zebra queue of 16 under 32
    clients would answer half of them `Busy`)."""
    field = get_task(task).queue_limit_setting
    return settings.replace(**{field: max(getattr(settings, field), concurrency)})


def format_report(report: BenchReport) -> str:
    lines = [
        f"bench {report.task}: {report.requests} requests, concurrency {report.concurrency}, "
        f"{report.cpu_cores} cores, batches of up to {report.max_batch_size} "
        f"(wait {report.max_batch_wait_ms:g} ms), runtime {report.runtime or '?'}",
        "inputs: " + "; ".join(report.inputs),
        "",
        f"{'':16}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max loop lag ms':>17}{'errors':>8}",
    ]
    for label, run in (("service", report.service), ("naive baseline", report.baseline)):
        lines.append(
            f"{label:16}{run.throughput:8.2f}{run.p50_ms:9.1f}{run.p95_ms:9.1f}{run.p99_ms:9.1f}"
            f"{run.max_loop_lag_ms:17.1f}{run.errors:8d}"
        )
    lines += [
        "",
        f"service / baseline throughput: {report.speedup:.2f}×",
        f"model batch sizes (size: count): {report.batch_sizes}",
        f"p99 limit (2 × concurrency / throughput): {report.p99_limit_ms:.0f} ms",
        "targets: " + "; ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in report.targets.items()),
    ]
    return "\n".join(lines)

"""One task's waiting line and its dispatcher: which request goes to the worker next.

Requests wait in a `DynamicBatcher` (turns between users, the batch window) and leave it as
batches.  Each worker gets at most `MAX_BATCHES_IN_FLIGHT` batches: one on the model and the next
one already in the worker, so the model never waits for the pipe.  The worker says when it takes
a batch up (`Started`); until then its requests still count as waiting (their position, `Busy`),
and a cancellation still spares the model.  A batch leaves the line only with its grant of the
service's core budget (`cores`), which it holds until the worker is done with it.  The worker
process itself is the supervisor's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from config import Settings
from inference.batching import BatchPolicy, DynamicBatcher
from inference.errors import InferenceError
from inference.service.cores import CoreBudget, Grant
from inference.service.lanes import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, Lane, Request
from inference.service.supervisor import STALL_GRACE_S, WorkerSupervisor, background_task, worker_clock
from inference.service.types import ModelState, MissingWeights, TaskStats
from inference.tasks import TaskSpec
from inference.worker import Batch, Cancel, Results, Started, Unsendable, WorkerHandle, WorkItem, worker_threads

#: Batches handed to one worker at a time: one on the model, one being decoded beside it.
MAX_BATCHES_IN_FLIGHT = 2

# The retry bounds and `Request` live in `lanes` (both backends' lanes use them); they are
# named here too, where the local lane's readers and tests look for them.
__all__ = ["MAX_BATCHES_IN_FLIGHT", "MAX_RETRY_AFTER_S", "MIN_RETRY_AFTER_S", "InFlight", "Request", "TaskLane"]

_MB = 1024 * 1024


@dataclass(eq=False)
class InFlight:
    """A batch handed to the worker; its times are on `worker_clock`."""

    requests: dict[int, Request]
    sent_at: float
    size: int
    #: The latest deadline among its requests: past it (and a grace), the batch is hung.
    deadline: float
    started_at: float | None = None
    #: Its threads out of the service's core budget, held until the worker is done with it.
    grant: Grant | None = None


class TaskLane(Lane):
    """One task's waiting line, its dispatcher and its counters; its worker's supervisor.
    The counting it shares with Ray's lane is `lanes.Lane`'s."""

    def __init__(
        self, settings: Settings, spec: TaskSpec, loop: asyncio.AbstractEventLoop, cores: CoreBudget | None = None
    ) -> None:
        super().__init__(settings, spec, loop)
        #: Shared by the service's lanes; a lane on its own has the whole budget to itself.
        self.cores = cores if cores is not None else CoreBudget(worker_threads(settings.cpu_cores), [self.task])
        self.cores.register(self.task, self.has_work)
        # Until a worker says otherwise, assume the CPU: the policy that batches least.
        device_type = settings.device.split(":")[0] if settings.device != "auto" else "cpu"
        self.batcher: DynamicBatcher[Request] = DynamicBatcher(
            self._batch_policy(device_type),
            self.loop.time,
            turn_key=_request_user if settings.queue_turns else None,
        )
        self.in_flight: dict[int, InFlight] = {}
        #: Model batch size → how many batches of that size ran.
        self.batch_sizes: Counter[int] = Counter()
        self.supervisor = WorkerSupervisor(settings, spec, loop, self)
        self._batch_ids = itertools.count(1)
        self._slot_freed = asyncio.Event()
        self._last_batch_done = 0.0
        self._dispatcher: asyncio.Task[None] | None = None

    def _batch_policy(self, device_type: str) -> BatchPolicy:
        wait_s = max(0.0, self.settings.max_batch_wait_ms) / 1000.0
        return BatchPolicy(self.spec.max_batch_size(self.settings, device_type), wait_s)

    # -- the waiting line ---------------------------------------------------------------------

    def waiting(self) -> int:
        """Requests in line: here, or in the worker but not taken up yet."""
        return len(self.batcher) + self._count("sent")

    def running(self) -> int:
        return self._count("running")

    def has_work(self) -> bool:
        """Requests waiting or running: the task counts in the split of the core budget."""
        return bool(len(self.batcher) or self.in_flight)

    def enqueue(self, request: Request) -> None:
        self.batcher.put(request)
        if self._dispatcher is None:
            name = f"inference-{self.task}-dispatch"
            self._dispatcher = background_task(self.loop, self._dispatch_while_waiting(), name)

    def position(self, request: Request) -> int:
        if request.phase == "sent":  # behind the other not-started requests sent before it
            ahead = 0
            for flight in self.in_flight.values():
                for other in flight.requests.values():
                    if other is request:
                        return ahead
                    ahead += other.phase == "sent"
            return ahead
        if request.phase == "waiting":
            position = self.batcher.position(request)
            return self._count("sent") + (0 if position is None else position)
        return 0

    def forget(self, request: Request) -> None:
        """The request's future is done: take it out of the line, or tell the worker to skip it."""
        if request.future.cancelled():
            self.counts.cancelled += 1
        if request.phase == "waiting":
            self.batcher.remove(request)
        elif request.phase in ("sent", "running"):
            # Still in the worker (cancelled, timed out, closing): skip it if not started yet.
            if self.supervisor.worker is not None:
                self.supervisor.worker.send(Cancel([request.id]))
        request.phase = "done"

    def _count(self, phase: str) -> int:
        return sum(r.phase == phase for flight in self.in_flight.values() for r in flight.requests.values())

    # -- dispatching ----------------------------------------------------------------------------

    async def _dispatch_while_waiting(self) -> None:
        """The dispatcher exists only while requests wait: it ends when the line is empty, and
        the next `enqueue` starts another (an idle service holds no task of its own)."""
        try:
            await self._dispatch_batches()
        finally:
            self._dispatcher = None  # no await since the line was seen empty: none is missed

    async def _dispatch_batches(self) -> None:
        while len(self.batcher):
            try:
                worker = await self.supervisor.ensure_worker()
            except InferenceError as error:  # logged; the waiting requests fail (and the line ends)
                self.fail_waiting(error)
                continue
            while len(self.in_flight) >= MAX_BATCHES_IN_FLIGHT:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            # Cores first, then the batch: requests keep their place (and their free
            # cancellation) in the line while the cores are busy, and the batch grows meanwhile.
            grant = await self.cores.acquire(self.task)
            try:
                batch = await self.batcher.next_batch() if len(self.batcher) else []
            except BaseException:
                self.cores.release(grant)
                raise
            for request in batch:  # done, its bookkeeping callback not run yet (a dropped ticket)
                if request.future.done():
                    request.phase = "done"
            batch = [request for request in batch if request.phase != "done"]
            if not batch or worker is not self.supervisor.worker:
                self.cores.release(grant)
                if batch:  # it crashed while the batch formed: start another
                    self.batcher.put_back(batch)
                continue
            self._dispatch(worker, batch, grant)

    def _dispatch(self, worker: WorkerHandle, batch: list[Request], grant: Grant) -> None:
        batch_id = next(self._batch_ids)
        for request in batch:
            request.phase = "sent"
        # Requests' deadlines are on the loop's clock; the batch's, on the worker's.
        sent_at = worker_clock()
        deadline = sent_at + max(request.deadline for request in batch) - self.loop.time()
        self.in_flight[batch_id] = InFlight({r.id: r for r in batch}, sent_at, len(batch), deadline, grant=grant)
        worker.send(Batch(batch_id, [WorkItem(r.id, r.image, r.options) for r in batch], grant.threads))
        for request in batch:
            request.image = b""  # the message holds the bytes until the writer thread sent them
        self.counts.dispatched += len(batch)

    # -- what the supervisor tells (`WorkerListener`, on the loop) ------------------------------

    def on_worker_message(self, message: Any) -> None:
        if isinstance(message, Started):
            flight = self.in_flight.get(message.batch_id)
            if flight is not None:
                flight.started_at = worker_clock()
                for request in flight.requests.values():
                    if request.phase == "sent":
                        request.phase = "running"
        elif isinstance(message, Results):
            self._on_results(message)
        elif isinstance(message, Unsendable):
            flight = self.in_flight.pop(message.batch_id, None) if message.batch_id is not None else None
            if flight is not None:
                error = InferenceError(f"That request could not be sent to the {self.task} model ({message.reason}).")
                self._fail_requests(flight.requests.values(), error)
                self._finished(flight)

    def on_worker_lost(self, error: InferenceError, fail_waiting: bool) -> None:
        if fail_waiting:
            self.fail_waiting(error)
        self._fail_requests(self.running_requests(), error)
        self._clear_in_flight()

    def on_device(self, device_type: str) -> None:
        self.batcher.policy = self._batch_policy(device_type)

    def hang_deadline(self) -> float | None:
        # The oldest batch is the one the worker works on (or should have taken up).
        oldest = next(iter(self.in_flight.values()), None)
        if oldest is None:
            return None
        return max(oldest.deadline, oldest.started_at or oldest.sent_at) + STALL_GRACE_S

    def _on_results(self, message: Results) -> None:
        flight = self.in_flight.get(message.batch_id)
        if flight is None:
            return
        for outcome in message.outcomes:
            request = flight.requests.pop(outcome.request_id, None)
            if request is None or request.future.done():
                continue
            request.phase = "done"
            if outcome.error is not None:
                self.fail(request, outcome.error)
            else:
                self.answer(request, outcome.value)
        if message.model_batch:
            self.batch_sizes[message.model_batch] += 1
            self.counts.ran += message.model_batch
            self.counts.model_seconds += message.model_seconds
        if message.final:
            self.counts.skipped_in_worker += message.skipped
            del self.in_flight[message.batch_id]
            # The worker owes no more answers.
            self._fail_requests(flight.requests.values(), InferenceError(f"The {self.task} model returned no result."))
            self.learn_speed(flight.sent_at, flight.size, worker_clock())
            self._finished(flight)

    def _finished(self, flight: InFlight) -> None:
        """The worker is done with a batch: its slot and its cores are free."""
        if flight.grant is not None:
            self.cores.release(flight.grant)
        self._slot_freed.set()

    def _clear_in_flight(self) -> None:
        flights = list(self.in_flight.values())
        self.in_flight.clear()
        for flight in flights:
            self._finished(flight)

    def learn_speed(self, sent_at: float, size: int, now: float) -> None:
        """A batch of `size` sent at `sent_at` finished `now`: the time the worker spent on it
        (from when it was free for it) per request, smoothed."""
        busy_since = max(sent_at, self._last_batch_done)
        self._last_batch_done = now
        self._add_speed_sample((now - busy_since) / max(1, size))

    # -- failing and stopping -------------------------------------------------------------------

    def _fail_requests(self, requests: Iterable[Request], error: InferenceError) -> None:
        for request in list(requests):
            if not request.future.done():
                request.phase = "done"  # the worker has no copy left to cancel
                self.fail(request, error)

    def fail_waiting(self, error: InferenceError) -> None:
        for request in self.batcher:
            self.fail(request, error)
            self.batcher.remove(request)
            request.phase = "done"

    def running_requests(self) -> list[Request]:
        return [request for flight in self.in_flight.values() for request in flight.requests.values()]

    def stop_dispatching(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()

    async def stop_worker(self) -> None:
        await self.supervisor.stop()
        self._clear_in_flight()

    # -- observation ----------------------------------------------------------------------------

    def model_state(self, missing: tuple[MissingWeights, ...] = ()) -> ModelState:
        return dataclasses.replace(self.supervisor.model_state(), missing=missing)

    def stats(self) -> TaskStats:
        supervisor = self.supervisor
        return dataclasses.replace(
            super().stats(),
            batch_sizes=dict(sorted(self.batch_sizes.items())),
            worker_starts=supervisor.starts,
            worker_crashes=supervisor.crashes,
            worker_pid=supervisor.worker.pid if supervisor.worker is not None else None,
            threads=self.cores.held(self.task),
            worker_startup_s=supervisor.startup_s,
            worker_memory_mb=None if supervisor.memory_bytes is None else supervisor.memory_bytes / _MB,
            worker_peak_memory_mb=supervisor.peak_memory_bytes / _MB if supervisor.peak_memory_bytes else None,
            worker_memory_need_mb=None if supervisor.memory_need_bytes is None else supervisor.memory_need_bytes / _MB,
            worker_memory_ceiling_mb=supervisor.memory_ceiling_mb(),
        )


def _request_user(request: Request) -> Hashable:
    return request.user

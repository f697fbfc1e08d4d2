"""The inference worker queue: an async API in front of one worker process per model.

    async with InferenceService(settings) as service:
        predictions = await service.classify(image_bytes, user=author_id, top=5)
        ticket = service.submit("zebra", image_bytes, user=author_id)   # Busy at once if full
        print(ticket.position())                                        # "you're #3 in line"
        png = await ticket

Everything a caller touches lives on the event loop of this (the main) process: per-task waiting
lines with dynamic batching (`inference.batching`), per-user caps, deadlines, cancellation, the
`Busy` answer with a retry hint.  The models live in worker processes (`inference.worker`), one
per task, started on the task's first request and started again after a crash, so a slow,
crashing or out-of-memory model never stalls or takes down the process with the event loop.

Each worker gets at most `MAX_BATCHES_IN_FLIGHT` batches: one on the model and the next one
already in the worker, so the model never waits for the pipe, while everything else still waits
here, where it can be cancelled, timed out, counted and shown its position.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections import Counter
from collections.abc import Generator, Hashable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from config import Settings
from inference.batching import BatchPolicy, DynamicBatcher
from inference.errors import (
    Busy,
    InferenceError,
    InvalidImage,
    ModelUnavailable,
    RequestTimeout,
    ServiceClosed,
    WorkerCrashed,
)
from inference.worker import Batch, Cancel, Load, Results, StateReport, WorkerHandle, WorkItem

if TYPE_CHECKING:  # the main process needs no torch: only the workers import it
    from inference.pipeline import Prediction

logger = logging.getLogger(__name__)

#: The same names as `inference.registry.TASKS` (which imports torch; this module does not).
TASKS = ("classify", "zebra", "caption")

#: Batches handed to one worker at a time: one on the model, one being decoded beside it.
MAX_BATCHES_IN_FLIGHT = 2

#: The bounds of the `Busy.retry_after` hint, seconds.
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class ModelState:
    task: str
    #: The model's name: the configured one until the worker reports what it loaded.
    model: str
    #: "idle" (not loaded) | "loading" | "ready" | "unavailable"
    state: str
    #: Why it is unavailable, or what happened last (a crash); "" otherwise.
    detail: str = ""


@dataclass(frozen=True)
class TaskStats:
    """Counters of one task since the service started (a snapshot)."""

    task: str
    waiting: int
    in_flight: int
    submitted: int
    #: Refused with `Busy` (queue full or the user's cap).
    rejected: int
    #: Sent to the worker process.
    dispatched: int
    #: Went through the model (the sum of `batch_sizes`).
    ran: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    #: Dispatched but dropped by the worker before the model because the caller had gone.
    skipped_in_worker: int
    #: Model batch size → how many batches of that size ran.
    batch_sizes: dict[int, int]
    #: Seconds the worker spent in the model (decoding and preprocessing not included).
    model_seconds: float
    worker_starts: int
    worker_crashes: int
    worker_pid: int | None


@dataclass(frozen=True)
class ServiceStats:
    tasks: dict[str, TaskStats]

    def __getitem__(self, task: str) -> TaskStats:
        return self.tasks[task]


@dataclass
class _Counters:
    submitted: int = 0
    rejected: int = 0
    dispatched: int = 0
    ran: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    skipped_in_worker: int = 0
    worker_starts: int = 0
    worker_crashes: int = 0
    model_seconds: float = 0.0
    batch_sizes: Counter[int] = field(default_factory=Counter)


@dataclass(eq=False)
class _Request:
    id: int
    task: str
    image: bytes
    options: dict[str, Any]
    user: Hashable | None
    future: asyncio.Future[Any]
    enqueued_at: float
    timeout_s: float
    timer: asyncio.TimerHandle | None = None
    #: "waiting" (here, cancellable for free) → "running" (sent to the worker) → "done".
    phase: str = "waiting"


@dataclass(eq=False)
class _InFlight:
    requests: dict[int, _Request]
    sent_at: float
    size: int


class Ticket:
    """One submitted request: await it for the result; ask its position; cancel it.

    A ticket dropped without being awaited cancels its request, like a caller going away.
    """

    def __init__(self, request: _Request, lane: _TaskLane | None, loop: asyncio.AbstractEventLoop) -> None:
        self._request = request
        self._lane = lane
        finalizer = weakref.finalize(self, _cancel_abandoned, loop, request.future)
        finalizer.atexit = False

    @property
    def task(self) -> str:
        return self._request.task

    def position(self) -> int:
        """How many requests are ahead of this one in line (0: running or next)."""
        if self._lane is None or self._request.phase != "waiting":
            return 0
        return self._lane.position(self._request)

    def done(self) -> bool:
        return self._request.future.done()

    def cancel(self) -> None:
        """Drop the request; if it has not started, it never costs model time."""
        self._request.future.cancel()

    def __await__(self) -> Generator[Any, None, Any]:
        # A generator that keeps `self` alive while awaited (see the finalizer above).
        return (yield from self._request.future.__await__())


def _cancel_abandoned(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
    # Runs wherever the garbage collector ran: hand the cancellation to the loop's thread.
    if not future.done():
        try:
            loop.call_soon_threadsafe(future.cancel)
        except RuntimeError:  # the loop is closed
            pass


class InferenceService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lanes: dict[str, _TaskLane] = {}
        self._pending_by_user: Counter[Hashable] = Counter()
        self._request_ids = itertools.count(1)
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Cheap: worker processes start on their task's first request (or `warm_up`)."""
        if self._closed:
            raise ServiceClosed("The inference service has been closed.")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._lanes = {task: _TaskLane(self.settings, task, self._loop) for task in TASKS}

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Refuse new requests, fail the waiting ones with `ServiceClosed`, give the running
        ones `grace_s` to finish (then fail them too) and stop the workers.  Idempotent."""
        if self._closing is None:
            self._closed = True
            if self._loop is None:
                return
            self._closing = asyncio.ensure_future(self._shut_down(grace_s))
        await asyncio.shield(self._closing)

    async def __aenter__(self) -> InferenceService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def warm_up(self, *tasks: str) -> list[ModelState]:
        """Start the workers of `tasks` (default: all) and load their models now; returns their
        states once each is ready or unavailable (bound the wait with `asyncio.wait_for`)."""
        self._check_open()
        lanes = [self._lane(task) for task in (tasks or TASKS)]
        await asyncio.gather(*(lane.warm_up() for lane in lanes))
        return [lane.model_state() for lane in lanes]

    # -- requests ------------------------------------------------------------------------------

    def submit(
        self, task: str, image: bytes, *, user: Hashable | None = None, timeout: float | None = None, **options: Any
    ) -> Ticket:
        """Queue a request and return its ticket at once.

        Raises `Busy` when the queue is full or `user` already has
        `max_pending_per_user` requests waiting or running, `ServiceClosed` after `close()`.
        `timeout` (seconds, default `request_timeout_s`) bounds the wait for the result.
        """
        self._check_open()
        lane = self._lane(task)
        loop = self._loop
        assert loop is not None
        if user is not None and self._pending_by_user[user] >= self.settings.max_pending_per_user:
            lane.counters.rejected += 1
            count = self._pending_by_user[user]
            raise Busy(
                f"You already have {count} request{'s' if count != 1 else ''} in progress; "
                "wait for one to finish.",
                lane.retry_after(),
            )
        if self.waiting() >= self.settings.max_queue_size:
            lane.counters.rejected += 1
            raise Busy("The models are busy right now; try again in a moment.", lane.retry_after())

        timeout_s = self.settings.request_timeout_s if timeout is None else float(timeout)
        request = _Request(
            id=next(self._request_ids),
            task=task,
            image=bytes(image),
            options=options,
            user=user,
            future=loop.create_future(),
            enqueued_at=loop.time(),
            timeout_s=timeout_s,
        )
        lane.counters.submitted += 1
        if user is not None:
            self._pending_by_user[user] += 1
        request.future.add_done_callback(lambda _: self._finish(request))
        if len(request.image) > self.settings.max_image_bytes:
            # Refused here, so that an oversized upload is not even copied to the worker.
            request.phase = "done"
            request.future.set_exception(
                InvalidImage(
                    f"That file is too large ({len(request.image) / 2**20:.1f} MB); "
                    f"the limit is {self.settings.max_image_bytes / 2**20:.1f} MB."
                )
            )
            return Ticket(request, None, loop)
        request.timer = loop.call_later(timeout_s, lane.expire, request)
        lane.enqueue(request)
        return Ticket(request, lane, loop)

    async def classify(self, image: bytes, *, user: Hashable | None = None, top: int = 5) -> list[Prediction]:
        if top < 1:
            raise ValueError(f"top must be at least 1, not {top}")
        return await self.submit("classify", image, user=user, top=top)

    async def zebra(self, image: bytes, *, user: Hashable | None = None) -> bytes:
        """The photo with its horses turned into zebras, as PNG bytes."""
        return await self.submit("zebra", image, user=user)

    async def caption(self, image: bytes, *, user: Hashable | None = None, beam: int | None = None) -> str:
        options = {} if beam is None else {"beam": beam}
        return await self.submit("caption", image, user=user, **options)

    # -- observation ----------------------------------------------------------------------------

    def models(self) -> list[ModelState]:
        if not self._lanes:
            return [ModelState(task, _configured_model(task, self.settings), "idle") for task in TASKS]
        return [lane.model_state() for lane in self._lanes.values()]

    def waiting(self) -> int:
        """Requests waiting (not yet sent to a worker), all tasks together."""
        return sum(len(lane.batcher) for lane in self._lanes.values())

    def pending_for(self, user: Hashable) -> int:
        """Requests of `user` waiting or running."""
        return self._pending_by_user.get(user, 0)

    def stats(self) -> ServiceStats:
        return ServiceStats({task: lane.stats() for task, lane in self._lanes.items()})

    # -- internals --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosed("The models are shutting down; try again in a minute.")
        if self._loop is None:
            raise ServiceClosed("The inference service has not been started.")

    def _lane(self, task: str) -> _TaskLane:
        try:
            return self._lanes[task]
        except KeyError:
            raise ModelUnavailable(f"Unknown task {task!r}; known: {', '.join(TASKS)}.") from None

    def _finish(self, request: _Request) -> None:
        """Bookkeeping once a request's future is done, however it got there."""
        if request.timer is not None:
            request.timer.cancel()
        if request.user is not None:
            self._pending_by_user[request.user] -= 1
            if self._pending_by_user[request.user] <= 0:
                del self._pending_by_user[request.user]
        lane = self._lanes.get(request.task)
        if lane is not None:
            lane.forget(request)
        request.image = b""

    async def _shut_down(self, grace_s: float) -> None:
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.stop_dispatching()
        for lane in lanes:
            lane.fail_waiting(ServiceClosed("The models are shutting down; try again in a minute."))
        running = [request.future for lane in lanes for request in lane.running_requests()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        for lane in lanes:
            lane.fail_running(ServiceClosed("The models shut down before your request finished; try again in a minute."))
        await asyncio.gather(*(lane.stop_worker() for lane in lanes))


def _configured_model(task: str, settings: Settings) -> str:
    return {"classify": settings.classifier, "zebra": settings.zebra_model, "caption": "fc"}.get(task, task)


class _TaskLane:
    """One task's waiting line, its dispatcher and its worker process."""

    def __init__(self, settings: Settings, task: str, loop: asyncio.AbstractEventLoop) -> None:
        self.task = task
        self.settings = settings
        self.loop = loop
        self.batcher: DynamicBatcher[_Request] = DynamicBatcher(
            BatchPolicy(max(1, self.settings.max_batch_size), max(0.0, self.settings.max_batch_wait_ms) / 1000.0),
            self.loop.time,
        )
        self.in_flight: dict[int, _InFlight] = {}
        self.counters = _Counters()
        self.worker: WorkerHandle | None = None
        self.model = _configured_model(task, self.settings)
        self.state = "idle"
        self.detail = ""
        self._batch_ids = itertools.count(1)
        self._slot_freed = asyncio.Event()
        self._worker_lock = asyncio.Lock()
        self._state_waiters: list[asyncio.Future[None]] = []
        #: Seconds of worker time per request, smoothed; guides the `Busy` retry hint.
        self._seconds_per_request: float | None = None
        self._last_batch_done = 0.0
        self._dispatcher: asyncio.Task[None] | None = None

    # -- the waiting line -------------------------------------------------------------------

    def enqueue(self, request: _Request) -> None:
        self.batcher.put(request)
        if self._dispatcher is None:
            self._dispatcher = self.loop.create_task(self._dispatch_forever(), name=f"inference-{self.task}-dispatch")

    def position(self, request: _Request) -> int:
        position = self.batcher.position(request)
        return 0 if position is None else position

    def expire(self, request: _Request) -> None:
        if not request.future.done():
            self.counters.timed_out += 1
            seconds = f"{request.timeout_s:g}"
            request.future.set_exception(
                RequestTimeout(f"No result within {seconds} seconds: the {self.task} model is too busy; try again later.")
            )

    def forget(self, request: _Request) -> None:
        """The request's future is done: take it out of the line, or tell the worker to skip it."""
        if request.future.cancelled():
            self.counters.cancelled += 1
        if request.phase == "waiting":
            self.batcher.remove(request)
        elif request.phase == "running":
            # Still in the worker (cancelled, timed out, closing): skip it if not started yet.
            if self.worker is not None:
                self.worker.send(Cancel([request.id]))
        request.phase = "done"

    def retry_after(self) -> float:
        per_request = self._seconds_per_request or 1.0
        backlog = len(self.batcher) + sum(len(flight.requests) for flight in self.in_flight.values()) + 1
        return round(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, per_request * backlog)), 1)

    # -- dispatching ---------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            await self.batcher.wait_for_items()
            try:
                worker = await self._ensure_worker()
            except Exception:  # logged, and the waiting requests failed: wait for new ones
                continue
            while len(self.in_flight) >= MAX_BATCHES_IN_FLIGHT:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            batch = await self.batcher.next_batch()
            if not batch:
                continue
            if worker is not self.worker:  # it crashed while the batch formed: start another
                self.batcher.put_back(batch)
                continue
            self._dispatch(worker, batch)

    def _dispatch(self, worker: WorkerHandle, batch: list[_Request]) -> None:
        batch_id = next(self._batch_ids)
        for request in batch:
            request.phase = "running"
        self.in_flight[batch_id] = _InFlight({r.id: r for r in batch}, self.loop.time(), len(batch))
        worker.send(Batch(batch_id, [WorkItem(r.id, r.image, r.options) for r in batch]))
        for request in batch:
            request.image = b""  # the message holds the bytes until the writer thread sent them
        self.counters.dispatched += len(batch)
        # A batch that outlives every deadline in it means a hung model: restart the worker.
        self.loop.call_later(self.settings.request_timeout_s + 1.0, self._check_stalled, worker, batch_id)

    async def _ensure_worker(self) -> WorkerHandle:
        async with self._worker_lock:
            if self.worker is None:
                worker = WorkerHandle(self.task, self.settings, self.loop, self._on_message, self._on_exit)
                self.worker = worker
                self.counters.worker_starts += 1
                try:
                    await self.loop.run_in_executor(None, worker.start)
                except Exception as error:
                    logger.exception("could not start the %s worker", self.task)
                    self.worker = None
                    self.fail_waiting(WorkerCrashed(f"The {self.task} model could not be started ({error})."))
                    raise
            return self.worker

    def _check_stalled(self, worker: WorkerHandle, batch_id: int) -> None:
        if worker is not self.worker or batch_id not in self.in_flight:
            return
        if self.state == "loading":  # first load (maybe a download): not a hang
            self.loop.call_later(self.settings.request_timeout_s, self._check_stalled, worker, batch_id)
            return
        logger.warning("the %s worker has not finished a batch in %.0f s: restarting it", self.task, self.settings.request_timeout_s)
        worker.kill()

    async def warm_up(self) -> None:
        worker = await self._ensure_worker()
        if self.state == "ready":
            return
        settled = self.loop.create_future()
        self._state_waiters.append(settled)
        worker.send(Load())
        await settled  # ready, unavailable, or the process died; a first download may take long

    # -- messages from the worker (on the loop) --------------------------------------------------

    def _on_message(self, worker: WorkerHandle, message: Any) -> None:
        if worker is not self.worker:
            return  # from a worker that has since been replaced
        if isinstance(message, StateReport):
            self.state = message.state
            self.detail = message.detail
            if message.model:
                self.model = message.model
            if message.state != "loading":
                self._settle_state_waiters()
        elif isinstance(message, Results):
            self._on_results(message)

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
                self.counters.failed += 1
                request.future.set_exception(outcome.error)
            else:
                self.counters.completed += 1
                request.future.set_result(outcome.value)
        if message.model_batch:
            self.counters.batch_sizes[message.model_batch] += 1
            self.counters.ran += message.model_batch
            self.counters.model_seconds += message.model_seconds
        if message.final:
            self.counters.skipped_in_worker += message.skipped
            del self.in_flight[message.batch_id]
            for request in flight.requests.values():  # the worker owes no more answers
                if not request.future.done():
                    request.phase = "done"
                    request.future.set_exception(InferenceError(f"The {self.task} model returned no result."))
            self._learn_speed(flight)
            self._slot_freed.set()

    def _learn_speed(self, flight: _InFlight) -> None:
        now = self.loop.time()
        busy_since = max(flight.sent_at, self._last_batch_done)
        self._last_batch_done = now
        sample = (now - busy_since) / max(1, flight.size)
        previous = self._seconds_per_request
        self._seconds_per_request = sample if previous is None else 0.8 * previous + 0.2 * sample

    def _on_exit(self, worker: WorkerHandle, exitcode: int | None) -> None:
        if worker is not self.worker:
            return
        self.worker = None
        self._settle_state_waiters()
        if worker.stopping:
            self.state, self.detail = "idle", ""
            return
        self.counters.worker_crashes += 1
        how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit status {exitcode}"
        logger.warning("the %s worker process stopped (%s); it restarts on the next request", self.task, how)
        self.state = "idle"
        self.detail = f"The worker process stopped ({how}); it restarts on the next request."
        crashed = WorkerCrashed(f"The {self.task} model crashed while working on your request; try again.")
        for flight in self.in_flight.values():
            for request in flight.requests.values():
                if not request.future.done():
                    request.phase = "done"
                    request.future.set_exception(crashed)
        self.in_flight.clear()
        self._slot_freed.set()

    def _settle_state_waiters(self) -> None:
        waiters, self._state_waiters = self._state_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- shutting down -----------------------------------------------------------------------------

    def stop_dispatching(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()

    def fail_waiting(self, error: InferenceError) -> None:
        for request in self.batcher:
            if not request.future.done():
                request.future.set_exception(error)
            self.batcher.remove(request)
            request.phase = "done"

    def running_requests(self) -> list[_Request]:
        return [request for flight in self.in_flight.values() for request in flight.requests.values()]

    def fail_running(self, error: InferenceError) -> None:
        for request in self.running_requests():
            if not request.future.done():
                request.future.set_exception(error)

    async def stop_worker(self) -> None:
        async with self._worker_lock:
            worker = self.worker
        if worker is not None:
            await self.loop.run_in_executor(None, worker.stop)
        self.in_flight.clear()
        self.state = "idle"

    # -- observation -------------------------------------------------------------------------------

    def model_state(self) -> ModelState:
        return ModelState(self.task, self.model, self.state, self.detail)

    def stats(self) -> TaskStats:
        c = self.counters
        return TaskStats(
            task=self.task,
            waiting=len(self.batcher),
            in_flight=sum(len(flight.requests) for flight in self.in_flight.values()),
            submitted=c.submitted,
            rejected=c.rejected,
            dispatched=c.dispatched,
            ran=c.ran,
            completed=c.completed,
            failed=c.failed,
            cancelled=c.cancelled,
            timed_out=c.timed_out,
            skipped_in_worker=c.skipped_in_worker,
            batch_sizes=dict(sorted(c.batch_sizes.items())),
            model_seconds=c.model_seconds,
            worker_starts=c.worker_starts,
            worker_crashes=c.worker_crashes,
            worker_pid=self.worker.pid if self.worker is not None else None,
        )

"""The local backend: one worker process per task on this machine, behind an async API.

    async with InferenceService(settings) as service:
        predictions = await service.classify(image_bytes, user=author_id, top=5)
        ticket = service.submit("zebra", image_bytes, user=author_id)   # Busy at once if full

Everything a caller touches lives on the event loop of this (the main) process: per-task waiting
lines (`lane`) with dynamic batching served in turns between users, per-task queue limits,
per-user caps, reservations, deadlines, cancellation, the `Busy` answer with a retry hint.  What
each task takes and how it batches comes from `inference.tasks`.  The models live in worker
processes (`inference.worker`), one per task, started on the task's first request and again
after a crash or a kill by the watchdog (`supervisor`), so a slow, crashing or out-of-memory
model never stalls or takes down the process with the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from config import Settings
from inference.errors import Busy, InvalidImage, ModelUnavailable, ServiceClosed
from inference.service.lane import Request, TaskLane
from inference.service.tickets import LocalReservation, LocalTicket, Slots
from inference.service.types import ModelState, ServiceStats, missing_weights
from inference.tasks import TASKS, get_task

if TYPE_CHECKING:  # the main process needs no torch: only the workers import it
    from inference.pipeline import Prediction
    from inference.service.api import InferenceBackend


class InferenceService:
    """The local `InferenceBackend` (see `inference.service.api` for the contract)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lanes: dict[str, TaskLane] = {}
        #: Per user: requests waiting or running, and slots reserved.
        self._pending_by_user: Counter[Hashable] = Counter()
        self._request_ids = itertools.count(1)
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Cheap: worker processes start on their task's first request (or `warm_up`)."""
        if self._closed:
            raise ServiceClosed("The inference service has been closed.")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._lanes = {task: TaskLane(self.settings, get_task(task), self._loop) for task in TASKS}

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
        states once each is ready or unavailable, or its load ran past `model_load_timeout_s`."""
        self._check_open()
        lanes = [self._lane(task) for task in (tasks or TASKS)]
        await asyncio.gather(*(lane.supervisor.warm_up() for lane in lanes))
        return [lane.model_state() for lane in lanes]

    # -- requests -------------------------------------------------------------------------------

    def reserve(self, task: str, count: int, *, user: Hashable | None = None) -> LocalReservation:
        """Hold up to `count` slots of `task`'s queue for `user`, before fetching the images.

        `granted` is what the task's queue limit and the user's cap allow right now; `Busy`
        (with the task's retry hint) when that is none.  Release what is not used.
        """
        self._check_open()
        lane = self._lane(task)
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        queue_room = lane.queue_limit() - lane.queued()
        user_room = count if user is None else self.settings.max_pending_per_user - self._pending_by_user[user]
        granted = max(0, min(count, queue_room, user_room))
        lane.counts.rejected += count - granted
        shortfall = None if granted == count else self._refusal(lane, user, granted, at_user_cap=user_room <= granted)
        if shortfall is not None and granted == 0:
            raise shortfall
        lane.reserved += granted
        if user is not None:
            self._pending_by_user[user] += granted
        return LocalReservation(lane, user, granted, self._submit_reserved, self._release, shortfall)

    def _refusal(self, lane: TaskLane, user: Hashable | None, granted: int, *, at_user_cap: bool) -> Busy:
        """Why the slots beyond `granted` were not granted: the user's cap, or the task's queue."""
        if at_user_cap:
            held = self._pending_by_user[user] + granted
            return Busy(
                f"You already have {held} request{'s' if held != 1 else ''} in progress; wait for one to finish.",
                lane.retry_after(),
            )
        return Busy(f"The {lane.task} model is busy right now; try again in a moment.", lane.retry_after())

    def submit(
        self, task: str, image: bytes, *, user: Hashable | None = None, timeout: float | None = None, **options: Any
    ) -> LocalTicket:
        """Queue a request and return its ticket at once.

        Raises `TypeError` for an unknown option or one of the wrong type and `ValueError` for
        one out of range (`inference.tasks`), before anything is queued; `Busy` when the task's
        queue is full or `user` already has `max_pending_per_user` requests waiting or running;
        `ServiceClosed` after `close()`.  `timeout` (seconds, default `request_timeout_s`)
        bounds the wait for the result.
        """
        self._check_open()
        self._lane(task).spec.validate(options, self.settings)
        with self.reserve(task, 1, user=user) as reservation:
            return reservation.submit(image, timeout=timeout, **options)

    async def classify(self, image: bytes, *, user: Hashable | None = None, top: int | None = None) -> list[Prediction]:
        options = {} if top is None else {"top": top}
        return await self.submit("classify", image, user=user, **options)

    async def zebra(self, image: bytes, *, user: Hashable | None = None) -> bytes:
        """The photo with its horses turned into zebras, as PNG bytes."""
        return await self.submit("zebra", image, user=user)

    async def caption(self, image: bytes, *, user: Hashable | None = None, beam: int | None = None) -> str:
        options = {} if beam is None else {"beam": beam}
        return await self.submit("caption", image, user=user, **options)

    # -- observation ----------------------------------------------------------------------------

    def models(self) -> list[ModelState]:
        """Each task's model state, with the weights files it lacks.  Looking for them costs a
        `stat` per catalogue file: a few, on the weights directory (local disk)."""
        if not self._lanes:
            states = [ModelState(task, get_task(task).default_model(self.settings), "idle") for task in TASKS]
        else:
            states = [lane.model_state() for lane in self._lanes.values()]
        missing = missing_weights(self.settings.weights_dir, {state.model for state in states})
        return [dataclasses.replace(state, missing=missing.get(state.model, ())) for state in states]

    def waiting(self) -> int:
        """Requests in line (not yet taken up by a worker), all tasks together."""
        return sum(lane.waiting() for lane in self._lanes.values())

    def pending_for(self, user: Hashable) -> int:
        """Requests of `user` waiting or running, and slots reserved for them."""
        return self._pending_by_user.get(user, 0)

    def stats(self) -> ServiceStats:
        return ServiceStats({task: lane.stats() for task, lane in self._lanes.items()})

    # -- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosed("The models are shutting down; try again in a minute.")
        if self._loop is None:
            raise ServiceClosed("The inference service has not been started.")

    def _lane(self, task: str) -> TaskLane:
        try:
            return self._lanes[task]
        except KeyError:
            raise ModelUnavailable(f"Unknown task {task!r}; known: {', '.join(TASKS)}.") from None

    def _submit_reserved(
        self, lane: TaskLane, user: Hashable | None, image: bytes, timeout: float | None, options: dict[str, Any]
    ) -> LocalTicket:
        """Queue a request in a slot reserved for it; the slot becomes the request's."""
        self._check_open()
        checked = lane.spec.validate(options, self.settings)
        data = bytes(image)
        timeout_s = self.settings.request_timeout_s if timeout is None else float(timeout)
        loop = self._loop
        assert loop is not None
        lane.reserved -= 1  # the user's share stays counted: it is this request's now
        request = Request(
            id=next(self._request_ids),
            task=lane.spec.name,
            image=data,
            options=checked,
            user=user,
            future=loop.create_future(),
            enqueued_at=loop.time(),
            timeout_s=timeout_s,
        )
        lane.counts.submitted += 1
        request.future.add_done_callback(_mark_retrieved)
        request.future.add_done_callback(lambda _: self._finish(request))
        if len(request.image) > self.settings.max_image_bytes:
            # Refused here, so that an oversized upload is not even copied to the worker.
            request.phase = "done"
            lane.fail(
                request,
                InvalidImage(
                    f"That file is too large ({len(request.image) / 2**20:.1f} MB); "
                    f"the limit is {self.settings.max_image_bytes / 2**20:.1f} MB."
                ),
            )
            return LocalTicket(request, None, loop)
        request.timer = loop.call_later(timeout_s, lane.expire, request)
        lane.enqueue(request)
        return LocalTicket(request, lane, loop)

    def _release(self, lane: TaskLane, user: Hashable | None, slots: Slots) -> None:
        left, slots.left = slots.left, 0
        if left:
            lane.reserved -= left
            self._forget_user_share(user, left)

    def _forget_user_share(self, user: Hashable | None, count: int) -> None:
        if user is None:
            return
        self._pending_by_user[user] -= count
        if self._pending_by_user[user] <= 0:
            del self._pending_by_user[user]

    def _finish(self, request: Request) -> None:
        """Bookkeeping once a request's future is done, however it got there."""
        if request.timer is not None:
            request.timer.cancel()
        self._forget_user_share(request.user, 1)
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


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    # A ticket that was refused, timed out or dropped may never be awaited: its error is the
    # caller's to read or ignore, not a "Future exception was never retrieved" in the log.
    if not future.cancelled():
        future.exception()


if TYPE_CHECKING:
    # The static half of the contract: a type checker proves here that the class has every
    # member of the Protocol with a compatible signature (the tests check it at run time).
    def _implements_the_backend_protocol(service: InferenceService) -> InferenceBackend:
        return service

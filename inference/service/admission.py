"""What both backends do the same way on the callers' event loop: the life cycle and admission.

`LaneBackend` is the half of an `InferenceBackend` (`api`) that does not care where the models
run: a lane per task (`lanes.Lane`), the start guard and the idempotent `close`, `reserve` (the
task's queue room and the user's share, a `Busy` with the retry hint for what does not fit),
`submit` (options checked before anything is queued, oversized images refused before they are
copied anywhere), each request's bookkeeping once its future is done, the per-user counts,
`models` and `stats`.  A backend subclasses it with what is its own: making its lanes
(`_open_lanes`) and stopping what runs the models (`_shut_down`).  The local backend
(`local.InferenceService`) and the Ray one (`ray_backend.RayBackend`) do; nothing here imports
ray or torch.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
from collections import Counter
from collections.abc import Hashable, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from config import Settings
from inference.errors import Busy, InvalidImage, ModelUnavailable, ServiceClosed
from inference.service.lanes import Lane, Request
from inference.service.tickets import LaneReservation, LaneTicket, Slots
from inference.service.types import ModelState, ServiceStats, missing_weights
from inference.tasks import TASKS, get_task

LaneT = TypeVar("LaneT", bound=Lane)


class LaneBackend(Generic[LaneT]):
    """An `InferenceBackend` less where its models run: see the module's docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The callers' loop, once started: every lane, request and count lives on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lanes: dict[str, LaneT] = {}
        #: Per user: requests waiting or running, and slots reserved.
        self._pending_by_user: Counter[Hashable] = Counter()
        self._request_ids = itertools.count(1)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    # -- what each backend does its own way -------------------------------------------------------

    async def _open_lanes(self, loop: asyncio.AbstractEventLoop) -> dict[str, LaneT]:
        """Get what runs the models ready (or ready to start); a lane per task of `TASKS`."""
        raise NotImplementedError

    async def _shut_down(self, grace_s: float) -> None:
        """`close`'s work, once: `_drain` the lanes, then stop what runs the models."""
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the lanes (`_open_lanes`).  Started already: nothing; closed: `ServiceClosed`."""
        if self._closed:
            raise ServiceClosed("The inference service has been closed.")
        if self._loop is not None:
            return
        loop = asyncio.get_running_loop()
        self._lanes = await self._open_lanes(loop)
        self._loop = loop

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Refuse new requests, fail the waiting ones with `ServiceClosed`, give the running
        ones `grace_s` to finish (then fail them too), and stop what runs the models.
        Idempotent: a second call waits for the first one's shutdown, which it cannot cancel."""
        if self._closing is None:
            self._closed = True
            if self._loop is None:
                return
            self._closing = asyncio.ensure_future(self._shut_down(grace_s))
        await asyncio.shield(self._closing)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _drain(self, lanes: Sequence[LaneT], grace_s: float) -> None:
        """Fail the waiting requests, give the running ones `grace_s`, then fail those left."""
        for lane in lanes:
            lane.fail_waiting(ServiceClosed("The models are shutting down; try again in a minute."))
        running = [request.future for lane in lanes for request in lane.running_requests()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        for lane in lanes:
            lane.fail_running(ServiceClosed("The models shut down before your request finished; try again in a minute."))

    # -- requests -------------------------------------------------------------------------------

    def reserve(self, task: str, count: int, *, user: Hashable | None = None) -> LaneReservation:
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
        return LaneReservation(lane, user, granted, self._submit_reserved, self._release, shortfall)

    def _refusal(self, lane: LaneT, user: Hashable | None, granted: int, *, at_user_cap: bool) -> Busy:
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
    ) -> LaneTicket:
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

    def _submit_reserved(
        self, lane: LaneT, user: Hashable | None, image: bytes, timeout: float | None, options: dict[str, Any]
    ) -> LaneTicket:
        """Queue a request in a slot reserved for it; the slot becomes the request's."""
        self._check_open()
        checked = lane.spec.validate(options, self.settings)
        timeout_s = self.settings.request_timeout_s if timeout is None else float(timeout)
        loop = self._loop
        assert loop is not None
        lane.reserved -= 1  # the user's share stays counted: it is this request's now
        request = Request(
            id=next(self._request_ids),
            task=lane.task,
            image=bytes(image),
            options=checked,
            user=user,
            future=loop.create_future(),
            enqueued_at=0.0,  # set as it joins the line (`_into_line`)
            timeout_s=timeout_s,
        )
        lane.counts.submitted += 1
        request.future.add_done_callback(_mark_retrieved)
        request.future.add_done_callback(lambda _: self._finish(lane, request))
        if len(request.image) > self.settings.max_image_bytes:
            # Refused here, so that an oversized upload is not even copied to a model.
            request.phase = "done"
            lane.fail(
                request,
                InvalidImage(
                    f"That file is too large ({len(request.image) / 2**20:.1f} MB); "
                    f"the limit is {self.settings.max_image_bytes / 2**20:.1f} MB."
                ),
            )
            return LaneTicket(request, None, loop)
        # Into the line in a context of the service's own: what that starts (the task's
        # dispatcher, the expiry timer) outlives this call, and the clock it reads must be the
        # loop's own.  The caller's context may carry a tracing span or a test world's virtual
        # clock (simcord's), which would otherwise run the line.
        contextvars.Context().run(self._into_line, lane, request)
        return LaneTicket(request, lane, loop)

    def _into_line(self, lane: LaneT, request: Request) -> None:
        """Start the request's wait: its clock, its deadline and its place in the lane."""
        loop = self._loop
        assert loop is not None
        request.enqueued_at = loop.time()
        request.timer = loop.call_later(request.timeout_s, lane.expire, request)
        lane.enqueue(request)

    def _release(self, lane: LaneT, user: Hashable | None, slots: Slots) -> None:
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

    def _finish(self, lane: LaneT, request: Request) -> None:
        """Bookkeeping once a request's future is done, however it got there."""
        if request.timer is not None:
            request.timer.cancel()
        self._forget_user_share(request.user, 1)
        lane.forget(request)
        request.image = b""

    # -- observation ----------------------------------------------------------------------------

    def models(self) -> list[ModelState]:
        """Each task's model state (the local worker's, or as Ray's replicas last reported it),
        with the weights files this process's `weights_dir` lacks (a `stat` per catalogue file,
        a few, on local disk; on a Ray cluster the replicas' own error names theirs)."""
        if not self._lanes:
            states = [ModelState(task, get_task(task).default_model(self.settings), "idle") for task in TASKS]
        else:
            states = [lane.model_state() for lane in self._lanes.values()]
        missing = missing_weights(self.settings.weights_dir, {state.model for state in states})
        return [dataclasses.replace(state, missing=missing.get(state.model, ())) for state in states]

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

    def _lane(self, task: str) -> LaneT:
        try:
            return self._lanes[task]
        except KeyError:
            raise ModelUnavailable(f"Unknown task {task!r}; known: {', '.join(TASKS)}.") from None


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    # A ticket that was refused, timed out or dropped may never be awaited: its error is the
    # caller's to read or ignore, not a "Future exception was never retrieved" in the log.
    if not future.cancelled():
        future.exception()

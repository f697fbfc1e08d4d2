"""The `Ticket` and `Reservation` of both backends (`inference.service.api`'s Protocols).

They stand for a request in a task's lane (`lanes.Request`, `lanes.Lane`) and for slots held in
one: what they say and do is the same whatever the lane's backend.

Both may be dropped by a caller that went away: a ticket dropped unawaited cancels its request,
a reservation dropped unreleased gives its slots back.  Their finalizers run wherever the
garbage collector runs, so they hand the work to the event loop's thread.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from inference.errors import Busy
from inference.service.lanes import Lane, Request


class LaneTicket:
    """One submitted request: await it for the result; ask its position; cancel it.

    `lane` None: the request was answered at once (refused before it joined a line).
    """

    def __init__(self, request: Request, lane: Lane | None, loop: asyncio.AbstractEventLoop) -> None:
        self._request = request
        self._lane = lane
        finalizer = weakref.finalize(self, _cancel_abandoned, loop, request.future)
        finalizer.atexit = False

    @property
    def task(self) -> str:
        return self._request.task

    def position(self) -> int:
        """How many requests are ahead of this one in line (0: taken up by a model, or next).
        With Ray, this process's requests only: other bot processes sharing the cluster are not seen."""
        if self._lane is None:
            return 0
        return self._lane.position(self._request)

    def estimated_wait(self) -> float | None:
        """The lane's smoothed seconds per request (measured from this process) × (ahead + 1)."""
        if self.done() or self._lane is None:
            return 0.0
        per_request = self._lane.seconds_per_request
        if per_request is None:
            return None
        return per_request * (self.position() + 1)

    def done(self) -> bool:
        return self._request.future.done()

    def cancel(self) -> None:
        """Drop the request; if it has not started, it never costs model time (with Ray, the
        Serve request is cancelled)."""
        self._request.future.cancel()

    def __await__(self) -> Generator[Any, None, Any]:
        # A generator that keeps `self` alive while awaited (see the finalizer above).
        return (yield from self._request.future.__await__())


def _cancel_abandoned(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        # Collected on the loop's own thread: cancel now, before the dispatcher can hand the
        # request to the worker (a cancellation scheduled for later could come after that).
        future.cancel()
        return
    try:  # collected on another thread: hand the cancellation to the loop's
        loop.call_soon_threadsafe(future.cancel)
    except RuntimeError:  # the loop is closed
        pass


@dataclass
class Slots:
    """A reservation's unused slots; shared with its finalizer, which releases what is left."""

    left: int


#: Queues a request in a reserved slot: (lane, user, image, timeout, options) → its ticket.
SubmitReserved = Callable[[Lane, "Hashable | None", bytes, "float | None", dict[str, Any]], LaneTicket]
#: Gives back a reservation's unused slots: (lane, user, slots).
ReleaseSlots = Callable[[Lane, "Hashable | None", Slots], None]


class LaneReservation:
    """Slots in one task's queue, held for one user: ask before downloading, then submit.

    `granted` slots count toward the task's queue limit and the user's cap until each is used
    by `submit` or given back by `release()` (or on leaving `with` / `async with`).
    """

    def __init__(
        self,
        lane: Lane,
        user: Hashable | None,
        granted: int,
        submit_reserved: SubmitReserved,
        release_slots: ReleaseSlots,
        shortfall: Busy | None = None,
    ) -> None:
        self.granted = granted
        self.shortfall = shortfall
        self.task = lane.spec.name
        self._lane = lane
        self._user = user
        self._slots = Slots(granted)
        self._submit_reserved = submit_reserved
        self._release_slots = release_slots
        # Dropped without `release()`: give the slots back, on the loop's thread.
        finalizer = weakref.finalize(self, _release_abandoned, lane.loop, release_slots, lane, user, self._slots)
        finalizer.atexit = False

    @property
    def remaining(self) -> int:
        return self._slots.left

    def submit(self, image: bytes, *, timeout: float | None = None, **options: Any) -> LaneTicket:
        """Use one slot: queue the request and return its ticket (see `LaneBackend.submit`)."""
        if self._slots.left <= 0:
            raise RuntimeError(f"this reservation's {self.granted} slot(s) are used or released")
        ticket = self._submit_reserved(self._lane, self._user, image, timeout, options)
        self._slots.left -= 1
        return ticket

    def release(self) -> None:
        """Give back the slots not used.  Idempotent."""
        self._release_slots(self._lane, self._user, self._slots)

    def __enter__(self) -> LaneReservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def __aenter__(self) -> LaneReservation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _release_abandoned(
    loop: asyncio.AbstractEventLoop, release_slots: ReleaseSlots, lane: Lane, user: Hashable | None, slots: Slots
) -> None:
    if slots.left:
        try:
            loop.call_soon_threadsafe(release_slots, lane, user, slots)
        except RuntimeError:  # the loop is closed
            pass

"""The one interface the bot, the CLI and the bench talk to, whatever runs the models.

    async with backend:                                   # start() … close()
        ticket = backend.submit("zebra", image, user=author_id)   # Busy at once if full
        print(ticket.position())                                  # "you're #3 in line"
        png = await ticket                                        # or ticket.cancel()

        async with backend.reserve("zebra", 3, user=author_id) as slots:   # ask, then download
            tickets = [slots.submit(await download(url)) for url in urls[: slots.granted]]

`InferenceService` (`inference.service.local`: worker processes on this machine) implements it;
issue 10's Ray Serve backend implements the same Protocols, and `tests/test_backend_contract.py`
runs one suite against each.  Errors are `inference.errors`' (`Busy` carries `retry_after`).
"""

from __future__ import annotations

from collections.abc import Generator, Hashable
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from inference.errors import Busy
from inference.service.types import ModelState, ServiceStats

__all__ = ["Busy", "InferenceBackend", "Reservation", "Ticket"]


@runtime_checkable
class Ticket(Protocol):
    """One submitted request: await it for the result, ask its place in line, cancel it.

    Dropped without being awaited, it cancels its request, like a caller going away.
    """

    @property
    def task(self) -> str: ...

    def position(self) -> int:
        """How many requests are ahead of this one in line; 0 once it is taken up or done."""
        ...

    def estimated_wait(self) -> float | None:
        """Seconds until its result, likely: the task's measured speed × the requests ahead
        and itself; None while the task has measured nothing yet, 0 once done."""
        ...

    def done(self) -> bool: ...

    def cancel(self) -> None:
        """Drop the request; if it has not started, it never costs model time."""
        ...

    def __await__(self) -> Generator[Any, None, Any]: ...


@runtime_checkable
class Reservation(Protocol):
    """Slots of one task's queue, held for one user until used by `submit` or `release`d.

    Used with `with` or `async with`, leaving gives back what is left.
    """

    granted: int
    task: str
    #: Why fewer than the slots asked for were granted (the `Busy` the rest would have got,
    #: with its retry hint); None when all were.
    shortfall: Busy | None

    @property
    def remaining(self) -> int: ...

    def submit(self, image: bytes, *, timeout: float | None = None, **options: Any) -> Ticket: ...

    def release(self) -> None:
        """Give back the slots not used.  Idempotent."""
        ...

    def __enter__(self) -> Reservation: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def __aenter__(self) -> Reservation: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class InferenceBackend(Protocol):
    """Runs the tasks of `inference.tasks` for many callers at once."""

    async def start(self) -> None:
        """Get ready to take requests (cheap: models may load on first use)."""
        ...

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Refuse new requests, fail the waiting ones with `ServiceClosed`, give the running
        ones `grace_s` to finish (then fail them too).  Idempotent."""
        ...

    async def __aenter__(self) -> InferenceBackend: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def warm_up(self, *tasks: str) -> list[ModelState]:
        """Load the models of `tasks` (default: all) now; their states once each settled."""
        ...

    def submit(
        self, task: str, image: bytes, *, user: Hashable | None = None, timeout: float | None = None, **options: Any
    ) -> Ticket:
        """Queue a request; its ticket at once.  `TypeError` / `ValueError` for bad options
        (before anything is queued), `Busy` when the task's queue or the user's share is full,
        `ServiceClosed` after `close()`.  `timeout` (s) bounds the wait (`RequestTimeout`)."""
        ...

    def reserve(self, task: str, count: int, *, user: Hashable | None = None) -> Reservation:
        """Hold up to `count` slots of `task`'s queue for `user`; `Busy` when none is free."""
        ...

    def models(self) -> list[ModelState]:
        """Each task's model state, in the order of `inference.tasks.TASKS`."""
        ...

    def stats(self) -> ServiceStats:
        """Each task's counters (a snapshot)."""
        ...

    def pending_for(self, user: Hashable) -> int:
        """Requests of `user` waiting or running, and slots reserved for them."""
        ...

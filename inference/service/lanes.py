"""What the lanes of both backends share: one task's requests as the callers' event loop sees them.

A lane keeps, on the loop the callers run on, a task's requests waiting for its model and those
running, the slots reserved for requests to come, the counters `stats()` reports and the speed
the `Busy` retry hint and the tickets' estimated waits come from.  How a request reaches a model
is each backend's own: the local lane (`lane.TaskLane`) hands batches to a worker process, Ray's
(`ray_lane.RayLane`) sends each request through Serve.  Answering, failing and timing out a
request, and the counting that goes with it, are the same for both, here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from config import Settings
from inference.errors import InferenceError, RequestTimeout
from inference.service.types import LATENCY_WINDOW, ModelState, TaskStats, percentile
from inference.tasks import TaskSpec

#: The bounds of the `Busy.retry_after` hint, seconds.
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


@dataclass(eq=False)
class Request:
    """One submitted request, from `submit` until its future is done (then `Lane.forget`)."""

    id: int
    task: str
    #: Emptied once what carries it on holds the bytes (the worker's message, Ray's call).
    image: bytes
    options: dict[str, Any]
    user: Hashable | None
    future: asyncio.Future[Any]
    #: When it joined the line, on the loop's clock.
    enqueued_at: float
    timeout_s: float
    #: Fails it with `RequestTimeout` at its deadline (`Lane.expire`).
    timer: asyncio.TimerHandle | None = None
    #: "waiting" (in line: a cancellation spares the model) → "running" (a model took it up) →
    #: "done".  The local lane has a step between: "sent" (in the worker, not taken up yet).
    phase: str = "waiting"

    @property
    def deadline(self) -> float:
        return self.enqueued_at + self.timeout_s


class Lane:
    """One task's requests and counters on the callers' loop; each backend's subclass says how
    they reach the model (`enqueue`), where they wait and run, and what the model's state is."""

    def __init__(self, settings: Settings, spec: TaskSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.spec = spec
        self.task = spec.name
        #: The callers' loop: every field of a lane is read and written on it only.
        self.loop = loop
        #: Counted into as requests go; `stats()` hands out copies.
        self.counts = TaskStats(self.task)
        #: Submit → result of the last answered requests, seconds.
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        #: Slots reserved for requests not submitted yet.
        self.reserved = 0
        #: Seconds per request, smoothed (`_add_speed_sample`); guides the `Busy` retry hint and
        #: the tickets' estimated waits.
        self.seconds_per_request: float | None = None

    # -- what each backend's lane says --------------------------------------------------------

    def waiting(self) -> int:
        """Requests in line, not taken up by a model yet."""
        raise NotImplementedError

    def running(self) -> int:
        """Requests a model has taken up and not answered yet."""
        raise NotImplementedError

    def position(self, request: Request) -> int:
        """How many requests are ahead of `request` in line; 0 once it is taken up or done."""
        raise NotImplementedError

    def enqueue(self, request: Request) -> None:
        """Put a submitted request in line, on its way to the model."""
        raise NotImplementedError

    def forget(self, request: Request) -> None:
        """The request's future is done, however: take it out of the lane, spare the model it."""
        raise NotImplementedError

    def fail_waiting(self, error: InferenceError) -> None:
        """Fail every request still in line with `error`."""
        raise NotImplementedError

    def running_requests(self) -> list[Request]:
        """The requests a model has (or, locally, that a worker holds)."""
        raise NotImplementedError

    def model_state(self) -> ModelState:
        raise NotImplementedError

    # -- the same for every backend -----------------------------------------------------------

    def queue_limit(self) -> int:
        return self.spec.queue_limit(self.settings)

    def queued(self) -> int:
        """What counts toward the queue limit: requests in line and slots reserved."""
        return self.waiting() + self.reserved

    def retry_after(self) -> float:
        """Seconds until this task likely has room: its measured speed × the requests ahead."""
        per_request = self.seconds_per_request or 1.0
        backlog = self.waiting() + self.running() + 1
        return round(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, per_request * backlog)), 1)

    def _add_speed_sample(self, seconds: float) -> None:
        """One more measure of the seconds a request takes (each lane measures its own way)."""
        previous = self.seconds_per_request
        self.seconds_per_request = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def answer(self, request: Request, value: Any) -> None:
        """Answer a request with its result (unless it has its answer already), and count it."""
        if not request.future.done():
            self.counts.done += 1
            self.latencies.append(self.loop.time() - request.enqueued_at)
            request.future.set_result(value)

    def fail(self, request: Request, error: InferenceError) -> None:
        """Answer a request with an error (unless it has its answer already), and count it."""
        if not request.future.done():
            self.counts.failed += 1
            request.future.set_exception(error)

    def fail_running(self, error: InferenceError) -> None:
        for request in self.running_requests():
            self.fail(request, error)

    def expire(self, request: Request) -> None:
        """The request's deadline passed (its `timer`): fail it with `RequestTimeout`."""
        if not request.future.done():
            self.counts.timed_out += 1
            request.future.set_exception(
                RequestTimeout(
                    f"No result within {request.timeout_s:g} seconds: the {self.task} model is too busy; try again later."
                )
            )

    def stats(self) -> TaskStats:
        """The counters with the live figures; a backend's lane adds its own (`dataclasses.replace`)."""
        recent = list(self.latencies)
        return dataclasses.replace(
            self.counts,
            waiting=self.waiting(),
            running=self.running(),
            reserved=self.reserved,
            p50_ms=percentile(recent, 0.50) * 1000 if recent else 0.0,
            p95_ms=percentile(recent, 0.95) * 1000 if recent else 0.0,
        )

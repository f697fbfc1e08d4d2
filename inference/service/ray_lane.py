"""The Ray backend's client side of one task: its requests on their way through Serve.

Each request is driven by a coroutine on the backend's own event loop, in a thread of its own
(`ClientLoop`): `handle.remote(...)` (a streaming `DeploymentResponseGenerator`), then the
replica's `STARTED`, then its `Outcome`, each handed to the caller's loop with
`call_soon_threadsafe`, as the local backend's reader thread does.  Ray's client machinery (its
waits, its timers, `response.cancel()`, which may block) thus never runs on the bot's loop;
all the bookkeeping does.  Until
`STARTED` a request *waits*: it counts toward the task's queue limit, has a position, and a
cancellation (`response.cancel()`) spares the model.  Positions and the queue limit count this
process's requests only: the other bot processes sharing the cluster are behind Serve's own
bound (`max_queued_requests` per caller, whose `BackPressureError` is a `Busy` too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import logging
import threading
from collections import Counter
from typing import Any

from config import Settings
from inference.errors import Busy, InferenceError, ModelUnavailable
from inference.service.lanes import Lane, Request
from inference.service.ray_replica import STARTED, Outcome
from inference.service.types import ModelState, TaskStats
from inference.tasks import TaskSpec

log = logging.getLogger(__name__)


class RayLane(Lane):
    """One task: its requests in flight through Serve, its model's last state.  A request is
    "waiting" while in Serve's queues, not taken up, and "running" once its batch started; the
    counting is `lanes.Lane`'s, as the local lane's."""

    def __init__(
        self, settings: Settings, spec: TaskSpec, loop: asyncio.AbstractEventLoop, client: ClientLoop, handle: Any
    ) -> None:
        super().__init__(settings, spec, loop)
        self.client = client
        #: The deployment's handle, streaming: `STARTED`, then the `Outcome`.
        self.handle = handle.options(method_name="infer", stream=True)
        self.warm_handle = handle.options(method_name="warm_up")
        #: Not taken up yet, oldest first (dicts keep insertion order).
        self._waiting: dict[int, Request] = {}
        self._running: dict[int, Request] = {}
        #: Request id → the coroutine on the `ClientLoop` that sends it to Serve and reads its stream.
        self._drivers: dict[int, concurrent.futures.Future[None]] = {}
        #: Model batch size → requests answered from a batch of that size.
        self.batch_sizes: Counter[int] = Counter()
        self.state = ModelState(self.task, spec.default_model(settings), "idle")

    # -- the line ---------------------------------------------------------------------------

    def waiting(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def running_requests(self) -> list[Request]:
        return list(self._running.values())

    def drivers(self) -> list[concurrent.futures.Future[None]]:
        """The coroutines sending requests to Serve: a request's ends once it is answered."""
        return list(self._drivers.values())

    def position(self, request: Request) -> int:
        """This process's requests of the task sent before it and not taken up yet."""
        if request.phase != "waiting":
            return 0
        for ahead, other in enumerate(self._waiting.values()):
            if other is request:
                return ahead
        return 0

    def enqueue(self, request: Request) -> None:
        self._waiting[request.id] = request
        # Sent on the loop's next turn: a request cancelled in the turn it was submitted in (a
        # ticket dropped at once, a Cancel right away) never reaches Serve, as with `local`.
        self.loop.call_soon(self._send_now, request)

    def _send_now(self, request: Request) -> None:
        if request.future.done():
            return
        self._drivers[request.id] = self.client.run(self._drive(request, request.image))
        request.image = b""  # the driver holds the bytes until they are in Ray's object store

    async def _drive(self, request: Request, image: bytes) -> None:
        """On the `ClientLoop`: what happens to the request goes to the caller's loop."""
        response = self.handle.remote(image, request.options)
        del image
        tell = self._tell
        try:
            async for item in response:
                if item == STARTED:
                    tell(self._start, request)
                elif isinstance(item, Outcome):
                    tell(self._finish_with, request, item)
                    return
            tell(self.fail, request, InferenceError(f"The {self.task} model returned no result."))
        except asyncio.CancelledError:
            response.cancel()  # the caller went away, timed out or the backend closes
            raise
        except Exception as error:
            tell(self._fail_from_serve, request, error)

    def _tell(self, callback: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
            pass

    def _start(self, request: Request) -> None:
        if self._waiting.pop(request.id, None) is not None:
            request.phase = "running"
            self._running[request.id] = request

    def _finish_with(self, request: Request, outcome: Outcome) -> None:
        if outcome.model_batch:
            self.counts.ran += 1
            self.counts.model_seconds += outcome.model_seconds / outcome.model_batch
            # Counted per request (each learns its batch's size); `stats` turns it into batches.
            self.batch_sizes[outcome.model_batch] += 1
            self._add_speed_sample(outcome.model_seconds / outcome.model_batch)
        if outcome.error is not None:
            if isinstance(outcome.error, ModelUnavailable):
                self.state = dataclasses.replace(self.state, state="unavailable", error=str(outcome.error))
            self.fail(request, outcome.error)
            return
        if self.state.state != "ready":
            self.state = dataclasses.replace(self.state, state="ready", error="")
        self.answer(request, outcome.value)

    def _fail_from_serve(self, request: Request, error: Exception) -> None:
        from ray.serve.exceptions import BackPressureError

        if isinstance(error, BackPressureError):
            if not request.future.done():
                self.counts.rejected += 1
                request.future.set_exception(
                    Busy(f"The {self.task} model is busy right now; try again in a moment.", self.retry_after())
                )
            return
        log.warning("a %s request failed in Ray Serve: %s", self.task, error)
        self.fail(request, InferenceError(f"The {self.task} model could not answer ({type(error).__name__})."))

    def fail_waiting(self, error: InferenceError) -> None:
        for request in list(self._waiting.values()):
            self.fail(request, error)

    def forget(self, request: Request) -> None:
        """The request's future is done, however: stop its driver (which cancels it on Serve)."""
        if request.future.cancelled():
            self.counts.cancelled += 1
        self._waiting.pop(request.id, None)
        self._running.pop(request.id, None)
        request.phase = "done"
        driver = self._drivers.pop(request.id, None)
        if driver is not None and not driver.done():
            driver.cancel()

    # -- the model --------------------------------------------------------------------------

    def model_state(self) -> ModelState:
        """As the replicas last reported it (a request's outcome, `warm_up`)."""
        return self.state

    async def warm_up(self) -> ModelState:
        try:
            state: ModelState = await asyncio.wrap_future(self.client.run(self._remote_warm_up()))
        except Exception as error:  # the replica could not start, or died
            state = dataclasses.replace(self.state, state="unavailable", error=f"{type(error).__name__}: {error}")
        self.state = dataclasses.replace(state, model=state.model or self.state.model)
        return self.state

    async def _remote_warm_up(self) -> ModelState:
        return await self.warm_handle.remote()  # type: ignore[no-any-return]

    def stats(self) -> TaskStats:
        return dataclasses.replace(
            super().stats(),
            batch_sizes={size: max(1, round(requests / size)) for size, requests in sorted(self.batch_sizes.items())},
        )


def in_own_context(function: Any, *args: Any) -> Any:
    """`function(*args)` in an empty `contextvars.Context`, not the caller's."""
    return contextvars.Context().run(function, *args)


class ClientLoop:
    """An event loop in a thread of its own, where Ray's handles are called and awaited."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="ray-client-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def run(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        """Schedule `coroutine` there, in a context of its own; cancelling the future cancels it
        (thread-safe).  A task inherits its creator's context variables: Ray's code must not
        see the caller's (a harness or tracer keyed on them, a patched clock)."""
        return in_own_context(asyncio.run_coroutine_threadsafe, coroutine, self.loop)

    def stop(self) -> None:
        """Stop the loop and wait for its thread (blocks: call it in a thread)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()

"""One task's worker process: started on demand, watched, killed when it must go.

The supervisor starts the worker (on the task's first request or `warm_up`), asks it to load its
model, and keeps the task's `ModelState` from what the worker says.  Its watchdog kills a worker
that does not finish loading in `model_load_timeout_s`, whose resident memory passes the task's
ceiling, or whose oldest batch outlives its deadline (a hang); the next request starts a fresh
one.  What the lost worker's requests are told is the lane's business (`WorkerListener`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from config import Settings
from inference.errors import InferenceError, ModelUnavailable, WorkerCrashed
from inference.service.ceilings import memory_ceiling_mb
from inference.service.types import ModelState
from inference.tasks import TaskSpec
from inference.worker import Load, StateChanged, WorkerConfig, WorkerHandle

logger = logging.getLogger(__name__)

#: How often the watchdog looks at a worker (its memory, its loading, its oldest batch).
WATCHDOG_INTERVAL_S = 0.25
#: A batch still running this long after its deadline (and after it started) means a hang.
STALL_GRACE_S = 5.0

#: The clock the worker process is judged by (hang, load deadline, speed).  A real one: the event
#: loop's clock need not be (simcord's test world moves it on while real work goes on), and a
#: worker process only ever makes progress in real seconds.
worker_clock = time.perf_counter


def background_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A task of the service's own, started in a context of its own.

    A dispatcher or a watchdog outlives the request whose arrival started it: it must not carry
    that caller's context variables (a request's tracing ids, a test world's clock and bookkeeping
    — simcord would wait for it to finish, and it never does).
    """
    # Created *inside* an empty context too: a task factory that looks at the creating context
    # (simcord's) then sees none of the caller's, not just the task's own.
    return contextvars.Context().run(loop.create_task, coro, name=name, context=contextvars.Context())

_MB = 1024 * 1024


class WorkerListener(Protocol):
    """What the supervisor tells the task's lane (all on the event loop)."""

    def on_worker_message(self, message: Any) -> None:
        """A message about requests (`Started`, `Results`, `Unsendable`)."""

    def on_worker_lost(self, error: InferenceError, fail_waiting: bool) -> None:
        """The worker is gone: its requests get `error`; the waiting ones too if `fail_waiting`."""

    def on_device(self, device_type: str) -> None:
        """The worker runs on this device type ("cpu", "cuda")."""

    def hang_deadline(self) -> float | None:
        """Loop time past which the worker's oldest batch counts as hung; None: no batch."""


@dataclass(frozen=True)
class Kill:
    """Why the watchdog killed a worker: what its requests are told, and who else fails."""

    error: InferenceError
    #: The state the task is left in ("idle": restarts on the next request; "unavailable").
    state: str
    #: Also fail the requests still in line (they were all waiting for a model that hung).
    fail_waiting: bool = False


class WorkerSupervisor:
    def __init__(
        self, settings: Settings, spec: TaskSpec, loop: asyncio.AbstractEventLoop, listener: WorkerListener
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.task = spec.name
        self.loop = loop
        self.listener = listener
        self.worker: WorkerHandle | None = None
        self.state = ModelState(self.task, spec.default_model(settings), "idle")
        self.memory_bytes: int | None = None
        self.peak_memory_bytes = 0
        #: What the current worker said it needs with its models loaded (None: not said).
        self.memory_need_bytes: int | None = None
        self.starts = 0
        self.crashes = 0
        #: Seconds from the current worker's process start to its model ready; None until ready.
        self.startup_s: float | None = None
        self._started_at = 0.0
        self._loading_since = 0.0
        self._kill: Kill | None = None
        self._lock = asyncio.Lock()
        self._state_waiters: list[asyncio.Future[None]] = []
        self._watchdog: asyncio.Task[None] | None = None

    def model_state(self) -> ModelState:
        pid = self.worker.pid if self.worker is not None else None
        return dataclasses.replace(self.state, worker_pid=pid)

    # -- starting and stopping ------------------------------------------------------------------

    async def ensure_worker(self) -> WorkerHandle:
        """The running worker, started (and told to load) if there is none.  Raises
        `WorkerCrashed` when the process cannot be started."""
        async with self._lock:
            if self.worker is None:
                config = WorkerConfig.from_settings(self.task, self.settings)
                worker = WorkerHandle(config, self.loop, self._on_message, self._on_exit)
                self.worker = worker
                self.starts += 1
                self._started_at, self.startup_s = worker_clock(), None
                # Starting counts as loading: a worker stuck importing is judged like one stuck loading.
                self._enter_loading()
                try:
                    await self.loop.run_in_executor(None, worker.start)
                except Exception as error:  # no process (out of file descriptors, of memory…)
                    logger.exception("could not start the %s worker", self.task)
                    self.worker = None
                    self._set(state="idle")
                    raise WorkerCrashed(f"The {self.task} model could not be started ({error}).") from error
                worker.send(Load())  # a worker exists because there is work: load at once
                self._watchdog = background_task(self.loop, self._watch(worker), f"inference-{self.task}-watchdog")
            return self.worker

    async def warm_up(self) -> None:
        """Returns once the model is ready or unavailable, or its worker died."""
        worker = await self.ensure_worker()
        if self.state.state == "ready":
            return
        settled = self.loop.create_future()
        self._state_waiters.append(settled)
        if self.state.state != "loading":  # unavailable before: try again
            worker.send(Load())
        await settled

    async def stop(self) -> None:
        async with self._lock:
            worker = self.worker
        if worker is not None:
            await self.loop.run_in_executor(None, worker.stop)
            if self.worker is worker:  # its exit report may still be on its way: it is gone now
                self.worker, self.memory_bytes, self.memory_need_bytes = None, None, None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._set(state="idle", error="")
        self._settle_state_waiters()

    # -- the watchdog ---------------------------------------------------------------------------

    async def _watch(self, worker: WorkerHandle) -> None:
        while worker is self.worker:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if worker is self.worker and self._kill is None:
                self._kill = self.judge(worker)
                if self._kill is not None:
                    logger.warning("killing the %s worker: %s", self.task, self._kill.error)
                    worker.kill()

    def memory_ceiling_mb(self) -> int:
        """The worker's ceiling now (`inference.service.ceilings`; 0: none)."""
        return memory_ceiling_mb(self.spec, self.settings, self.memory_need_bytes)

    def judge(self, worker: WorkerHandle) -> Kill | None:
        """Why this worker must go now, if it must."""
        now = worker_clock()
        rss = worker.resident_memory_bytes()
        if rss is not None:
            self.memory_bytes = rss
            self.peak_memory_bytes = max(self.peak_memory_bytes, rss)
            limit_mb = self.memory_ceiling_mb()
            if 0 < limit_mb < rss / _MB:
                message = (
                    f"The {self.task} model needed more memory than it may use ({rss / _MB:.0f} MB; the limit "
                    f"is {limit_mb} MB) and was restarted; try a smaller image."
                )
                return Kill(WorkerCrashed(message), "idle")
        if self.state.state == "loading":
            limit_s = self.settings.model_load_timeout_s
            if now - self._loading_since > limit_s:
                message = f"The {self.state.model} model did not finish loading within {limit_s:g} s; try again later."
                return Kill(ModelUnavailable(message), "unavailable", fail_waiting=True)
            return None  # a batch waiting on the load is judged by the load's deadline
        hang_deadline = self.listener.hang_deadline()
        if hang_deadline is not None and now > hang_deadline:
            return Kill(WorkerCrashed(f"The {self.task} model stopped responding and was restarted; try again."), "idle")
        return None

    # -- what the worker says (on the loop) -----------------------------------------------------

    def _on_message(self, worker: WorkerHandle, message: Any) -> None:
        if worker is not self.worker:
            return  # from a worker that has since been replaced
        if isinstance(message, StateChanged):
            self._on_state(message)
        else:
            self.listener.on_worker_message(message)

    def _on_state(self, message: StateChanged) -> None:
        if message.state == "loading":
            self._enter_loading()
            self._set(error=message.error)
            # A model loading (a second one: a style) holds more than the last need said, and
            # loading peaks above what it keeps: the fixed ceiling until it reports again.
            self.memory_need_bytes = None
        else:
            self._set(state=message.state, error=message.error)
        if message.state == "ready" and self.startup_s is None:
            self.startup_s = worker_clock() - self._started_at
        if message.model:
            self._set(model=message.model)
        if message.runtime:
            self._set(runtime=message.runtime)
        if message.memory_need:
            self.memory_need_bytes = message.memory_need
        if message.device:
            self._set(device=message.device)
            self.listener.on_device(message.device)
        if message.state != "loading":
            self._settle_state_waiters()

    def _on_exit(self, worker: WorkerHandle, exitcode: int | None) -> None:
        if worker is not self.worker:
            return
        self.worker = None
        self.memory_bytes = self.memory_need_bytes = None
        kill, self._kill = self._kill, None
        if worker.stopping:
            self._set(state="idle", error="")
            self._settle_state_waiters()
            return
        self.crashes += 1
        if kill is not None:
            error: InferenceError = kill.error
            self._set(state=kill.state, error=str(error))
        else:
            how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit status {exitcode}"
            logger.warning("the %s worker process stopped (%s); it restarts on the next request", self.task, how)
            self._set(state="idle", error=f"The worker process stopped ({how}); it restarts on the next request.")
            error = WorkerCrashed(f"The {self.task} model crashed while working on your request; try again.")
        self._settle_state_waiters()
        self.listener.on_worker_lost(error, kill is not None and kill.fail_waiting)

    # -- helpers --------------------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        self.state = dataclasses.replace(self.state, **changes)

    def _enter_loading(self) -> None:
        if self.state.state != "loading":
            self._loading_since = worker_clock()
        self._set(state="loading")

    def _settle_state_waiters(self) -> None:
        waiters, self._state_waiters = self._state_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

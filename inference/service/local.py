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
model never stalls or takes down the process with the event loop.  Admission (queue limits,
per-user caps, reservations), the request records and the life cycle are the same as the Ray
backend's: `admission.LaneBackend`'s.  What is this backend's own is here and in `lane`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Hashable
from typing import TYPE_CHECKING

from config import Settings
from inference.service.admission import LaneBackend
from inference.service.cores import CoreBudget
from inference.service.lane import TaskLane
from inference.service.types import ModelState, ServiceStats
from inference.tasks import TASKS, get_task
from inference.worker import worker_threads

if TYPE_CHECKING:  # the main process needs no torch: only the workers import it
    from inference.pipeline import Prediction
    from inference.service.api import InferenceBackend


class InferenceService(LaneBackend[TaskLane]):
    """The local `InferenceBackend` (see `inference.service.api` for the contract)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        #: The cores the task workers share (`cpu_cores`), made with the lanes in `start`.
        self.cores: CoreBudget | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def _open_lanes(self, loop: asyncio.AbstractEventLoop) -> dict[str, TaskLane]:
        """Cheap: worker processes start on their task's first request (or `warm_up`)."""
        self.cores = CoreBudget(worker_threads(self.settings.cpu_cores), TASKS)
        return {task: TaskLane(self.settings, get_task(task), loop, self.cores) for task in TASKS}

    async def warm_up(self, *tasks: str) -> list[ModelState]:
        """Start the workers of `tasks` (default: all) and load their models now; returns their
        states once each is ready or unavailable, or its load ran past `model_load_timeout_s`."""
        self._check_open()
        lanes = [self._lane(task) for task in (tasks or TASKS)]
        await asyncio.gather(*(lane.supervisor.warm_up() for lane in lanes))
        return [lane.model_state() for lane in lanes]

    async def _shut_down(self, grace_s: float) -> None:
        """The requests answered (`_drain`), then the workers stopped."""
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.stop_dispatching()
        await self._drain(lanes, grace_s)
        await asyncio.gather(*(lane.stop_worker() for lane in lanes))

    # -- requests -------------------------------------------------------------------------------

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

    def waiting(self) -> int:
        """Requests in line (not yet taken up by a worker), all tasks together."""
        return sum(lane.waiting() for lane in self._lanes.values())

    def stats(self) -> ServiceStats:
        cores = self.cores.total if self.cores is not None else 0
        return dataclasses.replace(super().stats(), cpu_cores=cores)


if TYPE_CHECKING:
    # The static half of the contract: a type checker proves here that the class has every
    # member of the Protocol with a compatible signature (the tests check it at run time).
    def _implements_the_backend_protocol(service: InferenceService) -> InferenceBackend:
        return service

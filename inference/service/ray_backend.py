"""The Ray backend (`INFERENCE_BACKEND=ray`): the tasks run as Ray Serve deployments.

    async with RayBackend(settings) as service:          # the same API as InferenceService
        ticket = service.submit("classify", image, user=author_id)   # Busy at once if full
        predictions = await ticket

`RAY_ADDRESS` names a cluster to connect to; without it the backend starts a local Ray instance
that it owns and stops on `close()`.  It uses the Serve application `vision` when it is running
(deployed by `serve run inference.serve_app:app` or another bot process), and deploys it from
its own settings otherwise (`inference.service.ray_app`).  Everything a caller touches stays on
this process's event loop, as with the local backend: option checks, per-user caps, the task's
queue limit (this process's requests not taken up yet, and reservations), deadlines,
cancellation (the Serve request is cancelled), positions (`ray_lane`); what is done the same
way as there is `admission.LaneBackend`'s.  Ray's own calls that block (`ray.init`, `serve.run`,
`ray.shutdown`) run in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import TYPE_CHECKING, Any

from config import Settings
from inference.errors import ModelUnavailable
from inference.service.admission import LaneBackend
from inference.service.ray_app import APP_NAME, build_app, replicas_cpus_needed
from inference.service.ray_lane import ClientLoop, RayLane, in_own_context
from inference.service.types import ModelState
from inference.tasks import TASKS, get_task

if TYPE_CHECKING:
    from inference.service.api import InferenceBackend

log = logging.getLogger(__name__)

#: The object store of a local instance: results are at most a few MB (a zebra PNG), images
#: at most `MAX_IMAGE_BYTES`; Ray's default (30% of the memory) would reserve gigabytes.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


class RayBackend(LaneBackend[RayLane]):
    """The Ray Serve `InferenceBackend` (see `inference.service.api` for the contract)."""

    def __init__(self, settings: Settings, *, app_name: str = APP_NAME) -> None:
        super().__init__(settings)
        self.app_name = app_name
        self._client: ClientLoop | None = None
        #: Whether this backend started the Ray instance (and stops it, Serve included, on close).
        self.owns_ray = False
        #: Whether this backend connected this process to Ray (and disconnects on close).
        self._connected = False

    # -- life cycle -----------------------------------------------------------------------------

    async def _open_lanes(self, loop: asyncio.AbstractEventLoop) -> dict[str, RayLane]:
        """Connect to Ray (or start a local instance) and find or deploy the application."""
        try:
            handles = await asyncio.to_thread(in_own_context, self._connect_and_deploy)
        except Exception as error:  # no cluster at RAY_ADDRESS, a deployment that failed…
            if self._connected:
                await asyncio.to_thread(in_own_context, _disconnect, self.owns_ray)
            where = self.settings.ray_address or "a local Ray instance"
            raise ModelUnavailable(f"The models could not start on {where} ({type(error).__name__}: {error}).") from error
        self._client = client = ClientLoop()
        return {task: RayLane(self.settings, get_task(task), loop, client, handles[task]) for task in TASKS}

    def _connect_and_deploy(self) -> dict[str, Any]:
        import ray
        from ray import serve

        if not ray.is_initialized():
            if self.settings.ray_address:  # a cluster: connect, and only disconnect on close
                ray.init(address=self.settings.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(
                    # Logical CPUs: every replica gets started, as the local backend starts a
                    # worker per task whatever the core count.
                    num_cpus=max(os.cpu_count() or 1, math.ceil(replicas_cpus_needed(self.settings))),
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                )
                self.owns_ray = True
            self._connected = True
        if self.owns_ray:
            serve.start(proxy_location="Disabled")  # the bot needs no HTTP ingress of its own
        if self.app_name not in serve.status().applications:
            serve.run(build_app(self.settings), name=self.app_name, route_prefix=None)
        return {task: serve.get_deployment_handle(task, app_name=self.app_name) for task in TASKS}

    async def warm_up(self, *tasks: str) -> list[ModelState]:
        """Load the models of `tasks` (default: all) on their replicas; their states."""
        self._check_open()
        lanes = [self._lane(task) for task in (tasks or TASKS)]
        return list(await asyncio.gather(*(lane.warm_up() for lane in lanes)))

    async def _shut_down(self, grace_s: float) -> None:
        """The requests answered (`_drain`: the waiting ones cancelled on Serve), the client
        loop stopped, then Ray left (stopped, if this backend started it)."""
        lanes = list(self._lanes.values())
        # Each request's driver cancels its Serve request once the request is answered.
        drivers = [driver for lane in lanes for driver in lane.drivers()]
        await self._drain(lanes, grace_s)
        await asyncio.gather(*(asyncio.wrap_future(driver) for driver in drivers), return_exceptions=True)
        if self._client is not None:
            await asyncio.to_thread(self._client.stop)
        if self._connected:
            await asyncio.to_thread(in_own_context, _disconnect, self.owns_ray)


def _disconnect(stop_serve: bool) -> None:
    """Leave Ray: a local instance this backend started is stopped with it (Serve first, so its
    replicas go in order); from a cluster, this process only disconnects."""
    import ray
    from ray import serve

    try:
        if stop_serve:
            serve.shutdown()
    finally:
        ray.shutdown()


if TYPE_CHECKING:

    def _implements_the_backend_protocol(backend: RayBackend) -> InferenceBackend:
        return backend

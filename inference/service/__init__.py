"""The inference service: one interface (`api`), its result types (`types`) and the local
backend (`local`: a waiting line per task (`lane`), a worker process per task (`supervisor`));
`create_service(settings)` (`factory`) builds the one `INFERENCE_BACKEND` names (`ray`: `ray_backend`).
What both backends do alike is in `admission` (admission, life cycle), `lanes` (the request
record, the counting) and `tickets` (their tickets and reservations).

    from inference.service import InferenceService, InferenceBackend, ModelState, Ticket
"""

from inference.errors import Busy
from inference.service.api import InferenceBackend, Reservation, Ticket
from inference.service.factory import create_service
from inference.service.lane import MAX_BATCHES_IN_FLIGHT
from inference.service.lanes import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S
from inference.service.local import InferenceService
from inference.service.supervisor import STALL_GRACE_S, WATCHDOG_INTERVAL_S
from inference.service.tickets import LaneReservation, LaneTicket
from inference.service.types import LATENCY_WINDOW, MissingWeights, ModelState, ServiceStats, TaskStats
from inference.tasks import TASKS

__all__ = [
    "LATENCY_WINDOW",
    "MAX_BATCHES_IN_FLIGHT",
    "MAX_RETRY_AFTER_S",
    "MIN_RETRY_AFTER_S",
    "STALL_GRACE_S",
    "TASKS",
    "WATCHDOG_INTERVAL_S",
    "Busy",
    "InferenceBackend",
    "InferenceService",
    "LaneReservation",
    "LaneTicket",
    "MissingWeights",
    "ModelState",
    "Reservation",
    "ServiceStats",
    "TaskStats",
    "Ticket",
    "create_service",
]

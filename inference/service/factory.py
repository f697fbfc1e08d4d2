"""Which backend runs the models: `create_service(settings)` by `INFERENCE_BACKEND`.

    service = create_service(settings)     # "local": InferenceService; "ray": RayBackend
    async with service: ...

Ray is imported only for the Ray backend: the bot's process with the local backend never loads it.
"""

from __future__ import annotations

from config import Settings
from inference.service.api import InferenceBackend
from inference.service.local import InferenceService


def create_service(settings: Settings) -> InferenceBackend:
    """The backend `settings.inference_backend` names, not started yet."""
    if settings.inference_backend == "ray":
        from inference.service.ray_backend import RayBackend  # imports ray: only when asked for

        return RayBackend(settings)
    return InferenceService(settings)

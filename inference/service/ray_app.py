"""The Ray Serve application: one deployment per task of `inference.tasks`, from the settings.

    app = build_app(settings)          # inference.serve_app: `serve run inference.serve_app:app`
    serve.run(app, name=APP_NAME)      # what the Ray backend does when the app is not deployed

Per task: the batch policy of the local backend (`TaskSpec.max_batch_size`, `MAX_BATCH_WAIT_MS`),
`max_queued_requests` = the task's queue limit (Serve's back-pressure: `BackPressureError` once
that many requests of one caller wait for a replica), replicas from `RAY_MIN_REPLICAS` /
`RAY_MAX_REPLICAS` (autoscaling between them when they differ) and a GPU per replica when the
cluster has one (or the settings ask for CUDA).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve import Application

from config import Settings
from inference.service.ray_replica import Ingress, TaskReplica
from inference.tasks import TASKS, get_task
from inference.worker.protocol import WorkerConfig

#: The Serve application's name, shared by every bot process that uses the cluster.
APP_NAME = "vision"

#: A replica holds this many batches of requests at once: one on the model, one forming.
BATCHES_PER_REPLICA = 2


def replica_cpus(settings: Settings) -> float:
    """CPUs a replica reserves: `CPU_CORES` (its torch threads), or 1 when that is 0 (every core)."""
    return float(settings.cpu_cores) if settings.cpu_cores > 0 else 1.0


def cluster_has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def deployment_options(settings: Settings, task: str, *, gpu: bool) -> dict[str, Any]:
    """`serve.deployment` options of a task's deployment."""
    spec = get_task(task)
    batch = spec.max_batch_size(settings, "cuda" if gpu else "cpu")
    options: dict[str, Any] = dict(
        name=task,
        # Room for a batch on the model and the next one forming in `@serve.batch`'s queue.
        max_ongoing_requests=BATCHES_PER_REPLICA * batch,
        max_queued_requests=spec.queue_limit(settings),
        ray_actor_options={"num_cpus": replica_cpus(settings), "num_gpus": 1 if gpu else 0},
        # Warm replicas keep their model: the one a scale-down stops gets a while to finish.
        graceful_shutdown_timeout_s=settings.request_timeout_s,
    )
    low, high = settings.ray_min_replicas, max(settings.ray_min_replicas, settings.ray_max_replicas)
    if high > low:
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            # Scale up once a replica has more than a full batch in hand.
            "target_ongoing_requests": batch,
        }
    else:
        options["num_replicas"] = low
    return options


def replica_arguments(settings: Settings, task: str, *, gpu: bool) -> tuple[WorkerConfig, int, float]:
    """What a replica is built with: plain values (no token), its batch size and wait."""
    config = WorkerConfig.from_settings(task, settings)
    if gpu and config.device == "auto":
        config = dataclasses.replace(config, device="cuda")
    batch = get_task(task).max_batch_size(settings, "cuda" if gpu else "cpu")
    return config, batch, max(0.0, settings.max_batch_wait_ms) / 1000.0


def build_app(settings: Settings, *, gpu: bool | None = None) -> Application:
    """The application: an ingress bound to one deployment per task.  `gpu`: whether replicas
    ask for a GPU; None decides from the cluster (when connected) and `DEVICE`."""
    if gpu is None:
        gpu = settings.device.startswith("cuda") or (settings.device == "auto" and cluster_has_gpu())
    deployments = [
        serve.deployment(TaskReplica, **deployment_options(settings, task, gpu=gpu)).bind(
            *replica_arguments(settings, task, gpu=gpu)
        )
        for task in TASKS
    ]
    ingress = serve.deployment(Ingress, name="ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(*deployments)


def replicas_cpus_needed(settings: Settings) -> float:
    """CPUs the application reserves at its most replicas (a local instance must have them)."""
    return len(TASKS) * max(settings.ray_min_replicas, settings.ray_max_replicas) * replica_cpus(settings)

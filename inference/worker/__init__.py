"""One worker process per task: the messages (`protocol`), the child (`process`) and the
parent's handle on it (`handle`).  Below the service, above the models; no torch at import."""

from inference.worker.handle import WorkerHandle
from inference.worker.process import run_worker
from inference.worker.protocol import (
    Batch,
    Cancel,
    Load,
    Outcome,
    Results,
    Started,
    StateChanged,
    Stop,
    Unsendable,
    WorkerConfig,
    WorkItem,
)
from inference.worker.resources import keep_freed_memory, worker_threads

__all__ = [
    "Batch",
    "Cancel",
    "Load",
    "Outcome",
    "Results",
    "Started",
    "StateChanged",
    "Stop",
    "Unsendable",
    "WorkItem",
    "WorkerConfig",
    "WorkerHandle",
    "keep_freed_memory",
    "run_worker",
    "worker_threads",
]

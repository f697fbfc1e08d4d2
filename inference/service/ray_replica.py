"""The Ray Serve side of the Ray backend: one deployment per task, batching with `@serve.batch`.

A replica does what a local worker process does (`inference.worker.process`): it loads and keeps
the task's models by the same rules (`inference.worker.models.ModelShelf`, from a `WorkerConfig`:
plain values, never the Discord token), decodes and preprocesses with the same limits and decode
budget (`inference.worker.decoding`), runs the model on the batch and answers each request on its
own: one image that cannot be decoded fails only its own request, as the same `InferenceError`.

Each request is a stream of two items: `STARTED` when its batch is taken up (so the client
knows what still waits: positions, `Busy`, what `close()` may drop), then its `Outcome`.
Cancelled while it waits in the batch queue, it never reaches the model (`@serve.batch` drops
cancelled requests when it forms a batch).

Imported by the Ray backend's client (to build the application) and by the replicas; torch only
ever in a replica, when the model loads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from inference.errors import InferenceError
from inference.service.types import ModelState
from inference.worker.decoding import DecodeBudget, prepare_one
from inference.worker.models import ModelShelf
from inference.worker.protocol import WorkerConfig
from inference.worker.resources import worker_threads

logger = logging.getLogger(__name__)

#: The first item of every request's stream: its batch was taken up.
STARTED = "started"


@dataclass(frozen=True)
class Outcome:
    """One request's answer: `value`, or `error` (an `InferenceError`, raised by the client)."""

    value: Any = None
    error: InferenceError | None = None
    #: The size of the model batch it went through; 0 when it never reached the model.
    model_batch: int = 0
    model_seconds: float = 0.0


class TaskReplica:
    """One replica of a task's deployment: its models, loaded on first use, and its batches."""

    def __init__(self, config: WorkerConfig, max_batch_size: int, batch_wait_s: float) -> None:
        self.config = config
        self._in_batches.set_max_batch_size(max_batch_size)
        self._in_batches.set_batch_wait_timeout_s(batch_wait_s)
        #: Its models, loaded and kept by the worker processes' rules.
        self._models = ModelShelf(config)
        self._limits = config.image_limits()
        self._decode_budget = DecodeBudget(self._limits.max_decode_bytes)
        self._load_lock = threading.Lock()
        #: Why the configured model could not load last time; None once it did.
        self._load_error: InferenceError | None = None
        self._model_runs = 0

    async def warm_up(self) -> ModelState:
        """Load the configured model now; its state once loaded or failed."""
        await asyncio.to_thread(self._pipeline, self.config.model)
        return self.model_state()

    def model_state(self) -> ModelState:
        task, model, device = self.config.task, self.config.model, self._models.device_type
        pipeline = self._models.pipelines.get(model)
        if pipeline is not None:
            name = str(getattr(pipeline, "name", model))
            return ModelState(task, name, "ready", runtime=self._models.runtimes.get(model, ""), device=device)
        if self._load_error is not None:
            return ModelState(task, model, "unavailable", device=device, error=str(self._load_error))
        return ModelState(task, model, "idle")

    async def infer(self, image: bytes, options: dict[str, Any]) -> AsyncIterator[Any]:
        """One request's stream: `STARTED`, then its `Outcome` (Serve streams only from a method
        that is itself an async generator, so this one wraps the batched one)."""
        async for item in self._in_batches(image, options):
            yield item

    async def model_runs(self) -> int:
        """Requests this replica has put through a model (what a cancellation must spare)."""
        return self._model_runs

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _in_batches(self, images: list[bytes], options: list[dict[str, Any]]) -> AsyncIterator[list[Any]]:
        yield [STARTED] * len(images)
        # The model's work runs in a thread: the replica's loop keeps streaming and cancelling.
        yield await asyncio.to_thread(self._answer, images, options)

    # -- in the model's thread ----------------------------------------------------------------

    def _pipeline(self, model_name: str) -> Any:
        """The pipeline of `model_name`, loaded if it is not (`ModelShelf`, as in a worker); on
        failure its error (and a new try on its next request)."""
        with self._load_lock:
            if (pipeline := self._models.get(model_name)) is not None:
                return pipeline
            pipeline = self._models.load(model_name, worker_threads(self.config.cpu_cores))
            if model_name == self.config.model:
                self._load_error = pipeline if isinstance(pipeline, InferenceError) else None
            return pipeline

    def _answer(self, images: list[bytes], options: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(images)
        by_model: dict[str, list[int]] = {}
        for index, request_options in enumerate(options):
            by_model.setdefault(self._models.model_of(request_options), []).append(index)
        for model_name, indices in by_model.items():
            pipeline = self._pipeline(model_name)
            if isinstance(pipeline, InferenceError):
                for index in indices:
                    outcomes[index] = Outcome(error=pipeline)
                continue
            ready: list[tuple[int, Any]] = []
            for index in indices:
                prepared = self._prepare(pipeline, images[index])
                if isinstance(prepared, InferenceError):
                    outcomes[index] = Outcome(error=prepared)
                else:
                    ready.append((index, prepared))
            for chunk in self._chunks(pipeline, ready):
                for index, outcome in self._run_model(pipeline, chunk, options):
                    outcomes[index] = outcome
        return [outcome or Outcome(error=InferenceError("The model returned no result.")) for outcome in outcomes]

    def _prepare(self, pipeline: Any, data: bytes) -> Any:
        return prepare_one(pipeline, data, self._limits, self._decode_budget, task=self.config.task)

    def _chunks(self, pipeline: Any, ready: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
        """Equal shapes go through the model together where `ModelShelf.stacks` says so (the
        worker's rule); else one input at a time."""
        if not self._models.stacks(pipeline):
            return [[entry] for entry in ready]
        groups: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
        for entry in ready:
            groups.setdefault(tuple(entry[1].shape), []).append(entry)
        return list(groups.values())

    def _run_model(
        self, pipeline: Any, chunk: list[tuple[int, Any]], options: list[dict[str, Any]]
    ) -> list[tuple[int, Outcome]]:
        started = time.perf_counter()
        try:
            values = pipeline.run([tensor for _, tensor in chunk], [options[index] for index, _ in chunk])
        except Exception as error:
            if len(chunk) > 1:  # find the input that breaks the batch; the others get their result
                return [answer for entry in chunk for answer in self._run_model(pipeline, [entry], options)]
            if not isinstance(error, InferenceError):
                logger.exception("the %s model failed", self.config.task)
                error = InferenceError(f"The {self.config.task} model failed on that image.")
            return [(chunk[0][0], Outcome(error=error))]
        seconds = time.perf_counter() - started
        self._model_runs += len(chunk)
        return [
            (index, Outcome(value=value, model_batch=len(chunk), model_seconds=seconds))
            for (index, _), value in zip(chunk, values)
        ]


class Ingress:
    """The application's entry point: names its task deployments.  The bot's backend talks to
    each task's deployment directly (`serve.get_deployment_handle`); this only makes the tasks
    one application, which `serve run` and a config file deploy together."""

    def __init__(self, *tasks: Any) -> None:
        self.task_count = len(tasks)

    async def __call__(self, request: Any = None) -> dict[str, int]:
        return {"tasks": self.task_count}

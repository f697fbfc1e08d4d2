"""The Ray Serve side of the Ray backend: one deployment per task, batching with `@serve.batch`.

A replica does what a local worker process does (`inference.worker.process`): it loads the
task's pipeline with the same call (the registry's `get_model(...).load`, from a `WorkerConfig`:
plain values, never the Discord token), decodes with `inference.images.decode_image` and the same
limits, preprocesses, runs the model on the batch and answers each request on its own: one
image that cannot be decoded fails only its own request, as the same `InferenceError` type.

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
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from inference.errors import InferenceError, ModelUnavailable
from inference.service.types import ModelState
from inference.tasks import MODEL_OPTION
from inference.worker.protocol import WorkerConfig

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
        #: Model name → its pipeline, least recently used first (`MAX_LOADED_MODELS`, as a worker).
        self._pipelines: OrderedDict[str, Any] = OrderedDict()
        #: "cpu" or "cuda" once a model loaded; "" before.
        self._device_type = ""
        #: Model name → what runs it ("onnx", "torch").
        self._runtimes: dict[str, str] = {}
        self._load_lock = threading.Lock()
        #: Why the configured model could not load last time; None once it did.
        self._load_error: InferenceError | None = None
        self._model_runs = 0

    async def warm_up(self) -> ModelState:
        """Load the configured model now; its state once loaded or failed."""
        await asyncio.to_thread(self._pipeline, self.config.model)
        return self.model_state()

    def model_state(self) -> ModelState:
        task, model, device = self.config.task, self.config.model, self._device_type
        pipeline = self._pipelines.get(model)
        if pipeline is not None:
            name = str(getattr(pipeline, "name", model))
            return ModelState(task, name, "ready", runtime=self._runtimes.get(model, ""), device=device)
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
        """The pipeline of `model_name`, loaded if it is not; on failure its error (and a new try
        on its next request)."""
        with self._load_lock:
            if (pipeline := self._pipelines.get(model_name)) is not None:
                self._pipelines.move_to_end(model_name)
                return pipeline
            from inference.worker.process import MAX_LOADED_MODELS, keep_freed_memory, worker_threads

            while len(self._pipelines) >= MAX_LOADED_MODELS:
                self._pipelines.popitem(last=False)  # before loading: memory stays bounded
            threads = worker_threads(self.config.cpu_cores)
            try:
                loaded = self._load(model_name, threads)
            except Exception as error:
                if not isinstance(error, InferenceError):  # a bug or the environment: details to the log
                    logger.exception("loading the %s model %s failed", self.config.task, model_name)
                    error = ModelUnavailable(f"The {model_name} model could not be loaded ({type(error).__name__}: {error}).")
                if model_name == self.config.model:
                    self._load_error = error
                return error
            if loaded.runtime == "torch":
                import torch

                torch.set_num_threads(threads)
                keep_freed_memory()  # as in a worker: torch's activations are reused, not remapped
            self._runtimes[model_name] = loaded.runtime
            self._device_type = loaded.device
            pipeline = loaded.pipeline
            if model_name == self.config.model:
                self._load_error = None
            self._pipelines[model_name] = pipeline
            return pipeline

    def _load(self, model_name: str, threads: int) -> Any:
        """The call that builds a pipeline, as in the worker processes (`_Worker._load`): the
        runtime INFERENCE_RUNTIME and the export's parity check choose (`inference.runtime`)."""
        from inference.runtime.loader import load_for_worker

        return load_for_worker(self.config.task, model_name, self.config.loader_settings(), self.config.device, threads)

    def _answer(self, images: list[bytes], options: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(images)
        by_model: dict[str, list[int]] = {}
        for index, request_options in enumerate(options):
            by_model.setdefault(str(request_options.get(MODEL_OPTION) or self.config.model), []).append(index)
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
        from inference.images import ImageLimits, decode_image

        limits = ImageLimits(
            max_bytes=self.config.max_image_bytes,
            max_pixels=self.config.max_image_pixels,
            max_aspect_ratio=self.config.max_image_aspect_ratio,
            max_jpeg_scans=self.config.max_jpeg_scans,
        )
        try:
            return pipeline.preprocess(decode_image(data, limits, draft_size=pipeline.draft_size))
        except InferenceError as error:
            return error
        except Exception:
            logger.exception("preparing a %s request failed", self.config.task)
            return InferenceError("That image could not be decoded.")

    def _chunks(self, pipeline: Any, ready: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
        """Equal shapes go through the model together where the pipeline or device allows it
        (the worker's rule, `_Worker._chunks`); size-dependent models one at a time on a CPU."""
        if not (pipeline.fixed_input_size or self._device_type == "cuda"):
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

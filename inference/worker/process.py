"""The worker process: decode, preprocess and run one task's model, batch after batch.

The service (main process, asyncio) sends *batches* of undecoded image bytes
(`inference.worker.protocol`); the worker decodes, preprocesses, runs the model and sends back
one outcome per request.  A reader thread takes messages off the pipe (a `Cancel` is applied at
once, out of band) and the model's thread works through the batches: load the model once, decode
(+ draft) and preprocess every image of the batch, run the model, send the results.

How decoding meets the model depends on the device; measured with inference/bench.py:
- CPU: the images of a batch are decoded side by side on all cores, *between* model calls, as
  many at once as fit in the worker's decode budget (DECODE_MEMORY_MB, `inference.worker.decoding`).
  Decoding *beside* the model (a pipeline thread) was slower: torch's thread team then shares
  the cores with the decoder, and each of its barriers waits for a descheduled thread.
- GPU: a prepare thread decodes batch N+1 while the GPU runs batch N, so the GPU never waits
  for JPEG decoding.
The worker also keeps freed memory for reuse (`keep_freed_memory`): without it, glibc maps and
unmaps a batch's activations on every forward pass, and batching *lost* throughput on the CPU.

A request may name its model (`inference.tasks.MODEL_OPTION`, a zebra style): the worker keeps
up to `MAX_LOADED_MODELS` loaded (`inference.worker.models`) and runs each batch model by model.  A model that cannot load
fails the requests that need it and is tried again on the next one; an image that cannot be
decoded fails only its own request.

Which runtime runs a model is `inference.runtime.load_for_worker`'s choice (INFERENCE_RUNTIME).
A worker whose models all run in ONNX Runtime never imports torch (issue 14: a torch runtime is
most of a worker's memory); one that runs a torch model imports it for that model's load.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from inference.errors import InferenceError
from inference.worker.decoding import DecodeBudget, HeldImage, decode_held, prepare_held
from inference.worker.protocol import (
    Batch,
    BatchHeader,
    Cancel,
    Load,
    Outcome,
    Results,
    Started,
    StateChanged,
    Stop,
    WorkerConfig,
    WorkItem,
    receive_batch,
)
from inference.worker.models import ModelShelf
from inference.worker.resources import worker_threads

logger = logging.getLogger(__name__)

# --- the worker process ---------------------------------------------------------------------------


def run_worker(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a worker process (started with the "spawn" context)."""
    # Ctrl-C in a terminal reaches the whole process group: let the parent decide and stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _Worker(config, conn).serve()
    # Everything is answered.  Skip the interpreter's teardown (torch's takes seconds): the
    # parent waits for this exit when it shuts down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class _Prepared:
    batch_id: int
    #: (request id, input tensor, options) of the items ready for the model.
    ready: list[tuple[int, Any, dict[str, Any]]] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    skipped: int = 0
    #: The threads the service granted the batch (0: none granted, keep the worker's own).
    threads: int = 0
    #: Model name → the pipeline its inputs were prepared for, held until the batch has run
    #: (a model evicted meanwhile by the next batch's load still finishes this one).
    pipelines: dict[str, Any] = field(default_factory=dict)


class _Worker:
    def __init__(self, config: WorkerConfig, conn: Connection) -> None:
        self.task = config.task
        self.config = config
        self.conn = conn
        # Until a batch brings its grant (loading, warm-up): the whole budget.
        self.threads = worker_threads(config.cpu_cores)
        self.models = ModelShelf(config)
        self.overlap_decoding = self.models.device_type == "cuda"
        self.limits = config.image_limits()
        #: What the decoder threads may hold at once (one batch is prepared at a time).
        self.decode_budget = DecodeBudget(self.limits.max_decode_bytes)
        self.decoders = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="worker-decode")
        self.inbox: queue.SimpleQueue[Batch | Load | None] = queue.SimpleQueue()
        # GPU only: one batch prepared ahead of the model, no more (bounded memory, and a
        # cancellation that arrives meanwhile still saves the model's time).
        self.prepared: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)
        self.cancelled: set[int] = set()
        self.cancelled_lock = threading.Lock()
        self.send_lock = threading.Lock()

    # -- threads ----------------------------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._read_loop, name="worker-reader", daemon=True).start()
        if self.overlap_decoding:
            threading.Thread(target=self._prepare_loop, name="worker-prepare", daemon=True).start()
            while (job := self.prepared.get()) is not None:
                self._run(job)
        else:
            while (message := self.inbox.get()) is not None:
                if (job := self._take(message)) is not None:
                    self._run(job)

    def _read_loop(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody wants our results
                break
            if isinstance(message, Cancel):
                with self.cancelled_lock:
                    self.cancelled.update(message.request_ids)
            elif isinstance(message, BatchHeader):
                try:
                    self.inbox.put(receive_batch(self.conn, message))
                except (EOFError, OSError):
                    break
            elif isinstance(message, Load):
                self.inbox.put(message)
            elif isinstance(message, Stop):
                break
        self.inbox.put(None)

    def _prepare_loop(self) -> None:
        while (message := self.inbox.get()) is not None:
            if (job := self._take(message)) is not None:
                self.prepared.put(job)
        self.prepared.put(None)

    def _take(self, message: Batch | Load) -> _Prepared | None:
        """A batch → its prepared inputs; a `Load` → load the model and report (no job)."""
        if isinstance(message, Batch):
            self._send(Started(message.batch_id))
            return self._prepare(message)
        if (loaded := self.models.pipelines.get(self.config.model)) is not None:  # say so, the caller waits for it
            self._send(self._ready_report(loaded))
        else:
            self._ensure_pipeline(self.config.model)
        return None

    # -- stages -----------------------------------------------------------------------------

    @property
    def pipelines(self) -> dict[str, Any]:
        """Model name → its loaded pipeline, least recently used first."""
        return self.models.pipelines

    @property
    def pipeline(self) -> Any:
        """The pipeline used last (None before any); set: the configured model's (tests' stand-ins)."""
        return next(reversed(self.pipelines.values()), None)

    @pipeline.setter
    def pipeline(self, pipeline: Any) -> None:
        self.pipelines[self.config.model] = pipeline

    def _ensure_pipeline(self, model_name: str) -> Any:
        """The pipeline of `model_name`, loaded if it is not (`ModelShelf`); on failure the
        error (tried again on its next request), reported as the task's state."""
        if (pipeline := self.models.get(model_name)) is not None:
            return pipeline
        self._send(StateChanged("loading", device=self.models.device_type))
        pipeline = self.models.load(model_name, self.threads)
        if isinstance(pipeline, InferenceError):
            # The configured model failing makes the task unavailable; a style fails its requests only.
            state = "unavailable" if model_name == self.config.model else ("ready" if self.pipelines else "idle")
            self._send(StateChanged(state, error=str(pipeline)))
            return pipeline
        self._send(self._ready_report(pipeline))
        return pipeline

    def _ready_report(self, pipeline: Any) -> StateChanged:
        # The task's state names its configured model (`/status`, `models()`), not one beside it.
        name = str(getattr(pipeline, "name", self.task)) if pipeline is self.pipelines.get(self.config.model) else ""
        runtime = self.models.runtimes.get(self.config.model, "") if name else ""
        need = self.models.memory_need() or 0
        return StateChanged("ready", model=name, device=self.models.device_type, runtime=runtime, memory_need=need)

    def _prepare(self, batch: Batch) -> _Prepared:
        prepared = _Prepared(batch.batch_id, threads=batch.threads)
        by_model: dict[str, list[WorkItem]] = {}  # one load and one draft size per model
        for item in batch.items:
            if self._take_cancelled(item.request_id):
                prepared.skipped += 1
            else:
                by_model.setdefault(self.models.model_of(item.options), []).append(item)
        for model_name, todo in by_model.items():
            pipeline = self._ensure_pipeline(model_name)
            if isinstance(pipeline, InferenceError):
                prepared.failed.extend(Outcome(item.request_id, error=pipeline) for item in todo)
                continue
            prepared.pipelines[model_name] = pipeline
            self._use_threads(batch.threads)  # the decoders' and the preprocessing's share
            # Pillow decodes with the GIL released: the images of a batch decode side by side, as
            # many as fit in the decode budget.  Preprocessing (torch ops) stays on this thread:
            # torch ops called from the decoder threads would start thread teams of their own,
            # and with more OpenMP threads than cores the model's team stops spinning and sleeps
            # at every barrier.  It frees each image's share of the budget.
            outcomes: list[Any] = [None] * len(todo)
            for index, held in self._decoded(todo, pipeline.draft_size):
                outcomes[index] = prepare_held(pipeline, held, self.decode_budget, task=self.task)
            for item, outcome in zip(todo, outcomes):  # in the batch's order, however they finished
                if isinstance(outcome, InferenceError):
                    prepared.failed.append(Outcome(item.request_id, error=outcome))
                else:
                    prepared.ready.append((item.request_id, outcome, item.options))
        return prepared

    def _decoded(
        self, todo: list[WorkItem], draft_size: tuple[int, int] | None
    ) -> Iterator[tuple[int, HeldImage | InferenceError]]:
        """(index in `todo`, its decoded image or error), as decodes finish.

        In the order they finish, not the batch's: image 0 may wait for the budget that image 1
        holds, and only taking image 1 on frees it.
        """
        decode = functools.partial(
            decode_held, limits=self.limits, budget=self.decode_budget, draft_size=draft_size, task=self.task
        )
        if len(todo) == 1:  # no thread hand-off for one image
            yield 0, decode(todo[0].image)
            return
        futures = {self.decoders.submit(decode, item.image): index for index, item in enumerate(todo)}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def _use_threads(self, threads: int) -> None:
        """Run with the batch's grant of the service's core budget: the model's threads (set on
        the calling thread: OpenMP's count is per thread) and the decoder pool's size."""
        if threads < 1:
            return
        own_pools = [getattr(pipeline, "set_threads", None) for pipeline in self.pipelines.values()]
        for set_threads in filter(None, own_pools):  # ONNX Runtime: its own thread pools
            set_threads(threads)
        if not all(own_pools):  # a torch model is loaded, so torch is imported already
            import torch

            if torch.get_num_threads() != threads:  # changing it rebuilds torch's team
                torch.set_num_threads(threads)
        if threads != self.threads:
            self.threads = threads
            decoders, self.decoders = self.decoders, ThreadPoolExecutor(threads, thread_name_prefix="worker-decode")
            decoders.shutdown(wait=False)

    def _run(self, job: _Prepared) -> None:
        self._use_threads(job.threads)  # on the model's thread (the GPU path prepares on another)
        if job.failed:
            self._send(Results(job.batch_id, job.failed))
        skipped = job.skipped
        for pipeline, chunk in self._chunks(job):
            live = [entry for entry in chunk if not self._take_cancelled(entry[0])]
            skipped += len(chunk) - len(live)
            for results in self._run_model(job.batch_id, pipeline, live) if live else []:
                self._send(results)
        self._send(Results(job.batch_id, [], final=True, skipped=skipped, threads=job.threads))
        # Request ids grow batch after batch: a cancellation of an id up to this batch's that
        # was not used came after its result, and will never be.
        newest = max((entry[0] for entry in job.ready), default=0)
        with self.cancelled_lock:
            self.cancelled = {request_id for request_id in self.cancelled if request_id > newest}

    def _chunks(self, job: _Prepared) -> list[tuple[Any, list[tuple[int, Any, dict[str, Any]]]]]:
        """Which inputs go through which model together: (pipeline, inputs), one model per chunk;
        equal shapes stacked where `ModelShelf.stacks` says so, else one input at a time."""
        chunks: list[tuple[Any, list[tuple[int, Any, dict[str, Any]]]]] = []
        groups: dict[tuple[str, tuple[int, ...]], list[tuple[int, Any, dict[str, Any]]]] = {}
        for entry in job.ready:
            model_name = self.models.model_of(entry[2])
            pipeline = job.pipelines[model_name]
            if self.models.stacks(pipeline):
                groups.setdefault((model_name, tuple(entry[1].shape)), []).append(entry)
            else:
                chunks.append((pipeline, [entry]))
        return chunks + [(job.pipelines[model_name], group) for (model_name, _), group in groups.items()]

    def _run_model(self, batch_id: int, pipeline: Any, entries: list[tuple[int, Any, dict[str, Any]]]) -> list[Results]:
        started = time.perf_counter()
        try:
            values = pipeline.run([tensor for _, tensor, _ in entries], [options for _, _, options in entries])
        except Exception as error:
            if len(entries) > 1:
                # Find the input that breaks the batch: the others still deserve their result.
                return [results for entry in entries for results in self._run_model(batch_id, pipeline, [entry])]
            if not isinstance(error, InferenceError):
                logger.exception("the %s model failed", self.task)
                error = InferenceError(f"The {self.task} model failed on that image.")
            return [Results(batch_id, [Outcome(entries[0][0], error=error)])]
        seconds = time.perf_counter() - started
        outcomes = [Outcome(request_id, value=value) for (request_id, _, _), value in zip(entries, values)]
        return [Results(batch_id, outcomes, model_batch=len(entries), model_seconds=seconds)]

    # -- helpers ----------------------------------------------------------------------------

    def _take_cancelled(self, request_id: int) -> bool:
        with self.cancelled_lock:
            if request_id in self.cancelled:
                self.cancelled.discard(request_id)
                return True
            return False

    def _send(self, message: StateChanged | Started | Results) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):  # the parent is gone; the reader thread ends us
                pass

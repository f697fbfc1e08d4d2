"""The process boundary: one worker process per task, and the handle the service holds on it.

The service (main process, asyncio) sends *batches* of undecoded image bytes; the worker decodes,
preprocesses, runs the model and sends back one outcome per request.  Both sides of that
conversation live in this module, so the protocol can be read in one place:

    main → worker   Batch(batch_id, items) | Cancel(request_ids) | Load() | Stop()
    worker → main   StateReport(state, model, detail) | Results(batch_id, outcomes, …, final)

Inside the worker, a reader thread takes messages off the pipe (a `Cancel` is applied at once,
out of band) and the model's thread works through the batches: load the model once, decode (+
draft) and preprocess every image of the batch, run the model, send the results.

How decoding meets the model depends on the device; measured with inference/bench.py:
- CPU: the images of a batch are decoded side by side on all cores, *between* model calls.
  Decoding *beside* the model (a pipeline thread) was slower: torch's thread team then shares
  the cores with the decoder, and each of its barriers waits for a descheduled thread.
- GPU: a prepare thread decodes batch N+1 while the GPU runs batch N, so the GPU never waits
  for JPEG decoding.
The worker also keeps freed memory for reuse (`keep_freed_memory`): without it, glibc maps and
unmaps a batch's activations on every forward pass, and batching *lost* throughput on the CPU.

A model that cannot load fails the requests of that batch with its error and is tried again on
the next batch.  One image that cannot be decoded fails only its own request.

In the main process, `WorkerHandle` owns the process and its pipe: a reader thread turns
incoming messages into callbacks on the event loop (`call_soon_threadsafe`), a writer thread
does the pickling and the blocking `send`, so a 25 MB image never stalls the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from config import Settings
from inference.errors import InferenceError, ModelUnavailable

logger = logging.getLogger(__name__)

# --- the protocol -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    request_id: int
    image: bytes
    options: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    batch_id: int
    items: list[WorkItem]


@dataclass(frozen=True)
class _BatchHeader:
    """A `Batch` on the wire: this header, then each item's image as one raw message.

    Pickling would copy every image into one buffer while holding the GIL (8 × 25 MB stalled
    the event loop for 100+ ms); `send_bytes` writes the bytes as they are, GIL released.
    """

    batch_id: int
    #: (request id, options) of each item, in the order their images follow.
    items: list[tuple[int, dict[str, Any]]]


def send_batch(conn: Connection, batch: Batch) -> None:
    conn.send(_BatchHeader(batch.batch_id, [(item.request_id, item.options) for item in batch.items]))
    for item in batch.items:
        conn.send_bytes(item.image)


def receive_batch(conn: Connection, header: _BatchHeader) -> Batch:
    return Batch(header.batch_id, [WorkItem(request_id, conn.recv_bytes(), options) for request_id, options in header.items])


@dataclass(frozen=True)
class Cancel:
    """These requests no longer have a caller: skip them if they have not reached the model."""

    request_ids: list[int]


@dataclass(frozen=True)
class Load:
    """Load the model now (warm-up), without a request."""


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class StateReport:
    #: "loading" | "ready" | "unavailable"
    state: str
    model: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Outcome:
    request_id: int
    value: Any = None
    error: InferenceError | None = None


@dataclass(frozen=True)
class Results:
    batch_id: int
    outcomes: list[Outcome]
    #: How many inputs went through the model together for these outcomes (0: none did).
    model_batch: int = 0
    #: Seconds the model took for them.
    model_seconds: float = 0.0
    #: True on the last message of a batch: the worker is done with it.
    final: bool = False
    #: Requests of the batch dropped because they were cancelled before reaching the model.
    skipped: int = 0


# --- the worker process ---------------------------------------------------------------------------


def worker_threads(settings: Settings) -> int:
    """Torch intra-op threads: the configured number, else one per core this process may use."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    return max(1, len(os.sched_getaffinity(0)))


def run_worker(task: str, settings: Settings, conn: Connection) -> None:
    """Entry point of a worker process (started with the "spawn" context)."""
    # Ctrl-C in a terminal reaches the whole process group: let the parent decide and stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    _Worker(task, settings, conn).serve()
    # Everything is answered.  Skip the interpreter's teardown (torch's takes seconds): the
    # parent waits for this exit when it shuts down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: glibc `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap and are reused, not mapped and unmapped each time.
MMAP_THRESHOLD_BYTES = 128 * 1024 * 1024
#: Freed memory kept for reuse before any is given back to the system.
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc reuse the model's big activation buffers instead of unmapping them.

    By default glibc serves allocations over a (moving) threshold with fresh `mmap`s and unmaps
    them on free, so every forward pass of a batch faults its activations in page by page again.
    Measured on the 2-core dev machine, EfficientNet-Lite0 per image: batch 1 11 ms, batch 8
    17-19 ms with ~7,000 page faults per image; with these settings batch 8 takes 9 ms and no
    faults.  (The CycleGAN generator at 256×256, batch 4: 477 → 341 ms per image.)  PyTorch's
    CPU tuning guide suggests jemalloc or tcmalloc for the same reason; this needs no extra
    library.  Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):
        return False


@dataclass
class _Prepared:
    batch_id: int
    #: (request id, input tensor, options) of the items ready for the model.
    ready: list[tuple[int, Any, dict[str, Any]]] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    skipped: int = 0


class _Worker:
    def __init__(self, task: str, settings: Settings, conn: Connection) -> None:
        import torch  # imported here: the parent's copy of this module never needs torch

        from inference.images import ImageLimits
        from inference.registry import resolve_device

        self.task = task
        self.settings = settings
        self.conn = conn
        self.threads = worker_threads(settings)
        torch.set_num_threads(self.threads)
        self.device = resolve_device(settings.device)
        self.overlap_decoding = self.device.type == "cuda"
        self.limits = ImageLimits.from_settings(settings)
        self.pipeline: Any = None
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
            elif isinstance(message, _BatchHeader):
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
            return self._prepare(message)
        if self.pipeline is not None:  # already loaded: say so, the caller waits for it
            self._send(StateReport("ready", model=str(getattr(self.pipeline, "name", self.task))))
        else:
            self._ensure_pipeline()
        return None

    # -- stages -----------------------------------------------------------------------------

    def _ensure_pipeline(self) -> InferenceError | None:
        """Load the model once; on failure return the error (and try again next batch)."""
        if self.pipeline is not None:
            return None
        from inference.registry import load_pipeline

        self._send(StateReport("loading"))
        try:
            pipeline = load_pipeline(self.task, self.settings, self.device)
        except InferenceError as error:
            self._send(StateReport("unavailable", detail=str(error)))
            return error
        except Exception as error:  # a bug or an environment problem: keep the details in the log
            logger.exception("loading the %s model failed", self.task)
            error = ModelUnavailable(f"The {self.task} model could not be loaded ({type(error).__name__}: {error}).")
            self._send(StateReport("unavailable", detail=str(error)))
            return error
        self.pipeline = pipeline
        self._send(StateReport("ready", model=str(getattr(pipeline, "name", self.task))))
        return None

    def _prepare(self, batch: Batch) -> _Prepared:
        prepared = _Prepared(batch.batch_id)
        load_error = self._ensure_pipeline()
        todo = []
        for item in batch.items:
            if self._take_cancelled(item.request_id):
                prepared.skipped += 1
            elif load_error is not None:
                prepared.failed.append(Outcome(item.request_id, error=load_error))
            else:
                todo.append(item)
        # Pillow decodes with the GIL released: the images of a batch decode side by side.
        # Preprocessing (torch ops) stays on this thread: torch ops called from the decoder
        # threads would start thread teams of their own, and with more OpenMP threads than cores
        # the model's team stops spinning and sleeps at every barrier.
        images = self.decoders.map(self._decode, todo) if len(todo) > 1 else map(self._decode, todo)
        for item, image in zip(todo, images):
            outcome = image if isinstance(image, InferenceError) else self._preprocess(image)
            if isinstance(outcome, InferenceError):
                prepared.failed.append(Outcome(item.request_id, error=outcome))
            else:
                prepared.ready.append((item.request_id, outcome, item.options))
        return prepared

    def _decode(self, item: WorkItem) -> Any:
        """One image decoded (RGB, drafted down for the model), or the error to send back."""
        from inference.images import decode_image

        try:
            return decode_image(item.image, self.limits, draft_size=self.pipeline.draft_size)
        except InferenceError as error:
            return error
        except Exception:
            logger.exception("decoding a %s request failed", self.task)
            return InferenceError("That image could not be decoded.")

    def _preprocess(self, image: Any) -> Any:
        try:
            return self.pipeline.preprocess(image)
        except InferenceError as error:
            return error
        except Exception:
            logger.exception("preprocessing a %s request failed", self.task)
            return InferenceError("That image could not be prepared for the model.")

    def _run(self, job: _Prepared) -> None:
        if job.failed:
            self._send(Results(job.batch_id, job.failed))
        skipped = job.skipped
        for chunk in self._chunks(job.ready):
            live = [entry for entry in chunk if not self._take_cancelled(entry[0])]
            skipped += len(chunk) - len(live)
            for results in self._run_model(job.batch_id, live) if live else []:
                self._send(results)
        self._send(Results(job.batch_id, [], final=True, skipped=skipped))
        # Request ids grow batch after batch: a cancellation of an id up to this batch's that
        # was not used came after its result, and will never be.
        newest = max((entry[0] for entry in job.ready), default=0)
        with self.cancelled_lock:
            self.cancelled = {request_id for request_id in self.cancelled if request_id > newest}

    def _chunks(self, ready: list[tuple[int, Any, dict[str, Any]]]) -> list[list[tuple[int, Any, dict[str, Any]]]]:
        """Which inputs go through the model together.

        Equal shapes are stacked when the pipeline says its inputs are all one size (the
        classifier's crops) or on a GPU.  Size-dependent models (CycleGAN at the photo's aspect
        ratio, the captioner) run one input at a time on the CPU: batching gains them nothing
        there (the generator at 256×256 on 2 cores: 316 ms per image alone, 341 ms in a batch
        of 4, even with `keep_freed_memory`), and each result goes back as soon as it exists
        instead of waiting for the rest of the batch.
        """
        if not ready:
            return []
        if not (self.pipeline.fixed_input_size or self.device.type == "cuda"):
            return [[entry] for entry in ready]
        groups: dict[tuple[int, ...], list[tuple[int, Any, dict[str, Any]]]] = {}
        for entry in ready:
            groups.setdefault(tuple(entry[1].shape), []).append(entry)
        return list(groups.values())

    def _run_model(self, batch_id: int, entries: list[tuple[int, Any, dict[str, Any]]]) -> list[Results]:
        started = time.perf_counter()
        try:
            values = self.pipeline.run([tensor for _, tensor, _ in entries], [options for _, _, options in entries])
        except Exception as error:
            if len(entries) > 1:
                # Find the input that breaks the batch: the others still deserve their result.
                return [results for entry in entries for results in self._run_model(batch_id, [entry])]
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

    def _send(self, message: StateReport | Results) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):  # the parent is gone; the reader thread ends us
                pass


# --- the main-process side --------------------------------------------------------------------------


class WorkerHandle:
    """One worker process as seen from the service.

    `on_message(handle, message)` and `on_exit(handle, exitcode)` are called on the event loop.
    `start()` and `stop()` block (process start-up, joins): call them in an executor.
    """

    def __init__(
        self,
        task: str,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerHandle, Any], None],
        on_exit: Callable[[WorkerHandle, int | None], None],
    ) -> None:
        self.task = task
        # The worker needs no Discord token: keep the secret in one process.
        self._settings = settings.replace(discord_token=None)
        self._loop = loop
        self._on_message = on_message
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopping = False
        self._heard_from = False
        self._writer: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        # "spawn": a fresh interpreter.  Forking a process that holds an event loop and torch's
        # thread pools copies locks in unknown states.
        context = multiprocessing.get_context("spawn")
        with self._lock:
            if self._stopping:
                return
            parent_conn, child_conn = context.Pipe(duplex=True)
            process = context.Process(
                target=run_worker,
                args=(self.task, self._settings, child_conn),
                name=f"inference-{self.task}",
                daemon=True,
            )
            process.start()
            # Only the child may hold its end: then its death shows here as end-of-file.
            child_conn.close()
            self._process, self._conn = process, parent_conn
        self._writer = threading.Thread(target=self._write_loop, name=f"{self.task}-writer", daemon=True)
        self._writer.start()
        threading.Thread(target=self._read_loop, name=f"{self.task}-reader", daemon=True).start()

    def send(self, message: Batch | Cancel | Load | Stop) -> None:
        """Queue a message; the writer thread sends it.  Never blocks."""
        self._outbox.put(message)

    def kill(self) -> None:
        """SIGKILL the process (a hung model); the exit shows up through `on_exit`."""
        if self._process is not None and self._process.pid is not None:
            try:
                self._process.kill()
            except (OSError, ValueError):
                pass

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to finish, then make sure it has: terminate, kill.  Blocks."""
        with self._lock:
            self._stopping = True
            process, conn = self._process, self._conn
        if process is None:
            return
        if self._heard_from:
            self.send(Stop())
            process.join(timeout)
        # else it is still importing torch: it holds no work and cannot read a Stop yet
        if process.is_alive():
            process.terminate()
            process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
        # The reader thread sees the end of the pipe now, and closes it.

    def _read_loop(self) -> None:
        conn, process = self._conn, self._process
        assert conn is not None and process is not None
        listening = True
        while listening:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the process exited
                break
            self._heard_from = True
            listening = self._call_on_loop(self._on_message, self, message)
        if not listening:  # the event loop is gone without closing the service: end the worker
            self.kill()
        process.join(5.0)  # end-of-file comes as the process exits: reap it for its exit code
        # This thread closes the pipe, once the writer has stopped using it.
        self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(5.0)
        conn.close()
        self._call_on_loop(self._on_exit, self, process.exitcode)

    def _write_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        while (message := self._outbox.get()) is not None:
            try:
                if isinstance(message, Batch):
                    send_batch(conn, message)
                else:
                    conn.send(message)
            except (OSError, ValueError, EOFError):  # the worker died; the reader thread reports it
                break

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

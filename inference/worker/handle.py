"""The parent's side of a worker process: start it, talk to it, watch it end.

`WorkerHandle` owns the process and its pipe: a reader thread turns incoming messages into
callbacks on the event loop (`call_soon_threadsafe`), a writer thread does the pickling and the
blocking `send`, so a 25 MB image never stalls the loop.  A message that cannot be pickled (an
option holding a function) fails alone: the writer reports it as `Unsendable` and goes on with
the next one.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from inference.worker.process import run_worker
from inference.worker.protocol import Batch, Cancel, Load, Stop, Unsendable, WorkerConfig, frames

logger = logging.getLogger(__name__)


class WorkerHandle:
    """One worker process as seen from the service.

    `on_message(handle, message)` and `on_exit(handle, exitcode)` are called on the event loop.
    `start()` and `stop()` block (process start-up, joins): call them in an executor.
    """

    def __init__(
        self,
        config: WorkerConfig,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerHandle, Any], None],
        on_exit: Callable[[WorkerHandle, int | None], None],
    ) -> None:
        self.task = config.task
        self.config = config
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
                args=(self.config, child_conn),
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

    def resident_memory_bytes(self) -> int | None:
        """The process's resident set size (Linux `/proc`); None where unknown."""
        pid = self.pid
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                pages = int(statm.read().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE")

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
                wire = frames(message)
            except Exception as error:  # this message alone cannot go: say so, keep the pipe
                logger.warning("a message for the %s worker could not be pickled: %r", self.task, error)
                batch_id = message.batch_id if isinstance(message, Batch) else None
                self._call_on_loop(self._on_message, self, Unsendable(batch_id, f"{type(error).__name__}: {error}"))
                continue
            try:
                for frame in wire:
                    conn.send_bytes(frame)
            except (OSError, ValueError, EOFError):  # the worker died; the reader thread reports it
                break

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

"""ONNX Runtime sessions, one per thread count.

`intra_op_num_threads` is fixed when a session is created, and the worker's core budget changes
the count between batches (1 or 2 on a 2-core machine), so a model keeps one session per count,
each created the first time that count is asked for.  Inter-op parallelism stays at 1: these
graphs are chains, there is nothing to run side by side.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import onnxruntime

PROVIDERS = ["CPUExecutionProvider"]


def release_freed_heap() -> bool:
    """Give the heap's free memory back to the system (glibc's `malloc_trim`).

    Creating a session parses the whole model and optimises the graph (batch norms folded into
    convolutions: new weights), and frees the originals: measured on the captioner's encoder
    (170 MB of weights), RSS was 490 MB after the session was created and 178 MB after a trim.
    The worker sets glibc to keep freed memory for reuse (`keep_freed_memory`, right for a
    model's activations), so that garbage would otherwise stay.  False where libc is not glibc.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


@functools.cache
def shared_arena() -> bool:
    """Register one CPU memory arena for every session of this process (once; True if it is).

    Each session otherwise grows an arena of its own for its activations, and a model keeps a
    session per thread count: measured on the captioner's encoder at 512×384 with sessions of
    1 and 2 threads, 531 MB after a run of each with their own arenas, 447 MB with this one.
    The arena grows by what is asked (`kSameAsRequested`), not by powers of two.
    """
    memory = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT)
    # OrtArenaCfg(max_mem: 0 = no limit, arena_extend_strategy: 1 = kSameAsRequested, defaults).
    try:
        onnxruntime.create_and_register_allocator(memory, onnxruntime.OrtArenaCfg(0, 1, -1, -1))
    except Exception:  # an older runtime without it: each session keeps its own arena
        return False
    return True


def session_options(threads: int) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    if shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # warnings about unused initializers etc. are not ours to fix
    return options


#: A model file at least this big keeps one session at a time (the captioner's encoder, 170 MB):
#: each session holds its own optimised copy of the weights, so a second one would double them.
#: Smaller ones (EfficientNet-Lite0 19 MB, the CycleGAN generator 11 MB) keep one per count.
ONE_SESSION_FROM_BYTES = 64 * 1024 * 1024
#: A big model moves to a session with more threads only after this many batches in a row were
#: granted more: rebuilding its session costs about half a second, a batch a few hundred ms.
GROW_AFTER_BATCHES = 4


def shrinking_run_options() -> onnxruntime.RunOptions:
    """Run options that hand the arena's free memory back once the run is over."""
    options = onnxruntime.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class ThreadedSession:
    """One ONNX model file; `run` uses a session with no more threads than the current grant.

    Small models keep a session per thread count.  A big one keeps one session: a smaller grant
    replaces it at once (the core budget is a limit), a larger one only once it has lasted
    `GROW_AFTER_BATCHES` runs (meanwhile it runs with fewer threads than it may).

    `shrink_above`: a run whose inputs hold more numbers than this hands the arena's free memory
    back when it is over (None: never).  For the models whose activations follow the photo's
    shape: the arena would otherwise keep its largest run's for good, and more, as runs of other
    shapes leave chunks that fit nothing (measured: the CycleGAN generator at 256×1024 kept 560 MB
    after two runs, 17 MB with this; the captioner's encoder grew 80 MB over four photos).  The
    generator shrinks only above the usual square: shrinking after every run cost 256×256 runs
    8 % (the page faults of allocating it all again), enough to tip `auto` to PyTorch; the
    encoder always (3 %).
    """

    def __init__(self, path: Path, threads: int = 1, *, shrink_above: int | None = None) -> None:
        self.path = Path(path)
        self.threads = max(1, int(threads))
        self.one_session = self.path.stat().st_size >= ONE_SESSION_FROM_BYTES
        self.shrink_above = shrink_above
        self._shrinking = shrinking_run_options()
        self._sessions: dict[int, onnxruntime.InferenceSession] = {}
        self._granted_more = 0
        self.session()  # a file ORT cannot read fails at load, not on the first request

    def set_threads(self, threads: int) -> None:
        self.threads = max(1, int(threads))

    def session(self) -> onnxruntime.InferenceSession:
        session = self._sessions.get(self.threads)
        if session is not None:
            self._granted_more = 0
            return session
        if self.one_session and self._sessions:
            (current,) = self._sessions
            if current < self.threads:
                self._granted_more += 1
                if self._granted_more < GROW_AFTER_BATCHES:
                    return self._sessions[current]  # fewer threads than granted: within the budget
            self._sessions.clear()  # before the new one is built: one copy of the weights at a time
            release_freed_heap()
        self._granted_more = 0
        session = onnxruntime.InferenceSession(str(self.path), sess_options=session_options(self.threads), providers=PROVIDERS)
        self._sessions[self.threads] = session
        release_freed_heap()
        return session

    @property
    def thread_counts(self) -> list[int]:
        """The counts that have a session (for tests and the memory accounting)."""
        return sorted(self._sessions)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        size = sum(value.size for value in feeds.values())
        shrink = self.shrink_above is not None and size > self.shrink_above
        return self.session().run(None, feeds, self._shrinking if shrink else None)

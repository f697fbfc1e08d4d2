"""The models one worker holds: loaded by name through the runtime's loader, at most
`MAX_LOADED_MODELS` at once, the least recently used going first.

Shared by the local worker processes (`inference.worker.process`) and the Ray Serve replicas
(`inference.service.ray_replica`), so both load, keep, evict and batch models by the same rules.
Torch-free: a model that runs in torch imports it when it loads (`load_for_worker`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from inference.errors import InferenceError, ModelUnavailable
from inference.runtime.loader import LoadedPipeline, load_for_worker, wants_cuda
from inference.runtime.needs import input_elements, largest_input, peak_bytes, reset_peak, resident_bytes
from inference.tasks import MODEL_OPTION
from inference.worker.protocol import WorkerConfig
from inference.worker.resources import keep_freed_memory, return_freed_memory

logger = logging.getLogger(__name__)

#: Models one worker keeps loaded, the least recently used going first: a request may name its
#: model (the zebra task's styles), and memory stays bounded however many are asked for.
MAX_LOADED_MODELS = 2


class ModelShelf:
    """One worker's loaded models, by name."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        #: Model name → its loaded pipeline, least recently used first.
        self.pipelines: OrderedDict[str, Any] = OrderedDict()
        #: Model name → what runs it ("onnx", "torch"), for the state reports.
        self.runtimes: dict[str, str] = {}
        #: Model name → bytes running it takes over the loaded model at its largest input
        #: (`inference.runtime.needs`), or None where it was not measured.
        self.working_bytes: dict[str, int | None] = {}
        #: The highest resident size seen while loading a model (0: not known).  Building a
        #: session parses and optimises the whole model before the originals are freed, and a
        #: big model's session is built again when its thread grant shrinks: for the captioner,
        #: 120 MB above what it holds once loaded and running.
        self.load_peak_bytes = 0
        #: "cuda" or "cpu": decided without torch until a model loads (`wants_cuda` imports it
        #: only where a GPU is), then what the loaded model runs on.
        self.device_type = "cuda" if wants_cuda(config.device) else "cpu"
        return_freed_memory()  # until a torch model asks to keep it

    def model_of(self, options: dict[str, Any]) -> str:
        """The model a request named, else the configured one."""
        return str(options.get(MODEL_OPTION) or self.config.model)

    def get(self, model_name: str) -> Any | None:
        """The pipeline of `model_name` if it is loaded (now the most recently used)."""
        pipeline = self.pipelines.get(model_name)
        if pipeline is not None:
            self.pipelines.move_to_end(model_name)
        return pipeline

    def load(self, model_name: str, threads: int) -> Any:
        """Load `model_name` in the runtime INFERENCE_RUNTIME and the export's parity check
        choose (`inference.runtime`), the least recently used going first so memory stays
        bounded; on failure the error (logged when it is a bug or the environment), not raised."""
        while len(self.pipelines) >= MAX_LOADED_MODELS:
            evicted, _ = self.pipelines.popitem(last=False)  # before loading: memory stays bounded
            self.working_bytes.pop(evicted, None)
        try:
            with _peak_resident() as peak:
                loaded = load_for_worker(self.config.task, model_name, self.config.loader_settings(), self.config.device, threads)
            self.load_peak_bytes = max(self.load_peak_bytes, peak())
        except Exception as error:
            if isinstance(error, InferenceError):
                return error
            logger.exception("loading the %s model %s failed", self.config.task, model_name)
            return ModelUnavailable(f"The {model_name} model could not be loaded ({type(error).__name__}: {error}).")
        logger.info("%s: %s runs in %s on the %s (%s)", self.config.task, model_name, loaded.runtime, loaded.device, loaded.reason)
        if loaded.runtime == "torch":
            import torch

            torch.set_num_threads(threads)
            keep_freed_memory()  # torch's activations: see keep_freed_memory (ONNX Runtime has its arena)
        self.runtimes[model_name] = loaded.runtime
        self.device_type = loaded.device
        self.pipelines[model_name] = loaded.pipeline
        self.working_bytes[model_name] = self._working_bytes(loaded)
        return loaded.pipeline

    def _working_bytes(self, loaded: LoadedPipeline) -> int | None:
        """The export's measurement, scaled to this worker's own largest input."""
        if loaded.working_memory is None:
            return None
        settings = self.config.loader_settings()
        inputs, _ = largest_input(loaded.pipeline, self.config.task, settings)
        return loaded.working_memory.for_elements(input_elements(inputs))

    def memory_need(self) -> int | None:
        """Bytes this worker needs with what it holds: its resident size now plus the largest
        measured working memory of its loaded models (they run one at a time, and their
        activations reuse one arena or heap), or its peak while loading if that was higher;
        None when a loaded model's working memory is not known."""
        if not self.pipelines:
            return None
        working = [self.working_bytes.get(name) for name in self.pipelines]
        if any(value is None for value in working):
            return None
        try:
            return max(self.load_peak_bytes, resident_bytes() + max(value or 0 for value in working))
        except OSError:  # no /proc
            return None

    def stacks(self, pipeline: Any) -> bool:
        """Whether equal-shaped inputs of `pipeline` go through the model together.

        They do when the pipeline says its inputs are all one size (the classifier's crops) or
        on a GPU.  Size-dependent models (CycleGAN at the photo's aspect ratio, the captioner)
        run one input at a time on the CPU: batching gains them nothing there (the generator at
        256×256 on 2 cores: 316 ms per image alone, 341 ms in a batch of 4, even with
        `keep_freed_memory`), and each result goes back as soon as it exists.
        """
        return bool(pipeline.fixed_input_size) or self.device_type == "cuda"


@contextlib.contextmanager
def _peak_resident() -> Iterator[Callable[[], int]]:
    """The peak resident size within the block, read by the function it yields (0: unknown)."""
    try:
        reset_peak()
    except OSError:  # no /proc
        yield lambda: 0
        return
    yield peak_bytes

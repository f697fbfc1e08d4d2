"""The worker's one entry point: which runtime runs a model, and the pipeline that runs it.

`load_for_worker(task, model_name, settings, device_spec, threads)` follows `INFERENCE_RUNTIME`:
- `torch`: the torch pipeline, as before (`get_model(...).load`), torch imported here, lazily;
- `onnx`: the ONNX Runtime pipeline on the CPU (whatever the device setting: only the CPU
  provider is installed), exported first if the cache has no valid copy; a failed export is a
  `ModelUnavailable` naming why;
- `auto`: torch on CUDA (an explicit `cuda` device, or `auto` with an NVIDIA device present:
  `/dev/nvidiactl` first, torch only to confirm it); on the CPU, ONNX Runtime when the export
  passed its parity check and ORT was measured at most `SLOWER_ALLOWED` × eager's time (the
  sidecar's timings), else torch.  A failed export falls back to torch with one log line.

The export runs in a child Python process, with a timeout, so this process
imports torch only when it ends up running torch.  A valid cached export costs no child at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import platformdirs

from config import Settings
from inference.errors import ModelUnavailable
from inference.presets import CAPTION, CYCLEGAN
from inference.registry import get_model, list_models
from inference.runtime import cache
from inference.runtime.needs import WorkingMemory
from inference.weights import WeightsStore

logger = logging.getLogger(__name__)

#: `auto` keeps ONNX Runtime when it is at most this much slower than eager (noise, mostly).
SLOWER_ALLOWED = 1.05
#: Seconds an export (load, export, parity, timing) may take; the captioner's ResNet-101 takes
#: well under a minute on 2 cores.
EXPORT_TIMEOUT_S = 900.0
#: Timed runs of each case in the export (the median is kept).
TIMING_RUNS = 5
NVIDIA_DEVICE = Path("/dev/nvidiactl")


@dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Any
    #: "onnx" or "torch".
    runtime: str
    #: "cpu" or "cuda".
    device: str
    #: Why this runtime, in one line (for the worker's log and the bot's status).
    reason: str
    #: What running it takes on top of the loaded model, as the export measured it (None:
    #: not measured: INFERENCE_RUNTIME=torch, CUDA, Torch Hub models).
    working_memory: WorkingMemory | None = None


class ExportFailed(Exception):
    """The export process failed, timed out, or left no usable export."""


def load_for_worker(
    task: str,
    model_name: str,
    settings: Settings,
    device_spec: str = "auto",
    threads: int = 1,
    *,
    export_timeout_s: float = EXPORT_TIMEOUT_S,
    timing_runs: int = TIMING_RUNS,
) -> LoadedPipeline:
    runtime = settings.inference_runtime
    if runtime == "torch":
        return load_torch(task, model_name, settings, device_spec, "INFERENCE_RUNTIME=torch")
    if runtime == "auto" and wants_cuda(device_spec):
        return load_torch(task, model_name, settings, device_spec, "CUDA: PyTorch runs on the GPU")
    if runtime == "onnx" and device_spec.startswith("cuda"):
        logger.warning("%s: INFERENCE_RUNTIME=onnx runs on the CPU; DEVICE=%s is not used", model_name, device_spec)
    if model_name.startswith("hub:"):
        return _refuse_or_torch(runtime, task, model_name, settings, device_spec, "Torch Hub models are not exported")
    ensure_weights(task, model_name, settings)
    try:
        export = ensure_export(task, model_name, settings, threads, export_timeout_s, timing_runs)
    except ExportFailed as error:
        return _refuse_or_torch(runtime, task, model_name, settings, device_spec, f"the ONNX export failed: {error}")
    ratio = export.slower_than_eager()
    timing = f"ORT took {ratio:.2f}x the time of eager"
    if not export.parity_passed:
        if runtime == "auto":
            return _fallback(task, model_name, settings, device_spec, "the ONNX export failed its parity check")
        logger.warning("%s: running ONNX Runtime although its export failed the parity check", model_name)
    elif runtime == "auto" and ratio > SLOWER_ALLOWED:
        loaded = load_torch(task, model_name, settings, device_spec, f"eager is faster ({timing})")
        return replace(loaded, working_memory=export.working_memory("torch"))
    pipeline = build_onnx_pipeline(task, export, settings, threads)
    reason = f"INFERENCE_RUNTIME={runtime}: ONNX Runtime ({timing})"
    return LoadedPipeline(pipeline, "onnx", "cpu", reason, export.working_memory("onnx"))


def ensure_weights(task: str, model_name: str, settings: Settings) -> None:
    """The store's weights of a registered model, downloaded first with AUTO_DOWNLOAD: missing
    ones are the store's one-line `WeightsMissing` (the command that fetches them), not an export
    child started only to fail on them and a fallback that fails again."""
    if model_name in list_models(task):
        entry = get_model(model_name, task=task)
        if entry.weights:
            WeightsStore.from_settings(settings).ensure_model(entry.weights)


def wants_cuda(device_spec: str) -> bool:
    """An explicit CUDA device, or `auto` on a machine with a usable NVIDIA GPU.  torch is
    imported only where the device node exists (a CPU machine never pays for it)."""
    if device_spec.startswith("cuda"):
        return True
    if device_spec != "auto" or not NVIDIA_DEVICE.exists():
        return False
    import torch

    return bool(torch.cuda.is_available())


def load_torch(task: str, model_name: str, settings: Settings, device_spec: str, reason: str) -> LoadedPipeline:
    from inference.registry import resolve_device  # imports torch, which is the point here

    device = resolve_device(device_spec)
    pipeline = get_model(model_name, task=task).load(settings, device)
    return LoadedPipeline(pipeline, "torch", device.type, reason)


def _refuse_or_torch(
    runtime: str, task: str, model_name: str, settings: Settings, device_spec: str, reason: str
) -> LoadedPipeline:
    if runtime == "onnx":
        raise ModelUnavailable(f"INFERENCE_RUNTIME=onnx, but {model_name} cannot run in ONNX Runtime: {reason}.")
    return _fallback(task, model_name, settings, device_spec, reason)


def _fallback(task: str, model_name: str, settings: Settings, device_spec: str, reason: str) -> LoadedPipeline:
    logger.warning("%s: %s; running it in PyTorch", model_name, reason)
    return load_torch(task, model_name, settings, device_spec, reason)


def build_onnx_pipeline(task: str, export: cache.CachedExport, settings: Settings, threads: int) -> Any:
    from inference.runtime.captioning import OnnxCaptionPipeline
    from inference.runtime.pipelines import OnnxClassifierPipeline, OnnxZebraPipeline

    if task == "classify":
        return OnnxClassifierPipeline(export, threads)
    if task == "zebra":
        return OnnxZebraPipeline(export, threads, size=CYCLEGAN.size_for(settings))
    if task == "caption":
        return OnnxCaptionPipeline(export, threads, size=CAPTION.size_for(settings), beam=settings.caption_beam)
    raise ModelUnavailable(f"no ONNX Runtime pipeline for the task {task!r}")


def cached_export(task: str, model_name: str, settings: Settings) -> cache.CachedExport | None:
    """The valid cached export for the current weights and libraries, found without torch."""
    if model_name in list_models(task):
        files = cache.known_weights_files(get_model(model_name, task=task), settings)
    else:  # a family's model: resolving its name would import torchvision
        files = cache.recorded_weights_files(settings, model_name)
    key = cache.cache_key(files) if files is not None else None
    return cache.lookup(settings, task, model_name, key) if key else None


def ensure_export(
    task: str, model_name: str, settings: Settings, threads: int, timeout_s: float, timing_runs: int
) -> cache.CachedExport:
    found = cached_export(task, model_name, settings)
    if found is not None:
        return found
    with one_export_at_a_time():
        found = cached_export(task, model_name, settings)  # another process may have made it meanwhile
        if found is not None:
            return found
        directory = run_export_process(task, model_name, settings, threads, timeout_s, timing_runs)
    try:
        return cache.read_export(directory, task=task, model_name=model_name)
    except cache.CacheCorrupt as error:
        raise ExportFailed(str(error)) from None


@contextlib.contextmanager
def one_export_at_a_time() -> Iterator[None]:
    """Held while an export child runs: one at a time on this machine, across workers and bots.

    An export peaks at 1.1-1.6 GB resident (torch, the model, the exporter's graph; the
    captioner's the most), and the three workers load their models at the same time: side by
    side, the first start of a small host would need their sum.  An exclusive `flock` on a file
    in the user cache directory, released by the kernel if its holder dies.
    """
    folder = Path(platformdirs.user_cache_dir("discord-vision-bot")) / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".export.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_export_process(
    task: str, model_name: str, settings: Settings, threads: int, timeout_s: float, timing_runs: int
) -> Path:
    """Export in a child Python process; its directory, or `ExportFailed` (error, crash, timeout).

    A plain subprocess rather than a `multiprocessing` child: the calling worker is itself a
    daemonic `multiprocessing` process, which may not have children of its own.
    """
    # The child needs no secret: the token stays in this process.
    request = ExportRequest(task, model_name, replace(settings, discord_token=None), threads, timing_runs)
    module, function = EXPORT_CHILD.split(":")
    reader, writer = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", f"import {module}; {module}.{function}({writer})"],
        stdin=subprocess.PIPE,
        pass_fds=(writer,),
    )
    os.close(writer)  # the child holds the only writer: its exit reads as EOF here
    try:
        assert child.stdin is not None
        child.stdin.write(pickle.dumps(request))
        child.stdin.close()
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise ExportFailed(f"it took more than {timeout_s:.0f} s") from None
        with os.fdopen(reader, "rb") as replies:
            reader = -1
            reply = replies.read()
        if not reply:
            raise ExportFailed(f"the export process died (exit code {child.returncode})")
        status, detail = json.loads(reply)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if reader >= 0:
            os.close(reader)
        if child.returncode != 0:  # killed or crashed mid-write
            cache.discard_staging(settings, model_name, child.pid)
    if status != "ok":
        raise ExportFailed(detail)
    return Path(detail)


@dataclass(frozen=True)
class ExportRequest:
    """What the parent asks of the export child (pickled to the child's stdin: the parent is
    the only writer, so this is not untrusted input)."""

    task: str
    model_name: str
    settings: Settings
    threads: int
    timing_runs: int

    @staticmethod
    def read() -> ExportRequest:
        request = pickle.loads(sys.stdin.buffer.read())
        assert isinstance(request, ExportRequest)
        return request


def reply(fd: int, status: str, detail: str) -> None:
    """The child's one answer to the parent, on the pipe `fd`."""
    with os.fdopen(fd, "w") as pipe:
        pipe.write(json.dumps([status, detail]))


#: "module:function(fd)" the export child runs (the tests put stand-ins here).
EXPORT_CHILD = "inference.runtime.loader:export_child"


def export_child(fd: int) -> None:
    """The child's entry point: torch is imported here, in the child only."""
    request = ExportRequest.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not news
            from inference.runtime.export import export_model

            directory = export_model(
                request.task, request.model_name, request.settings, threads=request.threads, timing_runs=request.timing_runs
            )
        reply(fd, "ok", str(directory))
    except BaseException as error:  # everything goes back as one line; the parent decides
        text = str(error).strip().splitlines()
        reply(fd, "error", f"{type(error).__name__}: {text[0] if text else ''}"[:500])

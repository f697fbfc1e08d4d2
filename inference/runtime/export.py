"""Export a torch pipeline to ONNX, check it against eager, time both, publish it to the cache.

Runs in a short-lived child process (`inference.runtime.loader` starts it): it imports torch and
loads the model the normal way (`get_model(name, task).load(settings, cpu)`), so the export is
of exactly what the torch path would run.  The legacy TorchScript-based exporter
(`dynamo=False`) is used: the dynamo exporter needs onnxscript.

What is exported:
- classify: the network, logits out, a dynamic batch axis;
- zebra: the generator, dynamic batch, height and width;
- caption: the encoder (image → features and `img_embed(features)`, dynamic height and width),
  ONE decoder step (input embedding, h, c → log-probabilities, h, c; `FCCaptionModel.step`) and
  the word-embedding table as .npy, so that decoding runs in numpy.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from config import Settings
from inference.registry import ModelEntry, get_model
from inference.runtime import cache
from inference.runtime.parity import check_parity

#: ONNX opset of the exported graphs (ReduceMean over axes as an attribute, InstanceNormalization,
#: reflect Pad: all there by 17, and onnxruntime 1.x runs it everywhere).
OPSET = 17


class ExportUnsupported(Exception):
    """This model cannot be exported (its weights cannot be named for the cache key, say)."""


def export_model(task: str, model_name: str, settings: Settings, *, threads: int = 1, timing_runs: int = 5) -> Path:
    """Export, check and publish; returns the cache directory of the export."""
    torch.set_num_threads(max(1, threads))
    entry = get_model(model_name, task=task)
    pipeline = entry.load(settings, torch.device("cpu"))
    files = weights_files(entry, settings)
    key = cache.cache_key(files)
    if key is None:
        raise ExportUnsupported(f"the weights of {model_name} are not all on disk: {[str(f) for f in files]}")
    started = time.perf_counter()
    staging = cache.staging_dir(settings, model_name)
    try:
        sidecar: dict[str, Any] = {
            "format": cache.EXPORT_FORMAT,
            "task": task,
            "model": model_name,
            "key": key,
            "libraries": cache.library_versions(),
            "weights_files": [str(path) for path in files],
            "opset": OPSET,
        }
        sidecar |= WRITERS[task](pipeline, staging)
        sidecar["export_s"] = round(time.perf_counter() - started, 2)
        sidecar["working_memory"] = working_memory(task, pipeline, cache.CachedExport(staging, sidecar), settings, threads)
        sidecar |= check_parity(task, pipeline, cache.CachedExport(staging, sidecar), settings, threads, timing_runs)
        cache.write_json(staging / cache.SIDECAR, sidecar)
        target = cache.publish(staging, cache.model_dir(settings, model_name) / key)
    except BaseException:
        cache.discard(staging)
        raise
    if cache.known_weights_files(entry, settings) is None:
        cache.record_weights_files(settings, model_name, files)
    cache.prune_stale(target)
    return target


def working_memory(task: str, torch_pipeline: Any, export: cache.CachedExport, settings: Settings, threads: int) -> dict[str, Any]:
    """Each runtime's peak memory over its largest input (`inference.runtime.needs`).

    ONNX Runtime first, before anything else here has run it: its arena is one per process and
    keeps what it grew, so a later measurement would see only the growth past parity's runs.
    The freed heap goes back to the system before each, so the starting point is what is held.
    """
    from inference.runtime.loader import build_onnx_pipeline
    from inference.runtime.needs import measure_working_memory
    from inference.runtime.sessions import release_freed_heap

    onnx_pipeline = build_onnx_pipeline(task, export, settings, threads)
    onnx = measure_working_memory(onnx_pipeline, task, settings, before=release_freed_heap)
    del onnx_pipeline
    with torch.inference_mode():
        eager = measure_working_memory(torch_pipeline, task, settings, before=release_freed_heap)
    return {"onnx": onnx.to_json(), "torch": eager.to_json()}


def weights_files(entry: ModelEntry, settings: Settings) -> list[Path]:
    """The files the model was built from: the registry's own knowledge first, then the
    torchvision family's cache file (known here, where torchvision may be imported)."""
    files = cache.known_weights_files(entry, settings)
    if files is not None:
        return files
    if entry.builder.endswith(":build_torchvision"):
        from inference.models.classifier import torchvision_checkpoint

        return [torchvision_checkpoint(entry.name)[1]]
    raise ExportUnsupported(f"{entry.name}: its weights files are not known, so no cache key can be made")


def onnx_bytes(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
               dynamic_axes: dict[str, dict[int, str]]) -> bytes:
    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # "legacy TorchScript-based export": chosen on purpose (the dynamo one needs onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _file(directory: Path, name: str, data: bytes) -> dict[str, str]:
    return {"name": name, "sha256": cache.write_bytes(directory / name, data)}


def _normalization(normalization: Any) -> dict[str, list[float]]:
    return {"mean": [float(v) for v in normalization.mean], "std": [float(v) for v in normalization.std]}


def write_classifier(pipeline: Any, directory: Path) -> dict[str, Any]:
    recipe = pipeline.preprocessing  # CenterCropPreprocessing: the torch path's own numbers
    probe = torch.zeros(1, 3, recipe.crop, recipe.crop)
    batch = {0: "batch"}
    model = onnx_bytes(pipeline.model, (probe,), ["image"], ["logits"], {"image": batch, "logits": batch})
    return {
        "files": {"model": _file(directory, "model.onnx", model)},
        "preprocessing": {
            "kind": "center_crop",
            "resize": int(recipe.resize),
            "crop": int(recipe.crop),
            "resample": recipe.resample.name,
        }
        | _normalization(recipe),
        "categories": list(pipeline.categories),
    }


def write_generator(pipeline: Any, directory: Path) -> dict[str, Any]:
    from inference.models import cyclegan

    axes = {0: "batch", 2: "height", 3: "width"}
    model = onnx_bytes(
        pipeline.generator, (torch.zeros(1, 3, 64, 64),), ["image"], ["output"], {"image": axes, "output": axes}
    )
    preset = cyclegan.CYCLEGAN
    return {
        "files": {"model": _file(directory, "model.onnx", model)},
        "preprocessing": {
            "kind": preset.kind,
            "size": int(pipeline.size),
            "multiple": cyclegan.SIDE_MULTIPLE,
            "min_side": cyclegan.MIN_SIDE,
            "max_aspect": cyclegan.MAX_ASPECT,
            "resample": preset.resample.name,
        }
        | _normalization(preset.normalization),
    }


class EncoderWithEmbedding(nn.Module):
    """Image → (features, `img_embed(features)`): the decoder's first input comes out of the
    encoder's graph, so no Linear layer is written by hand in numpy."""

    def __init__(self, encoder: nn.Module, img_embed: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.img_embed = img_embed

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(image)
        return features, self.img_embed(features)


class DecoderStep(nn.Module):
    """`FCCaptionModel.step` as a module: (x, h, c) → (log-probabilities, h, c)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logprobs, (h, c) = self.model.step(x, (h, c))
        return logprobs, h, c


def write_captioner(pipeline: Any, directory: Path) -> dict[str, Any]:
    from inference.models import captioner

    model, options = pipeline.model, pipeline.model.options
    image_axes = {0: "batch", 2: "height", 3: "width"}
    encoder = onnx_bytes(
        EncoderWithEmbedding(pipeline.encoder, model.img_embed),
        (torch.zeros(1, 3, 64, 64),),
        ["image"],
        ["features", "image_embedding"],
        {"image": image_axes, "features": {0: "batch"}, "image_embedding": {0: "batch"}},
    )
    batch = {0: "batch"}
    zeros = torch.zeros(2, options.rnn_size)
    step = onnx_bytes(
        DecoderStep(model),
        (torch.zeros(2, options.input_encoding_size), zeros, zeros),
        ["x", "h", "c"],
        ["logprobs", "h_out", "c_out"],
        {name: batch for name in ("x", "h", "c", "logprobs", "h_out", "c_out")},
    )
    table = io.BytesIO()
    np.save(table, model.embed.weight.detach().cpu().numpy().astype(np.float32), allow_pickle=False)
    preset = captioner.CAPTION
    return {
        "files": {
            "encoder": _file(directory, "encoder.onnx", encoder),
            "step": _file(directory, "step.onnx", step),
            "embeddings": _file(directory, "embed.npy", table.getvalue()),
        },
        "preprocessing": {
            "kind": preset.kind,
            "size": int(pipeline.size),
            "min_side": captioner.MIN_SIDE,
            "resample": preset.resample.name,
        }
        | _normalization(preset.normalization),
        "decoding": {
            "end": captioner.END,
            "seq_length": int(options.seq_length),
            "unk_penalty": float(captioner.UNK_PENALTY),
            "beam": int(pipeline.beam),
        },
        "vocabulary": [pipeline.vocab[index] for index in range(1, options.vocab_size + 1)],
    }


WRITERS = {"classify": write_classifier, "zebra": write_generator, "caption": write_captioner}

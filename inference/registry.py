"""Task name → the function that loads its pipeline.

Adding a model means adding a module under `inference/models/` and an entry here.  Loaders are
imported lazily so that a worker process only imports what it runs.
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch

from config import Settings
from inference.errors import ModelUnavailable
from inference.pipeline import Pipeline

Task = Literal["classify", "zebra", "caption"]

#: task → "module:function"; the function has the signature (settings, device) -> Pipeline.
LOADERS: dict[str, str] = {
    "classify": "inference.models.classifier:load_from_settings",
    "zebra": "inference.models.cyclegan:load_from_settings",
    "caption": "inference.models.captioner:load_from_settings",
}

TASKS: tuple[Task, ...] = ("classify", "zebra", "caption")


def load_pipeline(task: str, settings: Settings, device: torch.device) -> Pipeline:
    try:
        target = LOADERS[task]
    except KeyError:
        raise ModelUnavailable(f"unknown task {task!r}; known: {', '.join(LOADERS)}") from None
    module_name, function_name = target.split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    return loader(settings, device)


def resolve_device(spec: str) -> torch.device:
    """`auto` → CUDA when present (batching pays most there), else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)

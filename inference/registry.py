"""The model registry: a model's name → its metadata and a lazy reference to its builder.

In torchvision's `models/_api.py` spirit (`register_model` / `get_model` / `list_models`), with
one difference that matters here: an entry names its builder as a "module:function" string, and
this module imports no torch.  Listing models (the bot, a `/style` autocomplete, a worker that
runs ONNX Runtime) costs no torch import; only `ModelEntry.load`, in the worker, imports the
model's module.

Where entries come from:
- `inference/models/entries.py` registers the named models (efficientnet_lite0, and one `zebra`
  or `caption` model per `inference.catalogue` entry of that task: a CycleGAN style added to
  the catalogue is listed here with nothing else to edit);
- families resolve names that are not listed one by one: any torchvision classification model
  by its torchvision name, and `hub:OWNER/REPO:ENTRY`.

The task names, their options and policies live in `inference.tasks`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from config import Settings
from inference.errors import ModelUnavailable
from inference.tasks import TASKS, get_task

if TYPE_CHECKING:  # annotations only: this module must stay importable without torch
    import torch

    from inference.pipeline import Pipeline

__all__ = [
    "TASKS",
    "ModelEntry",
    "ModelFamily",
    "get_model",
    "list_models",
    "load_pipeline",
    "register_family",
    "register_model",
    "resolve_device",
]


def resolve(reference: str) -> Any:
    """"package.module:attribute" → the attribute (importing the module now)."""
    module_name, separator, attribute = reference.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"not a 'module:attribute' reference: {reference!r}")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class ModelEntry:
    """One model: what it is, where its weights and labels come from, and how to build it."""

    name: str
    #: The task it serves (`inference.tasks`).
    task: str
    #: "module:function" of `builder(entry, settings, device) -> Pipeline`, resolved on load.
    builder: str
    description: str = ""
    #: Its name in `inference.catalogue` when the weights store holds its files; "" when the
    #: weights come from elsewhere (bundled by a package, torchvision's own cache, Torch Hub).
    weights: str = ""
    #: "module:function" of `download(entry, progress=...) -> dict[role, Path]` for weights that
    #: the store does not hold (torchvision's cache); "" when the store (or nothing) fetches them.
    downloader: str = ""
    #: Where its output labels come from, in words a person can check: "torchvision:NAME"
    #: (the weights' meta), "imagenet" (torchvision's ImageNet list), "vocabulary file"…
    categories: str = ""
    #: Its preprocessing preset (`inference.presets.PRESETS`).
    preset: str = ""

    def __post_init__(self) -> None:
        get_task(self.task)  # ModelUnavailable for an unknown task, at registration
        if ":" not in self.builder:
            raise ValueError(f"{self.name}: builder must be 'module:function', not {self.builder!r}")

    def load(self, settings: Settings, device: torch.device) -> Pipeline:
        """Import the builder's module (torch, the first time) and build the pipeline."""
        builder: Callable[[ModelEntry, Settings, torch.device], Pipeline] = resolve(self.builder)
        return builder(self, settings, device)

    def download(self, *, progress: bool = True) -> dict[str, Any]:
        """Fetch weights that live outside the store (role → path); {} when there are none."""
        if not self.downloader:
            return {}
        return resolve(self.downloader)(self, progress=progress)


@dataclass(frozen=True)
class ModelFamily:
    """Names resolved by a rule instead of one entry each (torchvision's classifiers, Torch Hub)."""

    name: str
    task: str
    #: The entry every accepted name gets, `name` filled in.
    template: ModelEntry
    #: "module:function" of `accepts(name) -> bool`; may import torch (it runs on lookup only).
    #: "" when `prefix` alone decides (the builder then checks the rest of the name).
    accepts: str = ""
    #: A plain prefix a name must have ("hub:"); checked before `accepts`, without imports.
    prefix: str = ""
    #: How a person names one of its models, for error messages.
    hint: str = ""

    def entry_for(self, name: str) -> ModelEntry | None:
        if self.prefix and not name.startswith(self.prefix):
            return None
        if self.accepts and not resolve(self.accepts)(name):
            return None
        return replace(self.template, name=name)


@dataclass
class _Registry:
    """The one piece of mutable state: filled once, when the entries module is first imported."""

    models: dict[str, ModelEntry] = field(default_factory=dict)
    families: list[ModelFamily] = field(default_factory=list)
    loaded: bool = False


_REGISTRY = _Registry()
#: The module whose import registers the built-in entries (torch-free, like this one).
ENTRIES_MODULE = "inference.models.entries"


def _registry() -> _Registry:
    if not _REGISTRY.loaded:
        _REGISTRY.loaded = True
        importlib.import_module(ENTRIES_MODULE)
    return _REGISTRY


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add one model; a name is registered once (a second entry would shadow the first)."""
    if entry.name in _REGISTRY.models:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY.models[entry.name] = entry
    return entry


def register_family(family: ModelFamily) -> ModelFamily:
    if any(known.name == family.name for known in _REGISTRY.families):
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY.families.append(family)
    return family


def list_models(task: str | None = None) -> list[str]:
    """The registered models' names (of one task), sorted; imports no torch.  Names that a
    family resolves (`resnet101`, `hub:…`) are accepted by `get_model` but not listed."""
    if task is not None:
        get_task(task)
    return sorted(name for name, entry in _registry().models.items() if task is None or entry.task == task)


def get_model(name: str, task: str | None = None) -> ModelEntry:
    """The entry of `name`, from the registered models, then the families (of `task`).

    Raises `ModelUnavailable` naming what would be accepted.  Resolving a family name may
    import its library (torchvision, for its list of classifiers).
    """
    registry = _registry()
    entry = registry.models.get(name)
    if entry is None:
        for family in registry.families:
            if task is None or family.task == task:
                entry = family.entry_for(name)
                if entry is not None:
                    break
    if entry is None or (task is not None and entry.task != task):
        raise ModelUnavailable(_unknown(name, task, registry))
    return entry


def _unknown(name: str, task: str | None, registry: _Registry) -> str:
    known = [n for n, e in registry.models.items() if task is None or e.task == task]
    hints = [f.hint for f in registry.families if f.hint and (task is None or f.task == task)]
    of_task = f" {task}" if task else ""
    return f"Unknown{of_task} model {name!r}: use {', '.join(sorted(known) + hints)}."


def load_pipeline(task: str, settings: Settings, device: torch.device) -> Pipeline:
    """The task's configured model (`TaskSpec.default_model`) → its entry → its builder."""
    return get_model(get_task(task).default_model(settings), task=task).load(settings, device)


def resolve_device(spec: str) -> torch.device:
    """`auto` → CUDA when present (batching pays most there), else the CPU."""
    import torch  # here, not at the top: listing models must not import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)

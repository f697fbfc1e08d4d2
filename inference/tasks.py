"""The task registry: what each task is, in one place, without torch.

The service (main process) validates a request's options against it before anything is queued,
sizes each task's queue and batches from it, and the bot shows its words; the worker process
resolves the torch-side loader from `inference.registry`.  Adding a task means one `TaskSpec`
here and one loader there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config import Settings
from inference.errors import ModelUnavailable


@dataclass(frozen=True)
class OptionSpec:
    """One per-request option: an integer within a range (the only kind the tasks take today)."""

    name: str
    minimum: int
    maximum: int
    #: The default; None means it comes from the settings field `default_setting`.
    default: int | None = None
    default_setting: str = ""
    description: str = ""

    def default_for(self, settings: Settings) -> int:
        if self.default is not None:
            return self.default
        return int(getattr(settings, self.default_setting))

    def check(self, task: str, value: Any) -> int:
        # bool is an int subclass, but `top=True` is a caller's mistake, not "top 1".
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{task}: option {self.name!r} must be an integer, not {type(value).__name__}")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{task}: option {self.name!r} must be from {self.minimum} to {self.maximum}, not {value}")
        return value


#: The option that picks a request's model, for the tasks that take one (`TaskSpec.takes_model`).
MODEL_OPTION = "model"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    options: tuple[OptionSpec, ...]
    #: The settings field that names the task's model; "" when the model is fixed.
    model_setting: str
    #: The model's name when no setting names it.
    fixed_model: str
    #: Whether stacking several requests into one model call pays.  Measured on the CPU: it
    #: does for the classifier's fixed-size crops; the CycleGAN generator and the captioner run
    #: one image at a time there (batching gained nothing, and each result then waits for the
    #: whole batch).  On a GPU every task batches.
    batches_on_cpu: bool
    batches_on_gpu: bool
    #: Settings fields: the task's queue limit and its worker's memory ceiling (MB, 0: none,
    #: None: computed, `inference.service.ceilings`).
    queue_limit_setting: str
    memory_limit_setting: str
    #: The ceiling (MB) where the worker's need is not measured: peak seen on the CPU with torch
    #: (2 threads), the model loaded and a batch of legal 49-megapixel PNGs decoded at once
    #: (classify 2.0 GB with eight, zebra 1.2 GB, caption 1.4 GB), with room to spare.
    fallback_memory_mb: int
    #: The words the bot shows for it.
    title: str
    description: str
    #: Slow enough that the bot applies its heavy-command cooldown.
    heavy: bool

    def default_model(self, settings: Settings) -> str:
        return str(getattr(settings, self.model_setting)) if self.model_setting else self.fixed_model

    @property
    def takes_model(self) -> bool:
        """Whether a request may name its model (the `model` option): the tasks whose model is a
        setting.  Without the option a request gets the configured one."""
        return bool(self.model_setting)

    def model_choices(self, settings: Settings) -> list[str]:
        """The models a request may name, sorted: the task's registered models and the configured
        one (which may be a family's name, `resnet101`).  Imports no torch: a family's rule (the
        torchvision list) is not asked, so a request never makes the service import it."""
        from inference.registry import list_models  # the registry imports this module

        return sorted({*list_models(self.name), self.default_model(settings)}) if self.takes_model else []

    def check_model(self, value: Any, settings: Settings) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{self.name}: option {MODEL_OPTION!r} must be a model name, not {type(value).__name__}")
        if value not in self.model_choices(settings):
            raise ValueError(f"{self.name}: unknown model {value!r}; use one of: {', '.join(self.model_choices(settings))}")
        return value

    def option(self, name: str) -> OptionSpec:
        for option in self.options:
            if option.name == name:
                return option
        known = ", ".join([option.name for option in self.options] + ([MODEL_OPTION] if self.takes_model else []))
        raise TypeError(f"{self.name} takes no option {name!r} (it takes: {known or 'none'})")

    def validate(self, options: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
        """The options checked (`TypeError`, `ValueError`) and completed with their defaults.
        `model` stays absent unless given: the worker then runs its configured model."""
        checked: dict[str, Any] = {}
        for name, value in options.items():
            if name == MODEL_OPTION and self.takes_model:
                checked[name] = self.check_model(value, settings)
            else:
                checked[name] = self.option(name).check(self.name, value)
        for option in self.options:
            checked.setdefault(option.name, option.default_for(settings))
        return checked

    def max_batch_size(self, settings: Settings, device_type: str) -> int:
        batches = self.batches_on_gpu if device_type == "cuda" else self.batches_on_cpu
        return max(1, settings.max_batch_size) if batches else 1

    def queue_limit(self, settings: Settings) -> int:
        return int(getattr(settings, self.queue_limit_setting))

    def memory_limit_mb(self, settings: Settings) -> int | None:
        """The configured ceiling in MB (0: none); None: "auto", computed from the worker's need."""
        value = getattr(settings, self.memory_limit_setting)
        return None if value is None else int(value)


#: How many classes `classify` answers with unless asked otherwise: the book's top 5.
DEFAULT_TOP = 5

CLASSIFY = TaskSpec(
    name="classify",
    options=(OptionSpec("top", 1, 20, default=DEFAULT_TOP, description="how many classes to show"),),
    model_setting="classifier",
    fixed_model="",
    batches_on_cpu=True,
    batches_on_gpu=True,
    queue_limit_setting="classify_queue_size",
    memory_limit_setting="classify_max_memory_mb",
    fallback_memory_mb=3072,
    title="classify",
    description=f"Say what is in a photo: the top {DEFAULT_TOP} ImageNet classes.",
    heavy=False,
)

ZEBRA = TaskSpec(
    name="zebra",
    options=(),
    model_setting="zebra_model",
    fixed_model="",
    batches_on_cpu=False,
    batches_on_gpu=True,
    queue_limit_setting="zebra_queue_size",
    memory_limit_setting="zebra_max_memory_mb",
    fallback_memory_mb=2048,
    title="zebra",
    description="Turn the horses of a photo into zebras (CycleGAN).",
    heavy=True,
)

CAPTION = TaskSpec(
    name="caption",
    options=(OptionSpec("beam", 1, 10, default_setting="caption_beam", description="beam width; 1 is greedy"),),
    model_setting="",
    fixed_model="fc",
    batches_on_cpu=False,
    batches_on_gpu=True,
    queue_limit_setting="caption_queue_size",
    memory_limit_setting="caption_max_memory_mb",
    fallback_memory_mb=2560,
    title="caption",
    description="Describe a photo in one sentence.",
    heavy=True,
)

#: Every task, by name, in the order the bot lists them.
TASK_SPECS: Mapping[str, TaskSpec] = {spec.name: spec for spec in (CLASSIFY, ZEBRA, CAPTION)}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)


def get_task(name: str) -> TaskSpec:
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise ModelUnavailable(f"Unknown task {name!r}; known: {', '.join(TASKS)}.") from None

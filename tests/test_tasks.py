"""The task registry: options checked and completed, batch policies, no torch in the main process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config import Settings
from inference.errors import ModelUnavailable
from inference.tasks import TASK_SPECS, TASKS, get_task


def test_options_are_completed_with_their_defaults() -> None:
    settings = Settings(caption_beam=4)
    assert get_task("classify").validate({}, settings) == {"top": 5}
    assert get_task("classify").validate({"top": 20}, settings) == {"top": 20}
    assert get_task("caption").validate({}, settings) == {"beam": 4}  # the setting, not a copy of it
    assert get_task("zebra").validate({}, settings) == {}


def test_the_batch_policy_follows_the_device() -> None:
    settings = Settings(max_batch_size=8)
    assert get_task("classify").max_batch_size(settings, "cpu") == 8
    assert get_task("zebra").max_batch_size(settings, "cpu") == 1  # measured: batching does not pay
    assert get_task("caption").max_batch_size(settings, "cpu") == 1
    assert get_task("zebra").max_batch_size(settings, "cuda") == 8


def test_each_task_names_its_settings() -> None:
    settings = Settings(zebra_queue_size=3, caption_max_memory_mb=7, classifier="resnet101")
    assert get_task("zebra").queue_limit(settings) == 3
    assert get_task("caption").memory_limit_mb(settings) == 7
    assert get_task("classify").default_model(settings) == "resnet101"
    assert get_task("caption").default_model(settings) == "fc"
    for spec in TASK_SPECS.values():  # every field a spec names exists
        spec.queue_limit(settings), spec.memory_limit_mb(settings), spec.default_model(settings)
        for option in spec.options:
            option.default_for(settings)


def test_an_unknown_task_is_refused() -> None:
    assert TASKS == ("classify", "zebra", "caption")
    with pytest.raises(ModelUnavailable, match="known: classify, zebra, caption"):
        get_task("sketch")


def test_the_registry_and_the_service_import_no_torch() -> None:
    code = "import sys, inference.tasks, inference.service; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""The worker's messages and its configuration: what crosses the pipe, and how."""

from __future__ import annotations

import pickle
from multiprocessing import Pipe
from pathlib import Path

import pytest

from config import Settings
from inference.worker.protocol import Batch, BatchHeader, Cancel, WorkerConfig, WorkItem, frames, receive_batch

SETTINGS = Settings(
    discord_token="secret-token",
    classifier="resnet18",
    zebra_model="zebra2horse",
    device="cpu",
    cpu_cores=3,
    inference_runtime="torch",
    max_image_bytes=1234,
    max_image_pixels=5678,
    max_image_aspect_ratio=7.5,
    max_jpeg_scans=9,
    weights_dir=Path("/weights"),
    auto_download=True,
    trust_hub_repos=True,
    zebra_size=128,
    caption_size=320,
    caption_beam=4,
)


def test_a_worker_config_holds_plain_values_and_no_token() -> None:
    config = WorkerConfig.from_settings("classify", SETTINGS)
    assert (config.task, config.model, config.device, config.cpu_cores) == ("classify", "resnet18", "cpu", 3)
    assert (config.max_image_bytes, config.max_image_pixels) == (1234, 5678)
    assert (config.max_image_aspect_ratio, config.max_jpeg_scans) == (7.5, 9)
    assert (config.zebra_size, config.caption_size, config.caption_beam) == (128, 320, 4)
    assert config.auto_download and config.trust_hub_repos and config.weights_dir == Path("/weights")
    assert b"secret-token" not in pickle.dumps(config)
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(AttributeError):
        config.model = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "task, field, model",
    [("classify", "classifier", "resnet18"), ("zebra", "zebra_model", "zebra2horse"), ("caption", "", "fc")],
)
def test_the_loaders_settings_are_built_from_the_config_alone(task: str, field: str, model: str) -> None:
    config = WorkerConfig.from_settings(task, SETTINGS)
    assert config.model == model
    settings = config.loader_settings()
    assert settings.discord_token is None
    if field:
        assert getattr(settings, field) == model
    for name in (
        "device", "cpu_cores", "inference_runtime", "max_image_bytes", "max_image_pixels", "max_image_aspect_ratio", "max_jpeg_scans",
        "weights_dir", "auto_download", "trust_hub_repos", "zebra_size", "caption_size", "caption_beam",
    ):
        assert getattr(settings, name) == getattr(SETTINGS, name), name


def test_a_batch_goes_as_a_header_and_raw_images() -> None:
    images = [b"\xff\xd8first", b"", bytes(range(256)) * 100]
    batch = Batch(7, [WorkItem(i + 1, image, {"top": i}) for i, image in enumerate(images)])
    wire = frames(batch)
    assert len(wire) == 1 + len(images)
    assert wire[1:] == images  # the images themselves, not pickled copies
    parent, child = Pipe()
    for frame in wire:
        parent.send_bytes(frame)
    header = child.recv()
    assert isinstance(header, BatchHeader) and header.batch_id == 7
    assert receive_batch(child, header) == batch


def test_other_messages_are_one_pickle() -> None:
    [frame] = frames(Cancel([3, 4]))
    assert pickle.loads(frame) == Cancel([3, 4])


def test_a_message_that_cannot_be_pickled_fails_before_anything_is_written() -> None:
    batch = Batch(1, [WorkItem(1, b"image", {"top": lambda: 5})])
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        frames(batch)


def test_every_setting_the_loaders_read_travels_in_the_config() -> None:
    """A loader reading a setting the config does not carry would silently get its default."""
    import dataclasses
    import re

    from tests.conftest import REPO_ROOT

    sources = [*(REPO_ROOT / "inference" / "models").glob("*.py"), REPO_ROOT / "inference" / "registry.py"]
    read = {name for path in sources for name in re.findall(r"settings\.([a-z_]+)", path.read_text())}
    settings_fields = {field.name for field in dataclasses.fields(Settings)}
    from inference.tasks import TASK_SPECS

    model_settings = {spec.model_setting for spec in TASK_SPECS.values() if spec.model_setting}  # as `model`
    carried = {field.name for field in dataclasses.fields(WorkerConfig)} | model_settings
    assert read & settings_fields, "found no settings read by the loaders: has the code moved?"
    assert (read & settings_fields) <= carried, sorted((read & settings_fields) - carried)

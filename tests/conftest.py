"""Fixtures shared by the whole suite: the bundled sample photos and generated checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageFile

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The sample photos that ship with the package (`inference/samples/`).
IMAGES = REPO_ROOT / "inference" / "samples"
#: Test-only data files (the real fc-infos.pkl of the published captioner).
TEST_DATA = Path(__file__).resolve().parent / "data"


def assert_dog(predictions: object) -> None:
    """The classifier's answer to the book's dog photo: a list of predictions, golden retriever first."""
    from inference.pipeline import Prediction

    assert isinstance(predictions, list) and predictions
    assert all(isinstance(p, Prediction) for p in predictions)
    assert predictions[0].label == "golden retriever"


@pytest.fixture(scope="session")
def bobby_jpg() -> bytes:
    return (IMAGES / "bobby.jpg").read_bytes()


@pytest.fixture(scope="session")
def horse_jpg() -> bytes:
    return (IMAGES / "horse.jpg").read_bytes()


@pytest.fixture(scope="session")
def generated_weights_dir(tmp_path_factory) -> Path:
    """A weights directory holding generated checkpoints in the exact published layouts."""
    from tests.checkpoints import populate_weights_dir

    return populate_weights_dir(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """The user cache directory of this test session (XDG_CACHE_HOME, which the worker
    processes inherit): the ONNX export of the bundled EfficientNet-Lite0 lives there
    (`inference.runtime.cache.model_dir`), made once per session and shared by every test's
    weights directory, and nothing is written to the real home directory."""
    folder = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture
def loads(monkeypatch) -> list[Image.Image]:
    """Every image whose pixels Pillow starts to decode (all openers' `load` is ImageFile's)."""
    calls: list[Image.Image] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls

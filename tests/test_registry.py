"""inference.registry: register_model / get_model / list_models, lazy builders, no torch to list."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from config import Settings
from inference import registry
from inference.catalogue import CATALOGUE
from inference.errors import ModelUnavailable
from inference.presets import PRESETS
from inference.registry import ModelEntry, get_model, list_models, load_pipeline, register_model, resolve
from tests.conftest import REPO_ROOT


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_listing_and_looking_up_models_imports_no_torch() -> None:
    out = run_python(
        "import json, sys\n"
        "from inference.registry import get_model, list_models\n"
        "styles = list_models(task='zebra')\n"
        "entries = [get_model(name) for name in list_models()] + [get_model('hub:a/b:c')]\n"
        "loaded = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "print(json.dumps({'styles': styles, 'loaded': loaded, 'entries': len(entries)}))\n"
    )
    listed = json.loads(out)
    assert listed["loaded"] == []
    assert "horse2zebra" in listed["styles"] and "style_vangogh" in listed["styles"]


def test_every_catalogue_model_of_a_task_is_a_registered_model_of_it() -> None:
    for task in ("zebra", "caption"):
        expected = sorted(name for name, weights in CATALOGUE.items() if weights.task == task)
        assert list_models(task=task) == expected
    assert list_models(task="caption") == ["fc"]
    style = get_model("monet2photo")
    assert (style.task, style.weights, style.preset) == ("zebra", "monet2photo", "cyclegan")
    assert style.description == CATALOGUE["monet2photo"].description
    assert style.builder == "inference.models.cyclegan:build"


def test_a_style_added_to_the_catalogue_is_listed_with_nothing_else_to_edit() -> None:
    out = run_python(
        "from types import MappingProxyType\n"
        "import inference.catalogue as catalogue\n"
        "from inference.catalogue import ModelWeights, WeightsFile\n"
        "style = ModelWeights('style_klimt', {'generator': WeightsFile('cyclegan/style_klimt.pth',"
        " 'https://example.org/style_klimt.pth', None)}, 'photo → Klimt style', task='zebra')\n"
        "catalogue.CATALOGUE = MappingProxyType({**catalogue.CATALOGUE, style.name: style})\n"
        "from inference.registry import get_model, list_models\n"
        "print('style_klimt' in list_models(task='zebra'), get_model('style_klimt').weights)\n"
    )
    assert out.split() == ["True", "style_klimt"]


def test_the_default_classifier_and_families() -> None:
    assert "efficientnet_lite0" in list_models(task="classify")
    lite = get_model("efficientnet_lite0")
    assert (lite.task, lite.preset, lite.weights) == ("classify", "lite", "")
    resnet = get_model("resnet101", task="classify")
    assert resnet.builder == "inference.models.classifier:build_torchvision"
    assert resnet.downloader and resnet.name == "resnet101"
    assert get_model("hub:/a/dir:tiny").builder == "inference.models.classifier:build_hub"
    assert "resnet101" not in list_models()  # resolved by its family, not listed one by one


@pytest.mark.parametrize(
    ("name", "task", "words"),
    [
        ("nope", None, "efficientnet_lite0"),
        ("fasterrcnn_resnet50_fpn", "classify", "torchvision classification model"),  # a detector
        ("fc", "zebra", "horse2zebra"),  # a model of another task
        ("horse2zebra", "classify", "hub:OWNER/REPO:ENTRY"),
    ],
)
def test_unknown_names_and_other_tasks_models_are_refused(name: str, task: str | None, words: str) -> None:
    with pytest.raises(ModelUnavailable, match=rf"Unknown.*{name!r}.*{words}"):
        get_model(name, task=task)


def test_every_entry_names_a_builder_a_preset_and_a_task_that_exist() -> None:
    for name in list_models():
        entry = get_model(name)
        assert callable(resolve(entry.builder)), name
        assert entry.preset in PRESETS, name
        assert not entry.weights or entry.weights in CATALOGUE, name
    assert callable(resolve(get_model("resnet18").downloader))


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    list_models()  # the built-in entries first
    monkeypatch.setattr(registry._REGISTRY, "models", dict(registry._REGISTRY.models))
    yield


def fake_builder(entry: ModelEntry, settings: Settings, device: object) -> tuple:
    return ("built", entry.name, settings.zebra_model, device)


def test_load_pipeline_builds_the_tasks_configured_model(scratch_registry: None) -> None:
    register_model(ModelEntry("test_style", "zebra", builder="tests.test_registry:fake_builder"))
    settings = Settings(zebra_model="test_style")
    assert load_pipeline("zebra", settings, "cpu") == ("built", "test_style", "test_style", "cpu")
    with pytest.raises(ModelUnavailable, match="Unknown classify model 'test_style'"):
        load_pipeline("classify", Settings(classifier="test_style"), "cpu")


def test_a_name_is_registered_once_and_only_for_a_known_task(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelEntry("fc", "caption", builder="inference.models.captioner:build"))
    with pytest.raises(ModelUnavailable, match="Unknown task 'colorize'"):
        ModelEntry("colorizer", "colorize", builder="x:y")
    with pytest.raises(ValueError, match="module:function"):
        ModelEntry("colorizer", "zebra", builder="build")


def test_resolve_device() -> None:
    assert str(registry.resolve_device("cpu")) == "cpu"
    assert registry.resolve_device("auto").type in {"cpu", "cuda"}

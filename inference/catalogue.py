"""The weights catalogue: every file the project downloads, where it is published, how it is checked.

Data only (no torch, no network): `CATALOGUE` maps a model name to its files, each with its
published URL, its git blob id (what `git hash-object FILE` prints; None where the publisher gives
none) and its path under the weights directory.  `inference.weights.WeightsStore` fetches and
verifies them; `inference.registry` turns each entry into a model of its task, so a CycleGAN
style added here is a `zebra` model (`list_models(task="zebra")`) with nothing else to edit.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import MappingProxyType

_BLOB_ID = re.compile(r"[0-9a-f]{40}")
ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class WeightsFile:
    #: Path inside the weights directory, always with forward slashes.
    relpath: str
    #: Where it is published; None for a file assembled from `parts`.
    url: str | None
    #: Git blob id of the published bytes; None when none is published.
    blob_id: str | None
    #: Concatenated in this order to make this file.
    parts: tuple[WeightsFile, ...] = ()
    size_hint: int | None = None

    def __post_init__(self) -> None:
        path = PurePosixPath(self.relpath)
        if not self.relpath or path.is_absolute() or ".." in path.parts or "\\" in self.relpath:
            raise ValueError(f"weights path must be relative, without '..': {self.relpath!r}")
        if self.blob_id is not None and not _BLOB_ID.fullmatch(self.blob_id):
            raise ValueError(f"not a git blob id (40 lowercase hex digits): {self.blob_id!r}")
        if self.parts:
            if self.url is not None:
                raise ValueError(f"{self.relpath}: a joined file has parts, not a URL")
            if any(part.parts for part in self.parts):
                raise ValueError(f"{self.relpath}: parts cannot have parts of their own")
        elif self.url is None:
            raise ValueError(f"{self.relpath}: needs a URL or parts")
        else:
            check_url(self.url)

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name

    @property
    def urls(self) -> tuple[str, ...]:
        """Where its bytes come from: its URL, or its parts' URLs in order."""
        if self.parts:
            return tuple(part.url for part in self.parts if part.url is not None)
        return (self.url,) if self.url is not None else ()

    @property
    def integrity(self) -> str:
        """How a download of it is checked, in words (for `status` and `weights list`)."""
        if self.parts:
            return "parts' blob ids" if all(p.blob_id for p in self.parts) else "none published"
        return "git blob id" if self.blob_id else "none published"


@dataclass(frozen=True)
class ModelWeights:
    name: str
    #: role → file.  Roles: CycleGAN generators → "generator"; the captioner "fc" →
    #: "model" (fc-model.pth), "infos" (fc-infos.pkl), "encoder" (resnet101.pth).
    files: Mapping[str, WeightsFile]
    description: str
    #: The task whose model these files are (`inference.tasks`): the registry registers each
    #: entry as a model of it.  "" for files no task loads by name.
    task: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))


def check_url(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ALLOWED_SCHEMES or not parsed.netloc:
        raise ValueError(f"only http(s) URLs can be downloaded, not {url!r}")


_DLWPT = "https://github.com/deep-learning-with-pytorch/dlwpt-code/raw/master/"
_CAPTIONING = "https://github.com/deep-learning-with-pytorch/ImageCaptioning.pytorch/raw/master/"
#: The zoo of junyanz/pytorch-CycleGAN-and-pix2pix (scripts/download_cyclegan_model.sh).  The
#: authors publish it over plain http and without checksums; `weights_only` loading is what
#: keeps a tampered file from running code.
_CYCLEGAN_ZOO = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/"
#: Zoo generators with the book's layout; one line here is one more `zebra` model (a style).
#: The zoo's own `horse2zebra` is left out: the name belongs to the book's copy, which has a
#: published blob id.
_ZOO_GENERATORS: dict[str, str] = {
    "zebra2horse": "zebra → horse",
    "apple2orange": "apple → orange",
    "orange2apple": "orange → apple",
    "summer2winter_yosemite": "Yosemite summer → winter",
    "winter2summer_yosemite": "Yosemite winter → summer",
    "monet2photo": "Monet painting → photo",
    "style_monet": "photo → Monet style",
    "style_cezanne": "photo → Cézanne style",
    "style_ukiyoe": "photo → ukiyo-e style",
    "style_vangogh": "photo → Van Gogh style",
    "sat2map": "satellite photo → map",
    "map2sat": "map → satellite photo",
    "cityscapes_photo2label": "street photo → Cityscapes label colours",
    "cityscapes_label2photo": "Cityscapes label colours → street photo",
    "facades_photo2label": "facade photo → label colours",
    "facades_label2photo": "facade label colours → photo",
    "iphone2dslr_flower": "phone flower photo → DSLR shallow depth of field",
}


def _build_catalogue() -> Mapping[str, ModelWeights]:
    models = [
        ModelWeights(
            name="horse2zebra",
            files={
                "generator": WeightsFile(
                    relpath="cyclegan/horse2zebra_0.4.0.pth",
                    url=_DLWPT + "data/p1ch2/horse2zebra_0.4.0.pth",
                    blob_id="ce10268a67fba8227bd42a071e17eef1b358fa2b",
                )
            },
            description="CycleGAN horse → zebra generator, the book's copy (dlwpt-code)",
            task="zebra",
        ),
        ModelWeights(
            name="fc",
            files={
                "model": WeightsFile(
                    relpath="captioner/fc-model.pth",
                    url=_CAPTIONING + "data/FC/fc-model.pth",
                    blob_id="cd0073c00d1c1809e25e0ae794d5c58beec707d6",
                ),
                "infos": WeightsFile(
                    relpath="captioner/fc-infos.pkl",
                    url=_CAPTIONING + "data/FC/fc-infos.pkl",
                    blob_id="623f78e01e9b0dd95a130b5766e6651328939f29",
                ),
                "encoder": WeightsFile(
                    relpath="captioner/resnet101.pth",
                    url=None,
                    blob_id=None,
                    parts=(
                        WeightsFile(
                            relpath="captioner/resnet101a.pth",
                            url=_CAPTIONING + "data/imagenet_weights/resnet101a.pth",
                            blob_id="2933b934efa86e68cecf59fbad1072e16455b3ab",
                        ),
                        WeightsFile(
                            relpath="captioner/resnet101b.pth",
                            url=_CAPTIONING + "data/imagenet_weights/resnet101b.pth",
                            blob_id="76aed7cfbdc096666152d6c80069e28be37b9acd",
                        ),
                    ),
                ),
            },
            description="NeuralTalk2-style FC captioner + its Caffe ResNet-101 encoder "
            "(ImageCaptioning.pytorch, the book's fork)",
            task="caption",
        ),
    ]
    for name, what in _ZOO_GENERATORS.items():
        models.append(
            ModelWeights(
                name=name,
                files={
                    "generator": WeightsFile(
                        relpath=f"cyclegan/{name}.pth", url=f"{_CYCLEGAN_ZOO}{name}.pth", blob_id=None
                    )
                },
                description=f"CycleGAN {what} generator (the CycleGAN authors' model zoo)",
                task="zebra",
            )
        )
    return MappingProxyType({model.name: model for model in models})


CATALOGUE: Mapping[str, ModelWeights] = _build_catalogue()

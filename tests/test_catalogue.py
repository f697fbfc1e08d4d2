"""inference.catalogue: the published files, their ids and URLs; data only, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inference.catalogue import CATALOGUE, WeightsFile
from tests.conftest import REPO_ROOT


def test_catalogue_has_the_books_files_with_their_blob_ids() -> None:
    generator = CATALOGUE["horse2zebra"].files["generator"]
    assert generator.url == ("https://github.com/deep-learning-with-pytorch/dlwpt-code/raw/"
                             "master/data/p1ch2/horse2zebra_0.4.0.pth")
    assert generator.blob_id == "ce10268a67fba8227bd42a071e17eef1b358fa2b"

    fc = CATALOGUE["fc"].files
    assert set(fc) == {"model", "infos", "encoder"}
    assert fc["model"].blob_id == "cd0073c00d1c1809e25e0ae794d5c58beec707d6"
    assert fc["model"].url.endswith("/ImageCaptioning.pytorch/raw/master/data/FC/fc-model.pth")
    assert fc["infos"].blob_id == "623f78e01e9b0dd95a130b5766e6651328939f29"
    encoder = fc["encoder"]
    assert encoder.url is None and encoder.blob_id is None
    assert [p.url.rsplit("/", 2)[-2:] for p in encoder.parts] == [
        ["imagenet_weights", "resnet101a.pth"], ["imagenet_weights", "resnet101b.pth"]]
    assert [p.blob_id for p in encoder.parts] == [
        "2933b934efa86e68cecf59fbad1072e16455b3ab", "76aed7cfbdc096666152d6c80069e28be37b9acd"]


def test_catalogue_zoo_generators_have_no_published_id() -> None:
    for name in ["zebra2horse", "monet2photo", "style_monet", "style_cezanne", "style_ukiyoe",
                 "style_vangogh", "summer2winter_yosemite", "winter2summer_yosemite",
                 "apple2orange", "orange2apple"]:
        (role, file), = CATALOGUE[name].files.items()
        assert role == "generator"
        assert file.blob_id is None and file.integrity == "none published"
        assert file.url == f"http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/{name}.pth"


def test_catalogue_is_read_only_and_relpaths_are_distinct() -> None:
    with pytest.raises(TypeError):
        CATALOGUE["evil"] = CATALOGUE["fc"]  # type: ignore[index]
    with pytest.raises(TypeError):
        CATALOGUE["fc"].files["model"] = CATALOGUE["fc"].files["infos"]  # type: ignore[index]
    relpaths = [f.relpath for m in CATALOGUE.values() for f in m.files.values()]
    relpaths += [p.relpath for m in CATALOGUE.values() for f in m.files.values() for p in f.parts]
    assert len(relpaths) == len(set(relpaths))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.pth", "x.pth"])
def test_only_http_urls_are_accepted(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        WeightsFile("x.pth", url, None)


@pytest.mark.parametrize("relpath", ["/abs.pth", "../up.pth", "a/../../b.pth", ""])
def test_relpaths_stay_inside_the_weights_dir(relpath: str) -> None:
    with pytest.raises(ValueError):
        WeightsFile(relpath, "https://example.org/x", None)




def test_every_entry_names_a_task_and_the_zoo_styles_are_zebra_models() -> None:
    tasks = {name: model.task for name, model in CATALOGUE.items()}
    assert tasks["fc"] == "caption"
    assert {tasks[name] for name in ("horse2zebra", "monet2photo", "style_vangogh")} == {"zebra"}
    assert all(role == "generator" for name, task in tasks.items() if task == "zebra"
               for role in CATALOGUE[name].files)


def test_the_catalogue_imports_neither_torch_nor_the_store() -> None:
    code = ("import sys, inference.catalogue; "
            "print(sorted(m for m in ('torch', 'torchvision', 'inference.weights') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"

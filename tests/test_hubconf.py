"""hubconf.py's entries, as `torch.hub.load(..., source="local")` calls them."""

from __future__ import annotations

import pytest
import torch

import hubconf
from inference.models.captioner import DEFAULT_BEAM, CaptionPipeline, FCModelOptions
from tests.conftest import REPO_ROOT


def _no_weights_store(weights_dir):
    raise AssertionError("this call must not look for weights (it could download them)")


@pytest.mark.parametrize("entry", ["zebra_generator", "efficientnet_lite0", "captioner"])
def test_an_argument_an_entry_does_not_take_is_a_type_error(monkeypatch, entry):
    monkeypatch.setattr(hubconf, "_store", _no_weights_store)
    with pytest.raises(TypeError, match="unexpected keyword argument 'pretrainde'"):
        getattr(hubconf, entry)(pretrainde=False)


def test_captioner_without_pretrained_weights_reads_none(monkeypatch):
    monkeypatch.setattr(hubconf, "_store", _no_weights_store)
    pipeline = hubconf.captioner(pretrained=False)
    assert isinstance(pipeline, CaptionPipeline)
    assert pipeline.model.options == FCModelOptions() and pipeline.vocab == {}
    assert pipeline.beam == DEFAULT_BEAM == 2


def test_captioner_decodes_as_the_book_unless_told_otherwise(generated_weights_dir):
    def load(**options) -> CaptionPipeline:
        return torch.hub.load(
            str(REPO_ROOT), "captioner", source="local", weights_dir=str(generated_weights_dir), **options
        )

    assert load().beam == 2
    assert load(beam=1).beam == 1


def test_zebra_generator_names_are_the_registrys(monkeypatch):
    from inference.errors import ModelUnavailable
    from inference.models.cyclegan import ResnetGenerator

    monkeypatch.setattr(hubconf, "_store", _no_weights_store)
    assert isinstance(hubconf.zebra_generator(name="style_vangogh"), ResnetGenerator)
    for wrong in ("nope", "fc"):  # unknown, and a model of another task
        with pytest.raises(ModelUnavailable, match=f"Unknown zebra model '{wrong}'"):
            hubconf.zebra_generator(name=wrong)

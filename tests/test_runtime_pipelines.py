"""The ONNX Runtime pipelines against the torch ones they were exported from: the same pixels in
(numpy preprocessing vs torchvision's), the same answers out (classify top-1 on the real
EfficientNet-Lite0, zebra within 2/255, captions word for word), and the numpy port of the
book's greedy and beam search against `FCCaptionModel`, on a checkpoint biased toward UNK too."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference.images import decode_image, to_rgb
from inference.models import captioner, cyclegan
from inference.models.caption_infos import load_infos
from inference.registry import get_model
from inference.runtime import captioning, pipelines
from inference.runtime.captioning import NumpyCaptionDecoder
from inference.runtime.export import DecoderStep, onnx_bytes
from inference.runtime.sessions import ThreadedSession
from tests.checkpoints import write_captioner_dir
from tests.conftest import IMAGES
from tests.runtime_fixtures import MODELS, exported_cache  # noqa: F401 (a fixture)

CPU = torch.device("cpu")
UNK = 9487


@pytest.fixture(scope="module")
def torch_pipelines(exported_cache) -> dict:
    return {task: get_model(name, task).load(exported_cache.settings, CPU) for task, name in MODELS.items()}


@pytest.fixture(scope="module")
def onnx_pipelines(exported_cache) -> dict:
    return {task: loaded.pipeline for task, loaded in exported_cache.loaded.items()}


def _images() -> list[Image.Image]:
    """The samples, and the awkward ones (transparency, grey, a thin strip, tiny), made RGB as
    the decoder hands every image to a pipeline."""
    rng = np.random.default_rng(0)
    images = [decode_image(path.read_bytes()) for path in sorted(IMAGES.glob("*.jpg"))]
    images.append(Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (333, 251), dtype=np.uint8), "L"))
    images.append(Image.fromarray(rng.integers(0, 256, (9, 400, 3), dtype=np.uint8), "RGB"))
    images.append(Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB"))
    return [to_rgb(image) for image in images]


@pytest.mark.parametrize("task", sorted(MODELS))
def test_numpy_preprocessing_equals_the_torch_pipelines(torch_pipelines, onnx_pipelines, task):
    for image in _images():
        expected = torch_pipelines[task].preprocess(image).numpy()
        found = onnx_pipelines[task].preprocess(image)
        assert found.dtype == np.float32 and found.shape == expected.shape
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)
    assert onnx_pipelines[task].draft_size == torch_pipelines[task].draft_size
    assert onnx_pipelines[task].fixed_input_size == torch_pipelines[task].fixed_input_size


def test_geometry_follows_the_torch_modules_for_every_shape():
    recipe = {"multiple": cyclegan.SIDE_MULTIPLE, "min_side": cyclegan.MIN_SIDE, "max_aspect": cyclegan.MAX_ASPECT}
    for width in (1, 3, 8, 63, 64, 65, 255, 256, 257, 511, 1000, 4000, 20000):
        for height in (1, 7, 64, 100, 256, 300, 1024, 5000):
            for size in (64, 256):
                assert pipelines.working_size(width, height, size, recipe) == cyclegan.working_size(width, height, size)
                assert captioning.encoder_size(width, height, size, captioner.MIN_SIDE) == captioner.encoder_size(
                    width, height, size
                )


def test_classifier_top1_and_probabilities_match_eager_on_the_real_lite0(torch_pipelines, onnx_pipelines):
    eager, onnx = torch_pipelines["classify"], onnx_pipelines["classify"]
    images = _images()
    expected = eager.run([eager.preprocess(image) for image in images], [{"top": 5}] * len(images))
    found = onnx.run([onnx.preprocess(image) for image in images], [{"top": 5}] * len(images))
    for answer, reference in zip(found, expected):
        assert [p.label for p in answer] == [p.label for p in reference]
        assert [p.probability for p in answer] == pytest.approx([p.probability for p in reference], abs=1e-3)
    assert (found[0][0].label, found[1][0].label) == ("golden retriever", "sorrel")  # bobby.jpg, horse.jpg
    short, long = onnx.run([onnx.preprocess(images[0])] * 2, [{"top": 1}, {}])
    assert len(short) == 1 and len(long) == 5 and short[0] == long[0]


def test_set_threads_makes_one_session_per_count_lazily(onnx_pipelines):
    classifier = onnx_pipelines["classify"]
    tensor = classifier.preprocess(decode_image((IMAGES / "bobby.jpg").read_bytes()))
    one = classifier.run([tensor], [{}])
    assert classifier.model.thread_counts == [1]
    classifier.set_threads(2)
    assert classifier.model.thread_counts == [1]  # created on the first run that needs it
    two = classifier.run([tensor], [{}])
    assert classifier.model.thread_counts == [1, 2]
    assert [p.label for p in two[0]] == [p.label for p in one[0]]
    classifier.set_threads(1)
    assert classifier.run([tensor], [{}]) == one


def test_zebra_images_within_two_levels_of_eager(torch_pipelines, onnx_pipelines):
    eager, onnx = torch_pipelines["zebra"], onnx_pipelines["zebra"]
    images = _images()
    expected = eager.run([eager.preprocess(image) for image in images], [{}] * len(images))
    found = onnx.run([onnx.preprocess(image) for image in images], [{}] * len(images))
    for png, reference in zip(found, expected):
        assert png.startswith(b"\x89PNG")
        ours, theirs = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in (png, reference))
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 2


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_captions_match_eager_word_for_word(torch_pipelines, onnx_pipelines, beam):
    eager, onnx = torch_pipelines["caption"], onnx_pipelines["caption"]
    images = _images()
    expected = eager.run([eager.preprocess(image) for image in images], [{"beam": beam}] * len(images))
    assert onnx.run([onnx.preprocess(image) for image in images], [{"beam": beam}] * len(images)) == expected
    assert onnx.beam == eager.beam == 2


# --- the numpy decoding against FCCaptionModel, on given features ------------------------------


#: Word-logit biases of the generated checkpoints: "prefers_unk" ends captions part-way and often
#: likes UNK best (as in tests/test_captioner.py).
BIASES = {"plain": {}, "prefers_unk": {0: 0.3, UNK: 0.6}}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, tuple[captioner.FCCaptionModel, NumpyCaptionDecoder]]:
    """Per checkpoint: the torch language model, and the numpy decoder on its step exported to ONNX."""
    made = {}
    for kind, bias in BIASES.items():
        directory = write_captioner_dir(tmp_path_factory.mktemp(f"decoder_{kind}"), seed=3, word_logit_bias=bias)
        options = load_infos(directory / "fc-infos.pkl").options
        model = captioner.load_caption_model(directory / "fc-model.pth", options)
        zeros = torch.zeros(2, options.rnn_size)
        step = directory / "step.onnx"
        axes = {name: {0: "batch"} for name in ("x", "h", "c", "logprobs", "h_out", "c_out")}
        step.write_bytes(
            onnx_bytes(DecoderStep(model), (torch.zeros(2, options.input_encoding_size), zeros, zeros),
                       ["x", "h", "c"], ["logprobs", "h_out", "c_out"], axes)
        )
        table = model.embed.weight.detach().numpy().copy()
        decoder = NumpyCaptionDecoder(
            ThreadedSession(step), table, end=captioner.END, seq_length=options.seq_length,
            unk_penalty=captioner.UNK_PENALTY,
        )
        made[kind] = (model, decoder)
    return made


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.rand(6, 2048, generator=torch.Generator().manual_seed(7)) * 2


@pytest.mark.parametrize("kind", sorted(BIASES))
def test_numpy_greedy_is_the_torch_greedy_word_for_word(decoders, features, kind):
    model, decoder = decoders[kind]
    with torch.inference_mode():
        expected = model.greedy(features)
        embeddings = model.img_embed(features).numpy()
    found = decoder.greedy(embeddings)
    assert [words for words, _ in found] == [caption.words for caption in expected]
    assert [total for _, total in found] == pytest.approx([c.logprob for c in expected], abs=1e-3)


@pytest.mark.parametrize("kind", sorted(BIASES))
@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_numpy_beam_search_is_the_torch_beam_search_word_for_word(decoders, features, width, kind):
    model, decoder = decoders[kind]
    with torch.inference_mode():
        expected = [model.beam_search(feature, width) for feature in features]
        embeddings = model.img_embed(features).numpy()
    found = [decoder.beam_search(embedding, width) for embedding in embeddings]
    assert [words for words, _ in found] == [caption.words for caption in expected]
    assert [total for _, total in found] == pytest.approx([c.logprob for c in expected], abs=1e-3)
    assert all(UNK not in words for words, _ in found)  # beam search never picks UNK


def test_the_unk_biased_checkpoint_tells_greedy_and_beam_search_apart(decoders, features):
    model, decoder = decoders["prefers_unk"]
    with torch.inference_mode():
        embeddings = model.img_embed(features).numpy()
    greedy = [words for words, _ in decoder.greedy(embeddings)]
    beams = [decoder.beam_search(embedding, 2)[0] for embedding in embeddings]
    # Greedy writes UNK where the model prefers it (beam search never does: see above), so
    # these features do exercise the UNK rule of the port, and captions end before the cap.
    assert sum(UNK in words for words in greedy) >= 2
    assert any(len(words) < model.options.seq_length for words in greedy + beams)
    assert greedy != beams


def test_a_big_model_keeps_one_session_shrinks_at_once_and_grows_only_when_it_lasts(onnx_pipelines, monkeypatch):
    from inference.runtime import sessions

    monkeypatch.setattr(sessions, "ONE_SESSION_FROM_BYTES", 0)  # Lite0's file counts as big here
    classifier = onnx_pipelines["classify"]
    model = ThreadedSession(classifier.model.path, threads=1)
    feeds = {model.session().get_inputs()[0].name: classifier.preprocess(decode_image((IMAGES / "bobby.jpg").read_bytes()))[None]}
    model.set_threads(2)
    for _ in range(sessions.GROW_AFTER_BATCHES - 1):
        model.run(feeds)
        assert model.thread_counts == [1]  # fewer threads than granted, never more
    model.run(feeds)
    assert model.thread_counts == [2]  # the larger grant lasted: one session, of 2 threads
    model.set_threads(1)
    model.run(feeds)
    assert model.thread_counts == [1]  # a smaller grant: at once (the budget is a limit)


def test_top_indices_are_a_stable_sorts_first_k_ties_included():
    from inference.runtime.captioning import _top_indices

    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, size=(6, 40)).astype(np.float32)  # many ties, also at the k-th place
    for k in (1, 2, 3, 10, 40):
        assert _top_indices(scores, k).tolist() == np.argsort(-scores, axis=1, kind="stable")[:, :k].tolist()

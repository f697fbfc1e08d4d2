"""The captioner's decoding (`FCCaptionModel.caption`, `greedy`), on hand-built models whose
answers are known: tests that mutation testing (mutmut) showed were missing.

`tests/test_captioner.py` builds the models; these tests only read them.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.test_captioner import FEATURES, TINY, _chain_model

#: TINY's vocabulary is words 1…5; the last one, 5, is UNK.
UNK = TINY.vocab_size


def test_beam_one_is_the_greedy_sampler_that_may_write_unk_and_two_is_beam_search():
    # After the start, UNK is the likeliest word and word 1 the next; both then end.
    model = _chain_model({0: {UNK: 5.0, 1: 4.0}, UNK: {0: 5.0}, 1: {0: 5.0}})
    with torch.inference_mode():
        assert [c.words for c in model.caption(FEATURES, beam=1)] == [[UNK], [UNK]]  # the book's greedy
        assert [c.words for c in model.caption(FEATURES, beam=2)] == [[1], [1]]  # beam search skips UNK


def test_beam_two_finds_the_likelier_caption_that_beam_one_misses():
    # Word 1 is likelier first, but after it the mass spreads; word 2 ends at once.
    spread = {3: -1.0, 4: -1.1, 5: -1.1}
    model = _chain_model({0: {1: 0.2, 2: 0.0}, 1: spread, 2: {0: 0.0}, 3: {0: 0.0}, 4: {0: 0.0}, 5: {0: 0.0}})
    with torch.inference_mode():
        assert model.caption(FEATURES[:1], beam=1)[0].words == [1, 3]
        assert model.caption(FEATURES[:1], beam=2)[0].words == [2]


def _count_steps(model) -> list[int]:
    calls: list[int] = []
    step = model.step

    def counting(x, state):
        calls.append(x.shape[0])
        return step(x, state)

    model.step = counting
    return calls


def test_greedy_stops_stepping_once_every_caption_has_ended():
    model = _chain_model({0: {3: 5.0}, 3: {1: 5.0}, 1: {2: 5.0}, 2: {0: 5.0}})
    calls = _count_steps(model)
    with torch.inference_mode():
        assert [c.words for c in model.greedy(FEATURES)] == [[3, 1, 2], [3, 1, 2]]
    # Two priming steps (image, start token), then one per word before the end token: no
    # step after it, though the length cap (16) is far.
    assert len(calls) == 2 + 3


def test_greedy_takes_no_step_past_the_length_cap():
    options = dataclasses.replace(TINY, seq_length=5)
    model = _chain_model({0: {1: 5.0}, 1: {2: 5.0}, 2: {1: 5.0}}, options)
    calls = _count_steps(model)
    with torch.inference_mode():
        assert model.greedy(FEATURES[:1])[0].words == [1, 2, 1, 2, 1]
    assert len(calls) == 2 + 4  # the fifth word is the last: nothing is fed after it

"""The captioner on ONNX Runtime: the encoder and one decoder step as ONNX graphs, the decoding
in numpy.

The export writes three files: `encoder.onnx` (image → the 2048 features and their embedding,
`img_embed(features)`), `step.onnx` (one step of the LSTM core and the word scores: input
embedding, h, c → log-probabilities, h, c) and `embed.npy` (the word-embedding table, looked up
with numpy indexing exactly as `nn.Embedding` does).  Greedy decoding and the beam search below
are ports of `FCCaptionModel.greedy` and `FCCaptionModel.beam_search` in
`inference.models.captioner`, step for step, in float32 like the torch code; the rules (UNK
penalty before every beam choice, finished beams leaving the beam, the early stop) are
documented there and checked word for word against it by tests/test_runtime_pipelines.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from inference.images import to_rgb
from inference.runtime.cache import CachedExport
from inference.runtime.pipelines import normalization, resample
from inference.runtime.sessions import ThreadedSession

#: (h, c), each (N, rnn_size).
State = tuple[np.ndarray, np.ndarray]


def encoder_size(width: int, height: int, size: int, min_side: int) -> tuple[int, int]:
    """`inference.models.captioner.encoder_size`: the longest side at most `size`, never
    enlarged, sides below `min_side` stretched to it."""
    scale = min(1.0, size / max(width, height))
    return max(min_side, round(width * scale)), max(min_side, round(height * scale))


class NumpyCaptionDecoder:
    """`FCCaptionModel`'s decoding, with its step on ONNX Runtime."""

    def __init__(self, step: ThreadedSession, embeddings: np.ndarray, *, end: int, seq_length: int, unk_penalty: float):
        self.step_session = step
        self.embeddings = embeddings
        self.end = end
        self.seq_length = seq_length
        self.unk_penalty = np.float32(unk_penalty)
        self.rnn_size = int(step.session().get_inputs()[1].shape[1])

    def step(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        logprobs, h, c = self.step_session.run({"x": x, "h": state[0], "c": state[1]})
        return logprobs, (h, c)

    def start(self, image_embedding: np.ndarray) -> tuple[np.ndarray, State]:
        """The embedded image on a zero state, then the end token as the start word."""
        zeros = np.zeros((image_embedding.shape[0], self.rnn_size), dtype=np.float32)
        _, state = self.step(image_embedding, (zeros, zeros))
        return self.step(self.embeddings[np.full(image_embedding.shape[0], self.end)], state)

    def greedy(self, image_embeddings: np.ndarray) -> list[tuple[list[int], float]]:
        """The most likely word at every step (UNK included), for all images at once."""
        logprobs, state = self.start(image_embeddings)
        count = image_embeddings.shape[0]
        words: list[list[int]] = [[] for _ in range(count)]
        totals = np.zeros(count, dtype=np.float32)
        running = np.ones(count, dtype=bool)
        for position in range(self.seq_length):
            chosen = logprobs.argmax(axis=1)
            best = logprobs[np.arange(count), chosen]
            totals += np.where(running, best, np.float32(0))
            for row in np.flatnonzero(running):
                if chosen[row] != self.end:
                    words[row].append(int(chosen[row]))
            running &= chosen != self.end
            if not running.any() or position == self.seq_length - 1:
                break
            logprobs, state = self.step(self.embeddings[chosen], state)
        return [(row_words, float(total)) for row_words, total in zip(words, totals)]

    def beam_search(self, image_embedding: np.ndarray, width: int) -> tuple[list[int], float]:
        """`FCCaptionModel.beam_search` for one image (its embedding, (input_encoding_size,))."""
        width = max(1, width)
        logprobs, state = self.start(image_embedding[None])
        vocab = logprobs.shape[1]
        unk_penalty = np.zeros(vocab, dtype=np.float32)
        unk_penalty[vocab - 1] = self.unk_penalty
        prefixes: list[list[int]] = [[]]
        sums = np.zeros(1, dtype=np.float32)
        finished: list[tuple[list[int], float]] = []
        for position in range(self.seq_length):
            at_cap = position == self.seq_length - 1
            scores = (sums[:, None] + logprobs) - unk_penalty
            offered_words = _top_indices(scores, min(width, vocab))
            offered_sums = np.take_along_axis(scores, offered_words, axis=1)
            kept_offers = _top_indices(offered_sums.reshape(1, -1), min(width, offered_sums.size))[0]
            offers_per_beam = offered_words.shape[1]
            rows: list[int] = []
            words: list[int] = []
            live_sums: list[float] = []
            for offer in kept_offers.tolist():
                row, rank = divmod(offer, offers_per_beam)
                word, total = int(offered_words[row, rank]), float(offered_sums[row, rank])
                if word == self.end:
                    finished.append((prefixes[row], total))
                elif at_cap:
                    finished.append((prefixes[row] + [word], total))
                else:
                    rows.append(row)
                    words.append(word)
                    live_sums.append(total)
            best_finished = max((total for _, total in finished), default=float("-inf"))
            if not rows or best_finished >= max(live_sums):
                break
            prefixes = [prefixes[row] + [word] for row, word in zip(rows, words)]
            sums = np.asarray(live_sums, dtype=np.float32)
            logprobs, state = self.step(self.embeddings[words], (state[0][rows], state[1][rows]))
        return max(finished, key=lambda caption: caption[1])


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the `k` largest scores, largest first, ties by lower index: the
    order of a stable sort of the whole row (torch.topk's on these rows), found without sorting
    the whole vocabulary (a full sort of each step's 9,488 scores was half the decoding time)."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = []
    for row in scores:
        kth_largest = np.partition(row, -k)[-k]
        candidates = np.flatnonzero(row >= kth_largest)  # ties at the edge included, in index order
        rows.append(candidates[np.argsort(-row[candidates], kind="stable")[:k]])
    return np.stack(rows)


class OnnxCaptionPipeline:
    """Image → one English sentence; each request may name its `beam` (1: greedy)."""

    fixed_input_size = False

    def __init__(self, export: CachedExport, threads: int = 1, size: int | None = None, beam: int | None = None):
        sidecar = export.sidecar
        self.name: str = sidecar["model"]
        self.recipe = sidecar["preprocessing"]
        decoding = sidecar["decoding"]
        self.size = int(size or self.recipe["size"])
        self.beam = int(beam or decoding["beam"])
        #: Word index → word; index i + 1 is `vocabulary[i]` (0 is the end token).
        self.vocab = {index: word for index, word in enumerate(sidecar["vocabulary"], start=1)}
        self.encoder = ThreadedSession(export.path("encoder"), threads, shrink_above=0)  # see ThreadedSession
        embeddings = np.load(export.path("embeddings"), allow_pickle=False)
        self.decoder = NumpyCaptionDecoder(
            ThreadedSession(export.path("step"), threads),
            np.ascontiguousarray(embeddings, dtype=np.float32),
            end=int(decoding["end"]),
            seq_length=int(decoding["seq_length"]),
            unk_penalty=float(decoding["unk_penalty"]),
        )
        self._normalize = normalization(self.recipe)
        self._resample = resample(self.recipe)
        self.draft_size: tuple[int, int] | None = (self.size, self.size)

    def set_threads(self, threads: int) -> None:
        self.encoder.set_threads(threads)
        self.decoder.step_session.set_threads(threads)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        target = encoder_size(image.width, image.height, self.size, self.recipe["min_side"])
        if target != image.size:
            image = image.resize(target, self._resample)
        return self._normalize(image)

    def encode(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, 2048), their embeddings (N, E)); each image on its own (sizes differ)."""
        outputs = [self.encoder.run({"image": np.ascontiguousarray(x[None], dtype=np.float32)}) for x in inputs]
        return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])

    def captions(self, image_embeddings: np.ndarray, beams: list[int]) -> list[list[int]]:
        """Word indices per image: greedy for beam 1 (all such images at once), else beam search."""
        captions: dict[int, list[int]] = {}
        greedy_rows = [row for row, beam in enumerate(beams) if beam == 1]
        if greedy_rows:
            for row, (words, _) in zip(greedy_rows, self.decoder.greedy(image_embeddings[greedy_rows])):
                captions[row] = words
        for row, beam in enumerate(beams):
            if beam > 1:
                captions[row] = self.decoder.beam_search(image_embeddings[row], beam)[0]
        return [captions[row] for row in range(len(beams))]

    def run(self, inputs: list[np.ndarray], options: list[dict[str, Any]]) -> list[str]:
        _, embeddings = self.encode(inputs)
        beams = [max(1, int(option.get("beam", self.beam))) for option in options]
        return [self.sentence(words) for words in self.captions(embeddings, beams)]

    def sentence(self, words: list[int]) -> str:
        return " ".join(self.vocab.get(word, "<unk>") for word in words)

    def describe(self, image: Image.Image, beam: int | None = None) -> str:
        return self.run([self.preprocess(image)], [{} if beam is None else {"beam": beam}])[0]

"""The NeuralTalk2-style "FC" captioner of the book's §2.3 (docs/checkpoints.md §3).

Two networks:
- `CaffeResNet101Encoder`: a ResNet-101 converted from Caffe.  Same key names as torchvision's,
  but the stride of each down-sampling Bottleneck sits on its first 1×1 convolution and the
  stem's max-pool rounds up; torchvision's own architecture gives different features.  The
  image's feature is the mean of layer4's output over its spatial positions (2048 numbers).
- `FCCaptionModel`: the feature, embedded, primes an LSTM-like core that then writes the
  caption one word at a time (greedy or beam search).

Files: `fc-model.pth` (the language model), `fc-infos.pkl` (its options and vocabulary; a pickle,
read with a restricted unpickler) and `resnet101.pth` (published as two byte halves
`resnet101a.pth` + `resnet101b.pth`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.transforms import functional as TF

from config import Settings
from inference.checkpoint import load_state_dict_file, load_strict
from inference.errors import WeightsCorrupt, WeightsMissing
from inference.images import to_rgb
from inference.unpickle import Global, load_pickle

DEFAULT_NAME = "fc"
#: Longest side of the image the encoder sees (the reference code used the original size).
DEFAULT_SIZE = 512
DEFAULT_BEAM = 3
#: Images smaller than this are enlarged: the encoder needs a few pixels to reach layer4.
MIN_SIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Index 0 ends a caption; it is also what the decoder is fed to start one.
END = 0

#: The globals fc-infos.pkl uses, Python 3 spelling: the options (an argparse.Namespace rebuilt
#: through copyreg) and numpy scalars (best_val_score).  numpy 2 pickles name `numpy._core`.
INFOS_GLOBALS: frozenset[Global] = frozenset(
    {
        ("argparse", "Namespace"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }
)


# --- fc-infos.pkl -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FCModelOptions:
    """The sizes of the language model, as training recorded them in fc-infos.pkl's `opt`."""

    vocab_size: int = 9487
    input_encoding_size: int = 512
    rnn_size: int = 512
    fc_feat_size: int = 2048
    #: Most words in a caption.
    seq_length: int = 16

    @classmethod
    def from_namespace(cls, opt: argparse.Namespace) -> FCModelOptions:
        settings = vars(opt)
        unsupported = {
            key: settings.get(key)
            for key, wanted in (("caption_model", "fc"), ("rnn_type", "lstm"), ("num_layers", 1))
            if settings.get(key, wanted) != wanted
        }
        if unsupported:
            raise WeightsCorrupt(f"fc-infos.pkl describes a model this code does not implement: {unsupported}")
        try:
            return cls(**{name: int(settings[name]) for name in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as error:
            raise WeightsCorrupt(f"fc-infos.pkl lacks a usable model option: {error}") from None


@dataclass(frozen=True)
class CaptionInfos:
    #: Word index (1 … vocab_size) → word.
    vocab: dict[int, str]
    options: FCModelOptions


def load_infos(path: str | os.PathLike[str]) -> CaptionInfos:
    """Options and vocabulary from fc-infos.pkl, unpickled without running any of its code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMissing(f"captioner file {path} does not exist", path=str(path))
    infos = load_pickle(path, INFOS_GLOBALS)
    if not isinstance(infos, Mapping) or not isinstance(infos.get("opt"), argparse.Namespace):
        raise WeightsCorrupt(f"{path.name} is not a captioner infos file (no `opt` options)")
    raw_vocab = infos.get("vocab")
    if not isinstance(raw_vocab, Mapping):
        raise WeightsCorrupt(f"{path.name} has no vocabulary")
    try:
        vocab = {int(index): str(word) for index, word in raw_vocab.items()}
    except (TypeError, ValueError):
        raise WeightsCorrupt(f"{path.name} has a vocabulary whose keys are not word indices") from None
    options = FCModelOptions.from_namespace(infos["opt"])
    if set(vocab) != set(range(1, options.vocab_size + 1)):
        raise WeightsCorrupt(
            f"{path.name}: the vocabulary has {len(vocab)} words, not the indices 1…{options.vocab_size}"
        )
    return CaptionInfos(vocab, options)


# --- the image encoder ------------------------------------------------------------------------


class CaffeResNet101Encoder(ResNet):
    """Image (N, 3, H, W), ImageNet-normalised → feature (N, 2048).

    torchvision's ResNet with the Caffe model's two differences.  Its `fc` is kept (unused):
    the published file carries `fc.weight`/`fc.bias`, and keeping the layer means the file
    loads strictly against exactly torchvision's key set.
    """

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 23, 3])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        for stage in (self.layer2, self.layer3, self.layer4):  # the stages that down-sample
            stage[0].conv1.stride = (2, 2)
            stage[0].conv2.stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def load_encoder(source: str | os.PathLike[str] | bytes, *, name: str = "resnet101.pth") -> CaffeResNet101Encoder:
    """The encoder from resnet101.pth (a path, or the file's bytes), strictly loaded, eval mode."""
    with torch.device("meta"):  # 44.5 M parameters: skip initialising what the file replaces
        encoder = CaffeResNet101Encoder()
    load_strict(encoder, load_state_dict_file(source, name=name), source=name, assign=True)
    return encoder.eval()


def read_encoder_file(directory: Path) -> Path | bytes:
    """resnet101.pth, or the bytes of its published halves joined in order."""
    whole = directory / "resnet101.pth"
    if whole.is_file():
        return whole
    halves = [directory / "resnet101a.pth", directory / "resnet101b.pth"]
    if all(half.is_file() for half in halves):
        return halves[0].read_bytes() + halves[1].read_bytes()
    raise WeightsMissing(
        f"{directory} has neither resnet101.pth nor both of resnet101a.pth and resnet101b.pth", path=str(whole)
    )


# --- the language model -----------------------------------------------------------------------


#: The recurrent state: (h, c), each (N, rnn_size).
State = tuple[torch.Tensor, torch.Tensor]


class LSTMCore(nn.Module):
    """One step of the captioner's LSTM variant: five gate chunks instead of four.

    s = i2h(x) + h2h(h); in, forget, out gates = sigmoid(chunks 0, 1, 2);
    the cell input is the element-wise max of chunks 3 and 4 (a maxout instead of tanh).
    """

    def __init__(self, input_size: int, rnn_size: int) -> None:
        super().__init__()
        self.rnn_size = rnn_size
        self.i2h = nn.Linear(input_size, 5 * rnn_size)
        self.h2h = nn.Linear(rnn_size, 5 * rnn_size)

    def forward(self, x: torch.Tensor, state: State) -> State:
        h, c = state
        in_gate, forget_gate, out_gate, cell_a, cell_b = (self.i2h(x) + self.h2h(h)).chunk(5, dim=1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.maximum(cell_a, cell_b)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return h, c


@dataclass(frozen=True)
class Caption:
    #: Word indices, without the end token.
    words: list[int]
    #: Sum of the log-probabilities of the words and, if it ended before the cap, the end token.
    logprob: float


class FCCaptionModel(nn.Module):
    """Image feature (N, fc_feat_size) → captions, as word indices."""

    def __init__(self, options: FCModelOptions = FCModelOptions()) -> None:
        super().__init__()
        self.options = options
        self.img_embed = nn.Linear(options.fc_feat_size, options.input_encoding_size)
        self.core = LSTMCore(options.input_encoding_size, options.rnn_size)
        self.embed = nn.Embedding(options.vocab_size + 1, options.input_encoding_size)
        self.logit = nn.Linear(options.rnn_size, options.vocab_size + 1)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Feed one input (N, input_encoding_size) → log-probabilities of the next word (N, V)."""
        state = self.core(x, state)
        return F.log_softmax(self.logit(state[0]), dim=1), state

    def start(self, features: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The two priming steps: the embedded image on a zero state, then the start token.
        Returns the log-probabilities of the first word and the state after them."""
        zeros = features.new_zeros(features.shape[0], self.options.rnn_size)
        _, state = self.step(self.img_embed(features), (zeros, zeros))
        start = torch.full((features.shape[0],), END, dtype=torch.long, device=features.device)
        return self.step(self.embed(start), state)

    def greedy(self, features: torch.Tensor) -> list[Caption]:
        """The most likely word at every step, for all images at once."""
        logprobs, state = self.start(features)
        count = features.shape[0]
        words: list[list[int]] = [[] for _ in range(count)]
        totals = torch.zeros(count, dtype=logprobs.dtype, device=logprobs.device)
        running = torch.ones(count, dtype=torch.bool, device=logprobs.device)
        for position in range(self.options.seq_length):
            best, chosen = logprobs.max(dim=1)
            totals += torch.where(running, best, torch.zeros_like(best))
            for row in running.nonzero().flatten().tolist():
                if chosen[row] != END:
                    words[row].append(int(chosen[row]))
            running &= chosen != END
            if not running.any() or position == self.options.seq_length - 1:
                break
            logprobs, state = self.step(self.embed(chosen), state)
        return [Caption(row_words, float(total)) for row_words, total in zip(words, totals)]

    def beam_search(self, feature: torch.Tensor, width: int) -> Caption:
        """The most likely caption beam search finds for one image feature (fc_feat_size,).

        Keeps the `width` best partial captions; a candidate that picks the end token (or
        reaches the length cap) is finished and leaves the beam.  Stops once no partial caption
        can still beat the best finished one (log-probabilities only fall).  Width 1 is greedy.
        """
        width = max(1, width)
        logprobs, state = self.start(feature.unsqueeze(0))
        vocab = logprobs.shape[1]
        prefixes: list[list[int]] = [[]]
        scores = logprobs.new_zeros(1)
        finished: list[Caption] = []
        for position in range(self.options.seq_length):
            last = position == self.options.seq_length - 1
            candidates = (scores.unsqueeze(1) + logprobs).flatten()
            top_scores, top_indices = candidates.topk(min(width, candidates.numel()))
            rows: list[int] = []
            words: list[int] = []
            kept_scores: list[float] = []
            for score, index in zip(top_scores.tolist(), top_indices.tolist()):
                row, word = divmod(index, vocab)
                if word == END:
                    finished.append(Caption(prefixes[row], score))
                elif last:
                    finished.append(Caption(prefixes[row] + [word], score))
                else:
                    rows.append(row)
                    words.append(word)
                    kept_scores.append(score)
            best_finished = max((caption.logprob for caption in finished), default=float("-inf"))
            if not rows or best_finished >= max(kept_scores):
                break
            prefixes = [prefixes[row] + [word] for row, word in zip(rows, words)]
            scores = logprobs.new_tensor(kept_scores)
            row_index = torch.tensor(rows, device=logprobs.device)
            chosen = torch.tensor(words, device=logprobs.device)
            logprobs, state = self.step(self.embed(chosen), (state[0][row_index], state[1][row_index]))
        return max(finished, key=lambda caption: caption.logprob)

    def sequence_logprob(self, feature: torch.Tensor, words: list[int]) -> float:
        """Log-probability the model gives a caption of one image (same convention as `Caption`)."""
        logprobs, state = self.start(feature.unsqueeze(0))
        targets = list(words) + ([END] if len(words) < self.options.seq_length else [])
        total = 0.0
        for position, word in enumerate(targets):
            total += float(logprobs[0, word])
            if position + 1 < len(targets):
                chosen = torch.tensor([word], device=feature.device)
                logprobs, state = self.step(self.embed(chosen), state)
        return total

    def caption(self, features: torch.Tensor, beam: int = 1) -> list[Caption]:
        if beam <= 1:
            return self.greedy(features)
        return [self.beam_search(feature, beam) for feature in features]


def load_caption_model(path: str | os.PathLike[str], options: FCModelOptions) -> FCCaptionModel:
    model = FCCaptionModel(options)
    load_strict(model, load_state_dict_file(path), source=Path(path).name)
    return model.eval()


# --- the pipeline -----------------------------------------------------------------------------


def encoder_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) the encoder sees: the longest side at most `size`.  Images already
    within it keep their size; sides below `MIN_SIDE` are stretched to it."""
    scale = min(1.0, size / max(width, height))
    return max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))


class CaptionPipeline:
    """Image → one English sentence."""

    fixed_input_size = False

    def __init__(
        self,
        encoder: CaffeResNet101Encoder,
        model: FCCaptionModel,
        vocab: Mapping[int, str],
        *,
        size: int = DEFAULT_SIZE,
        beam: int = DEFAULT_BEAM,
        device: torch.device = torch.device("cpu"),
        name: str = DEFAULT_NAME,
    ) -> None:
        self.name = name
        self.size = size
        self.beam = beam
        self.device = torch.device(device)
        self.encoder = encoder.eval().to(self.device)
        self.model = model.eval().to(self.device)
        self.vocab = dict(vocab)
        # JPEG draft decoding may shrink the image as long as it stays at least this large.
        self.draft_size: tuple[int, int] | None = (size, size)

    @classmethod
    def from_files(
        cls,
        *,
        model: str | os.PathLike[str],
        infos: str | os.PathLike[str],
        encoder: str | os.PathLike[str] | bytes,
        size: int = DEFAULT_SIZE,
        beam: int = DEFAULT_BEAM,
        device: torch.device = torch.device("cpu"),
        name: str = DEFAULT_NAME,
    ) -> CaptionPipeline:
        caption_infos = load_infos(infos)
        # The small files first: a wrong one fails before the 170 MB encoder is read.
        caption_model = load_caption_model(model, caption_infos.options)
        return cls(
            load_encoder(encoder),
            caption_model,
            caption_infos.vocab,
            size=size,
            beam=beam,
            device=device,
            name=name,
        )

    @classmethod
    def from_dir(
        cls,
        directory: str | os.PathLike[str],
        *,
        size: int = DEFAULT_SIZE,
        beam: int = DEFAULT_BEAM,
        device: torch.device = torch.device("cpu"),
        name: str = DEFAULT_NAME,
    ) -> CaptionPipeline:
        """A directory with fc-model.pth, fc-infos.pkl and resnet101.pth (or its two halves)."""
        directory = Path(directory)
        return cls.from_files(
            model=directory / "fc-model.pth",
            infos=directory / "fc-infos.pkl",
            encoder=read_encoder_file(directory),
            size=size,
            beam=beam,
            device=device,
            name=name,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, H, W), ImageNet-normalised, longest side at most `size`."""
        image = to_rgb(image)
        target = encoder_size(image.width, image.height, self.size)
        if target != image.size:
            image = image.resize(target, Image.Resampling.BICUBIC)
        return TF.normalize(TF.to_tensor(image), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @torch.inference_mode()
    def features(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """(N, 2048) image features; images of different sizes each run on their own."""
        return torch.cat([self.encoder(tensor.unsqueeze(0).to(self.device)) for tensor in inputs])

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[str]:
        features = self.features(inputs)
        beams = [max(1, int(option.get("beam", self.beam))) for option in options]
        captions: list[Caption | None] = [None] * len(inputs)
        greedy_rows = [row for row, beam in enumerate(beams) if beam == 1]
        if greedy_rows:  # greedy decoding runs for all its images at once
            for row, caption in zip(greedy_rows, self.model.greedy(features[greedy_rows])):
                captions[row] = caption
        for row, beam in enumerate(beams):
            if beam > 1:
                captions[row] = self.model.beam_search(features[row], beam)
        return [self.sentence(caption.words) for caption in captions if caption is not None]

    def sentence(self, words: list[int]) -> str:
        return " ".join(self.vocab.get(word, "<unk>") for word in words)

    def describe(self, image: Image.Image, beam: int | None = None) -> str:
        """One image, in this process: for the CLI and scripts."""
        return self.run([self.preprocess(image)], [{} if beam is None else {"beam": beam}])[0]


def load_from_settings(settings: Settings, device: torch.device) -> CaptionPipeline:
    """The registry's entry point: the "fc" captioner's files from the weights store."""
    from inference.weights import WeightsStore  # lazily, like the registry: only the loader needs it

    store = WeightsStore(settings.weights_dir, auto_download=settings.auto_download)
    paths = store.ensure_model(DEFAULT_NAME)
    return CaptionPipeline.from_files(
        model=paths["model"],
        infos=paths["infos"],
        encoder=paths["encoder"],
        size=settings.caption_size,
        beam=settings.caption_beam,
        device=device,
        name=DEFAULT_NAME,
    )

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
from inference.checkpoint import load_checkpoint
from inference.errors import WeightsMissing
from inference.images import to_rgb

# fc-infos.pkl (options, vocabulary) is read by the torch-free `caption_infos`; its names are
# re-exported here, where the captioner's users look for them.
from inference.models.caption_infos import INFOS_GLOBALS, CaptionInfos, FCModelOptions, load_infos  # noqa: F401
from inference.presets import CAPTION
from inference.registry import ModelEntry, load_pipeline
from inference.tasks import get_task

DEFAULT_NAME: str = get_task("caption").default_model(Settings())
#: Longest side of the image the encoder sees (the settings' default; the reference code used
#: the original size).
DEFAULT_SIZE: int = CAPTION.default_size
#: Beam width when none is asked for: the settings' default (the book's eval.py default, 2).
DEFAULT_BEAM: int = Settings.caption_beam
#: Images smaller than this are enlarged: the encoder needs a few pixels to reach layer4.
MIN_SIDE = 32
#: Index 0 ends a caption; it is also what the decoder is fed to start one.
END = 0
#: Beam search lowers the log-probability of the last vocabulary index (UNK, the words too rare
#: to learn) by this much before every choice, as the book's code does; greedy decoding does not.
UNK_PENALTY = 1000.0

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
    load_checkpoint(encoder, source, name=name, assign=True)
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
    #: Sum of the log-probabilities of the words and, if it ended before the cap, the end token
    #: (for beam search, with `UNK_PENALTY` counted for each UNK, as the search ranked it).
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
        """The book's beam search (its eval.py with `--beam_size width`) for one image feature
        (fc_feat_size,), following the rules of ImageCaptioning.pytorch's `beam_search`:

        - before every choice, the last vocabulary index (UNK) has its log-probability lowered
          by `UNK_PENALTY`, so a caption only gets UNK when nothing else is left;
        - the first step expands the one beam there is; after that every live beam offers its
          best `width` words, and the `width` candidates with the highest summed log-probability
          are kept;
        - a kept candidate whose word is the end token is finished, its sum including the end
          token's log-probability; it leaves the beam and the live beams fill its slot at the
          next step;
        - at the length cap every kept candidate is finished;
        - the answer is the finished caption with the highest sum (penalty included).

        The book's code always runs to the length cap; this stops as soon as the best finished
        caption scores at least as high as every live beam.  Adding log-probabilities (all ≤ 0)
        only lowers a sum, so no live beam could overtake it: same answer, fewer steps.
        Width 1 is this search with one beam, not `greedy`: it still never picks UNK.
        """
        width = max(1, width)
        logprobs, state = self.start(feature.unsqueeze(0))
        vocab = logprobs.shape[1]
        unk_penalty = logprobs.new_zeros(vocab)
        unk_penalty[vocab - 1] = UNK_PENALTY
        prefixes: list[list[int]] = [[]]  # the live beams' words so far
        sums = logprobs.new_zeros(1)  # and their summed log-probabilities
        finished: list[Caption] = []
        for position in range(self.options.seq_length):
            at_cap = position == self.options.seq_length - 1
            # Each live beam's best `width` words (beam × offer), then the best `width` of all.
            offered_sums, offered_words = (sums.unsqueeze(1) + logprobs - unk_penalty).topk(min(width, vocab), dim=1)
            kept_sums, kept_offers = offered_sums.flatten().topk(min(width, offered_sums.numel()))
            offers_per_beam = offered_words.shape[1]
            offered = offered_words.tolist()
            rows: list[int] = []  # the live beam each surviving candidate extends
            words: list[int] = []
            live_sums: list[float] = []
            for total, offer in zip(kept_sums.tolist(), kept_offers.tolist()):
                row, rank = divmod(offer, offers_per_beam)
                word = offered[row][rank]
                if word == END:
                    finished.append(Caption(prefixes[row], total))
                elif at_cap:
                    finished.append(Caption(prefixes[row] + [word], total))
                else:
                    rows.append(row)
                    words.append(word)
                    live_sums.append(total)
            best_finished = max((caption.logprob for caption in finished), default=float("-inf"))
            if not rows or best_finished >= max(live_sums):
                break
            prefixes = [prefixes[row] + [word] for row, word in zip(rows, words)]
            sums = logprobs.new_tensor(live_sums)
            parents = torch.tensor(rows, device=logprobs.device)
            chosen = torch.tensor(words, device=logprobs.device)
            logprobs, state = self.step(self.embed(chosen), (state[0][parents], state[1][parents]))
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

    def caption(self, features: torch.Tensor, beam: int = DEFAULT_BEAM) -> list[Caption]:
        """Beam 1 is the book's greedy sampler (which may write UNK); wider beams, `beam_search`."""
        if beam <= 1:
            return self.greedy(features)
        return [self.beam_search(feature, beam) for feature in features]


def load_caption_model(path: str | os.PathLike[str], options: FCModelOptions) -> FCCaptionModel:
    model = FCCaptionModel(options)
    load_checkpoint(model, path)
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
        imagenet = CAPTION.normalization
        return TF.normalize(TF.to_tensor(image), mean=imagenet.mean, std=imagenet.std)

    @torch.inference_mode()
    def features(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """(N, 2048) image features; images of different sizes each run on their own."""
        return torch.cat([self.encoder(tensor.unsqueeze(0).to(self.device)) for tensor in inputs])

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[str]:
        """One sentence per image.  Each request may name its own `beam` (default: this
        pipeline's): 1 is the book's greedy sampler, wider is the book's beam search."""
        features = self.features(inputs)
        beams = [max(1, int(option.get("beam", self.beam))) for option in options]
        captions: dict[int, Caption] = {}
        greedy_rows = [row for row, beam in enumerate(beams) if beam == 1]
        if greedy_rows:  # greedy decoding runs for all its images at once
            captions.update(zip(greedy_rows, self.model.greedy(features[greedy_rows])))
        for row, beam in enumerate(beams):
            if beam > 1:
                captions[row] = self.model.beam_search(features[row], beam)
        return [self.sentence(captions[row].words) for row in range(len(inputs))]

    def sentence(self, words: list[int]) -> str:
        return " ".join(self.vocab.get(word, "<unk>") for word in words)

    def describe(self, image: Image.Image, beam: int | None = None) -> str:
        """One image, in this process: for the CLI and scripts."""
        return self.run([self.preprocess(image)], [{} if beam is None else {"beam": beam}])[0]


def build(entry: ModelEntry, settings: Settings, device: torch.device) -> CaptionPipeline:
    """The registry's builder: the captioner's files (`entry.weights`) from the weights store."""
    from inference.weights import WeightsStore  # the store only where a model is built

    store = WeightsStore(settings.weights_dir, auto_download=settings.auto_download)
    paths = store.ensure_model(entry.weights)
    return CaptionPipeline.from_files(
        model=paths["model"],
        infos=paths["infos"],
        encoder=paths["encoder"],
        size=CAPTION.size_for(settings),
        beam=settings.caption_beam,
        device=device,
        name=entry.name,
    )


def load_from_settings(settings: Settings, device: torch.device) -> CaptionPipeline:
    """The caption task's model, through the registry."""
    return load_pipeline("caption", settings, device)  # type: ignore[return-value]

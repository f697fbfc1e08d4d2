"""fc-infos.pkl, the captioner's options and vocabulary: read without torch and without running
any of the pickle's code.

Torch-free on purpose: a worker that runs the captioner in ONNX Runtime (issue 14) needs the
vocabulary and the sizes, not the networks.  `inference.models.captioner` builds the networks.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inference.errors import WeightsCorrupt, WeightsMissing
from inference.unpickle import Global, load_pickle

#: The globals fc-infos.pkl uses, Python 3 spelling: the options (an argparse.Namespace rebuilt
#: through copyreg) and numpy scalars (best_val_score).  numpy 2 pickles name `numpy._core`.
#: The numpy ones are never imported: `inference.unpickle.STAND_INS` builds plain scalars instead.
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


@dataclass(frozen=True)
class FCModelOptions:
    """The sizes of the language model, as training recorded them in fc-infos.pkl's `opt`."""

    vocab_size: int = 9487
    input_encoding_size: int = 512
    rnn_size: int = 512
    fc_feat_size: int = 2048
    #: Most words in a caption.
    seq_length: int = 16

    #: What a file may ask for, (least, most) per option.  The model is built from these sizes
    #: before its weights are read, so an absurd size would cost its memory up front; the real
    #: file's values (above) sit well inside.
    RANGES = {
        "vocab_size": (1, 100_000),
        "input_encoding_size": (1, 4096),
        "rnn_size": (1, 4096),
        "fc_feat_size": (1, 8192),
        "seq_length": (1, 100),
    }
    #: And all of them together: at most this many parameters (200 MB of float32; the real model
    #: has 13.4 M).
    MAX_PARAMETERS = 50_000_000

    @property
    def parameter_count(self) -> int:
        """Parameters of the FCCaptionModel these options build (img_embed, core, embed, logit)."""
        words, encoding, rnn = self.vocab_size + 1, self.input_encoding_size, self.rnn_size
        img_embed = (self.fc_feat_size + 1) * encoding
        core = 5 * rnn * (encoding + 1) + 5 * rnn * (rnn + 1)
        return img_embed + core + words * encoding + words * (rnn + 1)

    @classmethod
    def from_namespace(cls, opt: argparse.Namespace, source: str = "fc-infos.pkl") -> FCModelOptions:
        """The options of an untrusted file, each checked against `RANGES`."""
        settings = vars(opt)
        unsupported = {
            key: settings.get(key)
            for key, wanted in (("caption_model", "fc"), ("rnn_type", "lstm"), ("num_layers", 1))
            if settings.get(key, wanted) != wanted
        }
        if unsupported:
            raise WeightsCorrupt(f"{source} describes a model this code does not implement: {unsupported}")
        values: dict[str, int] = {}
        for name, (least, most) in cls.RANGES.items():
            if name not in settings:
                raise WeightsCorrupt(f"{source} lacks the model option {name}")
            value = settings[name]
            # Whole numbers only: int() would quietly truncate 512.7 and fail on inf.
            if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
                raise WeightsCorrupt(
                    f"{source}: the model option {name} is {str(value)[:40]}, not a whole number "
                    f"from {least} to {most}"
                )
            values[name] = value
        options = cls(**values)
        if options.parameter_count > cls.MAX_PARAMETERS:
            raise WeightsCorrupt(
                f"{source} describes a language model of {options.parameter_count:,} parameters, "
                f"more than the {cls.MAX_PARAMETERS:,} this code loads"
            )
        return options


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
    options = FCModelOptions.from_namespace(infos["opt"], path.name)
    if set(vocab) != set(range(1, options.vocab_size + 1)):
        raise WeightsCorrupt(
            f"{path.name}: the vocabulary has {len(vocab)} words, not the indices 1…{options.vocab_size}"
        )
    return CaptionInfos(vocab, options)

"""inference/unpickle.py's numpy stand-ins and the captioner's checks of fc-infos.pkl's options.

A forged fc-infos.pkl whose numpy scalar carries a crafted dtype made numpy read its bytes as
object pointers: a segmentation fault.  Those loads run in a child process, so that a
regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys

import numpy as np
import pytest
from numpy._core.multiarray import scalar as numpy_scalar

from inference.errors import WeightsCorrupt
from inference.models.captioner import INFOS_GLOBALS, FCModelOptions, load_infos
from inference.unpickle import load_pickle
from tests.checkpoints import REAL_FC_INFOS
from tests.conftest import REPO_ROOT


class _CraftedDtype:
    """Pickles as numpy.dtype(code, False, True) with the given state."""

    def __init__(self, code: str, state: tuple) -> None:
        self.code, self.state = code, state

    def __reduce__(self):
        return (np.dtype, (self.code, False, True), self.state)


class _CraftedScalar:
    """Pickles as numpy's scalar(dtype, data), as a real numpy scalar does."""

    def __init__(self, dtype: object, data: bytes) -> None:
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return (numpy_scalar, (self.dtype, self.data))


#: A void dtype with an object field and the "holds objects" flags, but no "pickled as a list"
#: flag: numpy copies the 8 bytes in and then reads them as a PyObject pointer.
_OBJECT_FIELD = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 61)
_OBJECT_SUBARRAY = (3, "|", (np.dtype("O"), (1,)), None, None, 8, 1, 61)
FORGED_SCALARS = {
    "object field": _CraftedScalar(_CraftedDtype("V8", _OBJECT_FIELD), b"AAAAAAAA"),
    "object subarray": _CraftedScalar(_CraftedDtype("V8", _OBJECT_SUBARRAY), b"AAAAAAAA"),
    "float64 with object flags": _CraftedScalar(_CraftedDtype("f8", (3, "<", None, None, None, -1, -1, 1)), b"AAAAAAAA"),
    "float64 with a huge itemsize": _CraftedScalar(
        _CraftedDtype("f8", (3, "<", None, None, None, 1 << 40, -1, 0)), b"AAAAAAAA"
    ),
    "object dtype": _CraftedScalar(_CraftedDtype("O8", (3, "|", None, None, None, -1, -1, 63)), b"AAAAAAAA"),
    "float64 of the wrong length": _CraftedScalar(_CraftedDtype("f8", (3, "<", None, None, None, -1, -1, 0)), b"A" * 9),
}


def _real_infos() -> dict:
    return dict(load_pickle(REAL_FC_INFOS, INFOS_GLOBALS))


def _forged_infos(tmp_path, **changes) -> object:
    infos = _real_infos()
    infos.update(changes)
    path = tmp_path / "fc-infos.pkl"
    path.write_bytes(pickle.dumps(infos, protocol=4))  # bytes as BINBYTES: no _codecs needed
    return path


_LOAD_IN_CHILD = """
import sys
from inference.errors import WeightsCorrupt
from inference.models.captioner import load_infos
for path in sys.argv[1:]:
    try:
        load_infos(path)
        print("loaded")
    except WeightsCorrupt as error:
        print(error)
    sys.stdout.flush()  # what was refused before a crash still shows
"""


def test_forged_numpy_scalars_are_refused_not_crashed_on(tmp_path):
    paths = []
    for index, scalar in enumerate(FORGED_SCALARS.values()):
        folder = tmp_path / str(index)
        folder.mkdir()
        paths.append(_forged_infos(folder, best_val_score=scalar))
    # One child for all of them (a Python start costs seconds): a crash fails the test as well.
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_CHILD, *map(str, paths)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, (
        f"exit status {result.returncode} (-11 is a segfault) after {list(FORGED_SCALARS)[: len(lines)]}: "
        f"{result.stderr[-500:]}"
    )
    assert len(lines) == len(FORGED_SCALARS)
    for forgery, line in zip(FORGED_SCALARS, lines):
        assert "fc-infos.pkl holds a numpy" in line and "refusing to load it" in line, (forgery, line)


def test_the_real_file_keeps_its_float64_score_and_loads():
    score = _real_infos()["best_val_score"]
    assert type(score) is np.float64 and score == pytest.approx(0.94658567, abs=1e-8)
    assert load_infos(REAL_FC_INFOS).options == FCModelOptions()


@pytest.mark.parametrize(
    "value", [np.float64(0.25), np.float32(-1.5), np.float16(2.0), np.int64(-3), np.uint8(7), np.bool_(True)]
)
def test_plain_numpy_scalars_round_trip(value):
    loaded = load_pickle(pickle.dumps({"x": value}, protocol=4), INFOS_GLOBALS)["x"]
    assert type(loaded) is type(value) and loaded == value


def test_a_big_endian_float_keeps_its_value():
    value = np.array([1.25], dtype=">f8")[0]
    assert load_pickle(pickle.dumps(value, protocol=4), INFOS_GLOBALS) == 1.25


def test_a_dtype_smuggled_through_the_reconstructor_is_never_used():
    """copyreg._reconstructor(numpy.dtype, object, None) makes a stand-in without its checks."""
    payload = (
        b"\x80\x04cnumpy._core.multiarray\nscalar\n"
        b"ccopyreg\n_reconstructor\ncnumpy\ndtype\ncbuiltins\nobject\nN\x87R"
        b"C\x08AAAAAAAA\x86R."
    )
    with pytest.raises(WeightsCorrupt, match="not a checked plain dtype"):
        load_pickle(payload, INFOS_GLOBALS)


# --- the options' ranges ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("rnn_size", -512, "rnn_size is -512, not a whole number from 1 to 4096"),
        ("vocab_size", 10**11, "vocab_size is 100000000000, not a whole number from 1 to 100000"),
        ("seq_length", 0, "seq_length is 0"),
        ("input_encoding_size", 512.5, "input_encoding_size is 512.5"),
        ("fc_feat_size", float("inf"), "fc_feat_size is inf"),
        ("rnn_size", True, "rnn_size is True"),
        ("vocab_size", "9487", "vocab_size is 9487, not a whole number"),
    ],
)
def test_options_out_of_range_are_refused_naming_the_file(tmp_path, option, value, message):
    opt = argparse.Namespace(**vars(_real_infos()["opt"]))
    setattr(opt, option, value)
    path = _forged_infos(tmp_path, opt=opt, best_val_score=0.5)
    with pytest.raises(WeightsCorrupt, match=rf"fc-infos\.pkl: the model option {message}"):
        load_infos(path)


def test_options_within_range_but_too_big_together_are_refused(tmp_path):
    opt = argparse.Namespace(**vars(_real_infos()["opt"]))
    opt.vocab_size, opt.rnn_size, opt.input_encoding_size = 100_000, 4096, 4096
    path = _forged_infos(tmp_path, opt=opt, best_val_score=0.5)
    with pytest.raises(WeightsCorrupt, match=r"fc-infos\.pkl describes a language model of [\d,]+ parameters"):
        load_infos(path)


def test_a_missing_option_is_named(tmp_path):
    opt = argparse.Namespace(**vars(_real_infos()["opt"]))
    del opt.rnn_size
    with pytest.raises(WeightsCorrupt, match=r"fc-infos\.pkl lacks the model option rnn_size"):
        load_infos(_forged_infos(tmp_path, opt=opt, best_val_score=0.5))


def test_the_parameter_count_is_the_models():
    from inference.models.captioner import FCCaptionModel

    options = FCModelOptions(vocab_size=11, input_encoding_size=6, rnn_size=5, fc_feat_size=7, seq_length=4)
    assert options.parameter_count == sum(p.numel() for p in FCCaptionModel(options).parameters())
    assert FCModelOptions().parameter_count == 13_400_848

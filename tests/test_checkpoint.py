"""inference/checkpoint.py and checkpoint_scan.py: weights files are checked against what they
declare and what the model expects, before anything large is allocated.

Hostile files are written from declarations (`tests.checkpoints.write_declared_checkpoint`), so
a "1 GiB" storage costs the test ~1 MB.  The memory claims are measured in a child process, where
the peak resident size says what the refusal cost.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from inference.checkpoint import (
    load_checkpoint,
    load_state_dict_file,
    load_strict,
    scan_checkpoint,
)
from inference.errors import CheckpointMismatch, WeightsCorrupt, WeightsMissing
from inference.models.captioner import CaffeResNet101Encoder
from inference.models.cyclegan import ResnetGenerator
from tests.checkpoints import (
    cyclegan_layout,
    write_cyclegan_checkpoint,
    write_declared_checkpoint,
)
from tests.conftest import REPO_ROOT

GIB = 1 << 30
#: Float32 elements of 1 GiB.
GIB_OF_FLOATS = GIB // 4


def _stale(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.fixture(scope="module")
def generator_state(tmp_path_factory) -> OrderedDict[str, torch.Tensor]:
    path = write_cyclegan_checkpoint(tmp_path_factory.mktemp("g") / "g.pth")
    return torch.load(path, weights_only=True)


# --- the published layouts keep loading --------------------------------------------------------


@pytest.mark.parametrize("zip_format", [False, True])
def test_published_layouts_load_in_either_format(tmp_path, generator_state, zip_format):
    path = tmp_path / "g.pth"
    torch.save(generator_state, path, _use_new_zipfile_serialization=zip_format)
    declared = scan_checkpoint(path)
    assert declared.format == ("zip" if zip_format else "legacy")
    assert len(declared.tensors) == 48 and declared.storage_bytes == 11_378_179 * 4
    generator = ResnetGenerator()
    load_checkpoint(generator, path)
    assert torch.equal(generator.state_dict()["model.26.bias"], generator_state["model.26.bias"])
    assert load_state_dict_file(path).keys() == generator_state.keys()


def test_stale_norm_statistics_can_be_ignored_by_name(tmp_path):
    path = write_cyclegan_checkpoint(tmp_path / "old.pth", stale_norm_stats=True)
    with pytest.raises(CheckpointMismatch, match="unexpected key"):
        load_checkpoint(ResnetGenerator(), path)
    load_checkpoint(ResnetGenerator(), path, ignore=_stale)


# --- a zip entry that inflates ------------------------------------------------------------------


def test_a_zip_bomb_is_refused_from_its_declarations(tmp_path):
    bomb = write_declared_checkpoint(tmp_path / "bomb.pth", {"model.1.bias": (GIB_OF_FLOATS,)}, deflate=True)
    assert bomb.stat().st_size < 2 * 1024 * 1024  # 1 GiB of zeros, deflated
    with pytest.raises(WeightsCorrupt, match=r"bomb\.pth holds zip entries that inflate to 1,073,7\d\d,\d+ bytes from a file of 1,0\d\d,\d+"):
        load_state_dict_file(bomb)
    with pytest.raises(WeightsCorrupt, match=r"bomb\.pth"):
        load_checkpoint(ResnetGenerator(), bomb)


def test_a_storage_larger_than_its_tensor_is_refused_against_the_model(tmp_path):
    """A file may hold its bytes honestly (stored, not inflated) and still declare far more
    than the model's tensors: 8 MB behind a bias of 64 numbers."""
    shapes = cyclegan_layout()
    path = write_declared_checkpoint(tmp_path / "fat.pth", shapes, storage_numel={"model.1.bias": 2_000_000})
    with pytest.raises(WeightsCorrupt, match=r"fat\.pth: .*tensor model\.1\.bias sits in a storage of 8,000,000 bytes for its 256"):
        load_checkpoint(ResnetGenerator(), path)


def test_a_tensor_past_the_end_of_its_storage_is_refused(tmp_path):
    path = write_declared_checkpoint(tmp_path / "short.pth", {"w": (64, 3)}, storage_numel={"w": 100})
    with pytest.raises(WeightsCorrupt, match=r"short\.pth: tensor w reaches past the end of its storage"):
        load_state_dict_file(path)


# --- the legacy format: sizes declared in the pickle, bytes after it ---------------------------


def test_a_legacy_file_declaring_more_than_it_holds_is_refused(tmp_path):
    path = write_declared_checkpoint(
        tmp_path / "liar.pth", {"model.1.bias": (64,)}, legacy=True, storage_numel={"model.1.bias": 10**10}
    )
    assert path.stat().st_size < 4096
    with pytest.raises(WeightsCorrupt, match=r"liar\.pth holds storages declared as 40,000,000,000 bytes in a file of"):
        load_state_dict_file(path)


def test_generated_legacy_and_zip_declarations_load_when_honest(tmp_path):
    for legacy in (False, True):
        path = write_declared_checkpoint(tmp_path / f"ok{legacy}.pth", {"w": (3, 4), "b": (5,)}, legacy=legacy)
        assert {k: tuple(v.shape) for k, v in load_state_dict_file(path).items()} == {"w": (3, 4), "b": (5,)}


# --- tensors that are not plain dense ones -----------------------------------------------------


def _with(state, key, tensor):
    changed = OrderedDict(state)
    changed[key] = tensor
    return changed


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("meta tensor", lambda t: torch.empty(t.shape, device="meta")),
        ("sparse tensor", lambda t: t.to_sparse()),
        ("quantized tensor", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)),
    ],
)
@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_meta_sparse_and_quantized_tensors_are_refused_naming_the_tensor(tmp_path, generator_state, kind, make, zip_format):
    path = tmp_path / "odd.pth"
    state = _with(generator_state, "model.4.weight", make(generator_state["model.4.weight"]))
    try:
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    except (RuntimeError, NotImplementedError, AttributeError):
        pytest.skip(f"torch cannot save a {kind} in this format")
    with pytest.raises(WeightsCorrupt, match=rf"odd\.pth: tensor model\.4\.weight is (a|stored on).*{kind.split()[0]}"):
        load_state_dict_file(path)
    with pytest.raises(WeightsCorrupt, match=r"model\.4\.weight"):
        load_checkpoint(ResnetGenerator(), path)
    # …and handed over in memory, the strict load refuses it as well.
    with pytest.raises(CheckpointMismatch, match=rf"model\.4\.weight is a {kind}"):
        load_strict(ResnetGenerator(), state, source="odd.pth")


def test_a_storage_saved_from_the_meta_device_is_refused(tmp_path):
    path = write_declared_checkpoint(tmp_path / "nodata.pth", {"w": (3, 4)}, location="meta")
    with pytest.raises(WeightsCorrupt, match=r"nodata\.pth: tensor w is stored on the 'meta' device \(a meta tensor"):
        load_state_dict_file(path)
    # a GPU-saved file is fine: it is mapped to the CPU
    cuda = write_declared_checkpoint(tmp_path / "gpu.pth", {"w": (3, 4)}, location="cuda:0", legacy=True)
    assert load_state_dict_file(cuda)["w"].device == torch.device("cpu")


# --- dtypes -------------------------------------------------------------------------------------


def test_half_precision_weights_are_refused_before_loading(tmp_path, generator_state):
    path = tmp_path / "half.pth"
    torch.save(OrderedDict((k, v.half()) for k, v in generator_state.items()), path)
    generator = ResnetGenerator()
    before = generator.state_dict()["model.1.weight"].clone()
    with pytest.raises(CheckpointMismatch, match=r"half\.pth .*48 dtype mismatches \(model\.1\.weight: file float16 vs\. model float32"):
        load_checkpoint(generator, path)
    assert torch.equal(generator.state_dict()["model.1.weight"], before)


def test_a_file_that_does_not_fit_the_model_is_refused_without_being_read(tmp_path, generator_state, monkeypatch):
    """The comparison with the model runs on the scan's declarations: `torch.load` (which would
    allocate every tensor the file holds) is never reached.  `load_strict` would refuse the
    file too, but only after reading it."""
    path = tmp_path / "half.pth"
    torch.save(OrderedDict((k, v.half()) for k, v in generator_state.items()), path)

    def read(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", read)
    with pytest.raises(CheckpointMismatch, match=r"half\.pth .*dtype mismatches"):
        load_checkpoint(ResnetGenerator(), path)


def test_half_precision_weights_with_assign_are_refused():
    """The captioner's encoder is built on "meta" and adopts the file's tensors (assign=True):
    float16 ones would make a float16 model that fails on every float32 image."""
    with torch.device("meta"):
        encoder = CaffeResNet101Encoder()
    state = {key: torch.zeros(value.shape, dtype=value.dtype) for key, value in encoder.state_dict().items()}
    state["conv1.weight"] = state["conv1.weight"].half()
    with pytest.raises(CheckpointMismatch, match=r"resnet101\.pth .*conv1\.weight: file float16 vs\. model float32"):
        load_strict(encoder, state, source="resnet101.pth", assign=True)
    assert encoder.conv1.weight.is_meta  # nothing was adopted


# --- not a checkpoint at all --------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04broken zip", b"\x80\x02K\x01."])
def test_files_that_are_not_checkpoints_are_corrupt(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsCorrupt, match=r"junk\.pth"):
        load_state_dict_file(path)
    with pytest.raises(WeightsMissing):
        load_state_dict_file(tmp_path / "absent.pth")


def test_a_tar_archive_is_not_read(tmp_path):
    """torch.load tries the pre-0.1.10 tar format first; a tar is refused before it gets there."""
    import tarfile

    path = tmp_path / "old.pth"
    with tarfile.open(path, "w") as archive:
        member = tarfile.TarInfo("pickle")
        member.size = 3
        archive.addfile(member, io.BytesIO(b"N.."))
    with pytest.raises(WeightsCorrupt, match=r"old\.pth holds a tar archive"):
        load_state_dict_file(path)


def test_a_non_tensor_value_is_named(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"model.1.weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(WeightsCorrupt, match=r"mixed\.pth is not a plain state dict: 1 entries are not tensors \(epoch: int\)"):
        load_state_dict_file(path)


# --- memory, measured -------------------------------------------------------------------------

_MEASURE = """
import json, resource, sys
from inference.checkpoint import load_checkpoint, load_state_dict_file
from inference.errors import ModelUnavailable
from inference.models.cyclegan import ResnetGenerator
generator = ResnetGenerator()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
for path in sys.argv[1:]:
    for load in (load_state_dict_file, lambda p: load_checkpoint(generator, p)):
        try:
            load(path)
            errors.append(None)
        except ModelUnavailable as error:
            errors.append(str(error))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_mb": grown / 1024, "errors": errors}))
"""


def test_refusing_hostile_checkpoints_allocates_nothing_large(tmp_path):
    files = [
        write_declared_checkpoint(tmp_path / "bomb.pth", {"model.1.bias": (GIB_OF_FLOATS,)}, deflate=True),
        write_declared_checkpoint(
            tmp_path / "bomb2.pth", {"model.1.bias": (64,)}, storage_numel={"model.1.bias": GIB_OF_FLOATS}, deflate=True
        ),
        write_declared_checkpoint(
            tmp_path / "liar.pth", {"model.1.bias": (64,)}, legacy=True, storage_numel={"model.1.bias": GIB_OF_FLOATS}
        ),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *map(str, files)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = [path.name for path in files for _ in range(2)]
    assert all(error and name in error and "does not exist" not in error for name, error in zip(names, report["errors"])), report
    assert report["grown_mb"] < 100, report  # torch.load itself would take 1024 MB for each

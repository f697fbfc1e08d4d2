"""The ONNX export and its cache, through the worker's entry point `load_for_worker`: exported once
in a spawned child, read back from the cache without one, rebuilt when the weights, the
libraries or the files change, refused when corrupt; the runtime rules (torch forced, the
fallback to torch when the export fails or is slower); a worker on ONNX Runtime never imports
torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from inference.errors import ModelUnavailable
from inference.presets import LITE_CLASSIFICATION
from inference.runtime import cache, loader
from inference.runtime.loader import load_for_worker
from tests.checkpoints import write_cyclegan_checkpoint
from tests.conftest import REPO_ROOT
from tests.runtime_fixtures import (  # noqa: F401 (exported_cache is a fixture)
    MODELS,
    crashing_export_child,
    exported_cache,
    failing_export_child,
    hanging_export_child,
    runtime_settings,
)


def _no_export(*args, **kwargs):
    raise AssertionError("the export process was started although the cache holds a valid export")


def _onnx_files(directory: Path) -> dict[str, float]:
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


# --- the first load exports, later loads read the cache -----------------------------------------


def test_first_load_exports_all_three_models_and_picks_onnx_runtime(exported_cache):
    for task, loaded in exported_cache.loaded.items():
        assert (loaded.runtime, loaded.device) == ("onnx", "cpu"), loaded.reason
        assert type(loaded.pipeline).__module__.startswith("inference.runtime.")
        assert loaded.pipeline.name == MODELS[task]
        sidecar = json.loads((exported_cache.directories[task] / cache.SIDECAR).read_text())
        assert sidecar["parity"]["passed"] is True
        assert sidecar["parity"]["samples"] == 2  # inference/samples/*.jpg
        assert sidecar["parity"]["preprocess_max_abs_diff"] <= 1e-5
        for case in sidecar["timing"]["cases"].values():
            assert case["eager_ms"] > 0 and case["onnx_ms"] > 0


def test_second_load_reads_the_cache_without_starting_an_export(exported_cache, monkeypatch):
    before = {task: _onnx_files(directory) for task, directory in exported_cache.directories.items()}
    monkeypatch.setattr(loader, "run_export_process", _no_export)
    for task, name in MODELS.items():
        loaded = load_for_worker(task, name, exported_cache.settings, "cpu", 1)
        assert loaded.runtime == "onnx"
    assert {task: _onnx_files(directory) for task, directory in exported_cache.directories.items()} == before


def test_sidecar_carries_what_the_torch_free_side_needs(exported_cache):
    classifier = json.loads((exported_cache.directories["classify"] / cache.SIDECAR).read_text())
    recipe = classifier["preprocessing"]
    assert (recipe["resize"], recipe["crop"], recipe["resample"]) == (256, 224, "BILINEAR")
    assert tuple(recipe["mean"]) == LITE_CLASSIFICATION.normalization.mean  # Lite's, not ImageNet's
    assert len(classifier["categories"]) == 1000 and classifier["categories"][207] == "golden retriever"
    captioner = json.loads((exported_cache.directories["caption"] / cache.SIDECAR).read_text())
    assert captioner["decoding"] == {"end": 0, "seq_length": 16, "unk_penalty": 1000.0, "beam": 2}
    assert len(captioner["vocabulary"]) == 9487 and captioner["vocabulary"][-1] == "UNK"
    assert set(captioner["files"]) == {"encoder", "step", "embeddings"}
    generator = json.loads((exported_cache.directories["zebra"] / cache.SIDECAR).read_text())
    assert generator["preprocessing"]["multiple"] == 4 and generator["preprocessing"]["resample"] == "BICUBIC"
    assert generator["libraries"] == cache.library_versions()


def test_a_new_runtime_version_means_a_new_key_and_an_export(exported_cache, monkeypatch):
    versions = cache.library_versions() | {"onnxruntime": "99.0"}
    monkeypatch.setattr(cache, "library_versions", lambda: versions)
    started = []

    def spy(task, name, settings, threads, timeout_s, runs):
        started.append(name)
        return exported_cache.directories[task]  # stands in for the child's fresh export

    monkeypatch.setattr(loader, "run_export_process", spy)
    assert load_for_worker("zebra", "horse2zebra", exported_cache.settings, "cpu", 1).runtime == "onnx"
    assert started == ["horse2zebra"]


# --- rebuilt when the weights change or a cached file is damaged --------------------------------


@pytest.fixture(scope="module")
def zebra_settings(tmp_path_factory):
    """A weights directory of its own (these tests rewrite files), with one generator."""
    weights_dir = tmp_path_factory.mktemp("zebra_cache")
    write_cyclegan_checkpoint(weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth", seed=5)
    settings = runtime_settings(weights_dir)
    assert load_for_worker("zebra", "horse2zebra", settings, "cpu", 1, timing_runs=1).runtime == "onnx"
    return settings


def _zebra_keys(settings) -> list[Path]:
    return sorted(p for p in (settings.weights_dir / "onnx" / "horse2zebra").iterdir() if p.name[0] != ".")


@pytest.mark.parametrize("damage", ["truncated onnx", "altered onnx", "sidecar not json", "sidecar missing"])
def test_a_damaged_cached_export_is_refused_and_rebuilt(zebra_settings, damage, caplog):
    (directory,) = _zebra_keys(zebra_settings)
    model, sidecar = directory / "model.onnx", directory / cache.SIDECAR
    good = model.read_bytes()
    if damage == "truncated onnx":
        model.write_bytes(good[: len(good) // 2])
    elif damage == "altered onnx":
        model.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    elif damage == "sidecar not json":
        sidecar.write_text('{"format": 1, "files": ')
    else:
        sidecar.unlink()
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        loaded = load_for_worker("zebra", "horse2zebra", zebra_settings, "cpu", 1, timing_runs=1)
    assert loaded.runtime == "onnx"
    assert [directory] == _zebra_keys(zebra_settings)  # the same key, rebuilt in place
    assert model.read_bytes() == good  # the export is deterministic
    cache.read_export(directory, task="zebra", model_name="horse2zebra")  # passes its checks again
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "refusing a cached ONNX export" in caplog.records[0].getMessage()


def test_changed_weights_are_exported_under_a_new_key_and_the_stale_export_goes(zebra_settings):
    (old,) = _zebra_keys(zebra_settings)
    old_model = (old / "model.onnx").read_bytes()
    generator = zebra_settings.weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth"
    write_cyclegan_checkpoint(generator, seed=6)
    assert load_for_worker("zebra", "horse2zebra", zebra_settings, "cpu", 1, timing_runs=1).runtime == "onnx"
    (new,) = _zebra_keys(zebra_settings)  # the old key's export is gone: nothing would read it
    assert new != old and not old.exists()
    assert new.name == cache.cache_key([generator])
    assert (new / "model.onnx").read_bytes() != old_model


# --- the runtime rules -------------------------------------------------------------------------


def test_inference_runtime_torch_forces_eager(exported_cache, monkeypatch):
    monkeypatch.setattr(loader, "run_export_process", _no_export)
    settings = runtime_settings(exported_cache.settings.weights_dir, inference_runtime="torch")
    loaded = load_for_worker("zebra", "horse2zebra", settings, "cpu", 1)
    assert (loaded.runtime, loaded.device, loaded.reason) == ("torch", "cpu", "INFERENCE_RUNTIME=torch")
    assert type(loaded.pipeline).__module__ == "inference.models.cyclegan"


@pytest.mark.parametrize(
    "parity, slower, runtime",
    [(True, 1.0, "onnx"), (True, loader.SLOWER_ALLOWED, "onnx"), (True, 1.06, "torch"), (False, 0.5, "torch")],
)
def test_auto_takes_onnx_runtime_when_it_passed_parity_and_is_not_slower(
    exported_cache, monkeypatch, parity, slower, runtime
):
    monkeypatch.setattr(loader, "run_export_process", _no_export)
    monkeypatch.setattr(cache.CachedExport, "parity_passed", property(lambda self: parity))
    monkeypatch.setattr(cache.CachedExport, "slower_than_eager", lambda self: slower)
    auto = runtime_settings(exported_cache.settings.weights_dir, inference_runtime="auto")
    assert load_for_worker("zebra", "horse2zebra", auto, "cpu", 1).runtime == runtime
    # INFERENCE_RUNTIME=onnx runs ONNX Runtime whatever the verdict.
    assert load_for_worker("zebra", "horse2zebra", exported_cache.settings, "cpu", 1).runtime == "onnx"


def test_slower_than_eager_sums_the_sidecars_timed_cases(exported_cache):
    export = cache.read_export(exported_cache.directories["classify"], task="classify", model_name=MODELS["classify"])
    cases = export.sidecar["timing"]["cases"]
    assert len(cases) == 2  # batch 1 and the largest batch
    ratio = sum(c["onnx_ms"] for c in cases.values()) / sum(c["eager_ms"] for c in cases.values())
    assert export.slower_than_eager() == pytest.approx(ratio)


@pytest.mark.parametrize(
    "child, words",
    [
        (failing_export_child, "cannot handle this model"),
        (crashing_export_child, "exit code 3"),
        (hanging_export_child, "more than 3 s"),
    ],
)
def test_a_failed_export_falls_back_to_torch_with_one_log_line(tmp_path, monkeypatch, caplog, child, words):
    write_cyclegan_checkpoint(tmp_path / "cyclegan" / "horse2zebra_0.4.0.pth")
    monkeypatch.setattr(loader, "EXPORT_CHILD", f"tests.runtime_fixtures:{child.__name__}")
    settings = runtime_settings(tmp_path, inference_runtime="auto")
    timeout = 3 if child is hanging_export_child else 60
    with caplog.at_level(logging.INFO, logger="inference.runtime"):
        loaded = load_for_worker("zebra", "horse2zebra", settings, "cpu", 1, export_timeout_s=timeout)
    assert loaded.runtime == "torch" and words in loaded.reason
    assert [(r.levelno, words in r.getMessage()) for r in caplog.records] == [(logging.WARNING, True)]
    left = settings.weights_dir / "onnx" / "horse2zebra"
    assert not left.exists() or list(left.iterdir()) == []  # a dead child's half export is removed
    with pytest.raises(ModelUnavailable, match="INFERENCE_RUNTIME=onnx"):
        load_for_worker("zebra", "horse2zebra", runtime_settings(tmp_path), "cpu", 1, export_timeout_s=timeout)


def test_cuda_keeps_torch_and_is_decided_without_torch_on_a_cpu_machine(monkeypatch, tmp_path):
    assert loader.wants_cuda("cuda") and loader.wants_cuda("cuda:1")
    assert not loader.wants_cuda("cpu")
    monkeypatch.setattr(loader, "NVIDIA_DEVICE", tmp_path / "nvidiactl")
    assert not loader.wants_cuda("auto")  # no device node: torch is not even asked
    (tmp_path / "nvidiactl").touch()
    import torch

    assert loader.wants_cuda("auto") == torch.cuda.is_available()


# --- a worker on ONNX Runtime never imports torch -----------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from config import Settings
    from inference.images import decode_image
    from inference.runtime import loader

    def no_export(*args):
        raise SystemExit("an export was started")

    loader.run_export_process = no_export
    settings = Settings(weights_dir=Path(sys.argv[1]), zebra_size=64, caption_size=96, inference_runtime="onnx")
    models = {"classify": "efficientnet_lite0", "zebra": "horse2zebra", "caption": "fc"}
    answers = {}
    for task, name in models.items():
        loaded = loader.load_for_worker(task, name, settings, "auto", 1)
        pipeline = loaded.pipeline
        image = decode_image(Path("inference/samples/bobby.jpg").read_bytes(), draft_size=pipeline.draft_size)
        pipeline.set_threads(2)
        result = pipeline.run([pipeline.preprocess(image)], [{}])[0]
        answers[task] = [loaded.runtime, type(result).__name__]
    answers["torch"] = "torch" in sys.modules
    answers["torchvision"] = "torchvision" in sys.modules
    print(json.dumps(answers))
    """
)


def test_a_worker_on_a_warm_cache_never_imports_torch(exported_cache):
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(exported_cache.settings.weights_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers == {
        "classify": ["onnx", "list"],
        "zebra": ["onnx", "bytes"],
        "caption": ["onnx", "str"],
        "torch": False,
        "torchvision": False,
    }


def test_an_export_lives_beside_the_weights_it_was_built_from(tmp_path, user_cache_dir):
    settings = runtime_settings(tmp_path)
    # The store's weights: in the weights directory.
    assert cache.model_dir(settings, "horse2zebra") == tmp_path / "onnx" / "horse2zebra"
    # Weights bundled by a package: the user cache directory, shared by every weights directory.
    assert cache.model_dir(settings, "efficientnet_lite0") == user_cache_dir / "discord-vision-bot" / "onnx" / "efficientnet_lite0"


def test_exports_run_one_at_a_time_on_a_machine(tmp_path):
    """Two workers' first starts do not export side by side (each peaks at over a GB)."""
    import threading

    inside, overlaps = [], []
    lock = threading.Lock()

    def held(name: str) -> None:
        with loader.one_export_at_a_time():
            with lock:
                overlaps.append(len(inside))
                inside.append(name)
            time.sleep(0.2)
            with lock:
                inside.remove(name)

    threads = [threading.Thread(target=held, args=(str(i),)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [0, 0, 0]


@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_missing_weights_are_the_stores_one_line_and_start_no_export(tmp_path, monkeypatch, runtime):
    from inference.errors import WeightsMissing

    monkeypatch.setattr(loader, "EXPORT_CHILD", "tests.runtime_fixtures:crashing_export_child")  # must not run
    with pytest.raises(WeightsMissing, match="python -m inference weights download horse2zebra"):
        load_for_worker("zebra", "horse2zebra", runtime_settings(tmp_path, inference_runtime=runtime), "cpu", 1)
    assert not (tmp_path / "onnx").exists()  # no child ever started a staging directory


def test_eager_and_onnx_runtime_are_timed_in_turns():
    from inference.runtime.parity import paired_medians_ms

    calls: list[str] = []
    eager_ms, onnx_ms = paired_medians_ms(lambda: calls.append("eager"), lambda: calls.append("onnx"), 3)
    # One untimed run each, then three timed pairs: whatever drifts meanwhile weighs on both.
    assert calls == ["eager", "onnx"] * 4
    assert eager_ms >= 0 and onnx_ms >= 0
